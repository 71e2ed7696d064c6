/* Packet parsing into a flow tuple. Uses bpf_skb_load_bytes so non-linear
 * skbs parse the same as linear ones. */
#ifndef AXONEME_PARSE_H
#define AXONEME_PARSE_H

#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include <uapi/linux/icmp.h>
#include <uapi/linux/icmpv6.h>
#include "lib/common.h"

/* Connection tuple as seen on the wire (forward orientation of this packet).
 * Also the key of axoneme_ct_v1 and axoneme_dropagg_v1 (see conntrack.h).
 * Addresses: IPv4 in bytes 0..3, rest zero. Ports in network byte order; for
 * ICMP echo both ports hold the echo id so the reverse tuple of a reply
 * equals the request's tuple; other ICMP messages use 0. */
struct ax_tuple {
    __u8 saddr[16];
    __u8 daddr[16];
    __be16 sport;
    __be16 dport;
    __u8 proto;
    __u8 family;   /* 4 or 6 */
    __u8 pad[2];
};

struct ax_pkt {
    struct ax_tuple t;
    __u32 len;
    __u16 policy_port;  /* host order: L4 dport, or the ICMP type */
    __u8 tcp_flags;
    __u8 icmp_type;
    __u8 icmp_code;
    __u8 is_nd;         /* ICMPv6 neighbour discovery: never policed */
    __u8 has_ports;
    __u8 pad;
};

#define AX_PARSE_PASS 1      /* not IP (ARP, ...): pass unpoliced */
#define AX_PARSE_OK 0
#define AX_PARSE_BAD (-1)

static __always_inline int ax_parse_l4(struct __sk_buff *skb, __u32 off, struct ax_pkt *p)
{
    __u8 buf[14] = {};
    switch (p->t.proto) {
    case IPPROTO_TCP:
        if (bpf_skb_load_bytes(skb, off, buf, 14) < 0)
            return AX_PARSE_BAD;
        p->tcp_flags = buf[13];
        break;
    case IPPROTO_UDP:
    case IPPROTO_SCTP:
        if (bpf_skb_load_bytes(skb, off, buf, 4) < 0)
            return AX_PARSE_BAD;
        break;
    case IPPROTO_ICMP:
    case IPPROTO_ICMPV6:
        if (bpf_skb_load_bytes(skb, off, buf, 8) < 0)
            return AX_PARSE_BAD;
        p->icmp_type = buf[0];
        p->icmp_code = buf[1];
        p->policy_port = buf[0];
        /* echo request/reply: 8/0 (v4), 128/129 (v6): tuple ports = echo id */
        if ((p->t.proto == IPPROTO_ICMP && (buf[0] == 8 || buf[0] == 0)) ||
            (p->t.proto == IPPROTO_ICMPV6 && (buf[0] == 128 || buf[0] == 129))) {
            __builtin_memcpy(&p->t.sport, &buf[4], 2);
            __builtin_memcpy(&p->t.dport, &buf[4], 2);
        }
        if (p->t.proto == IPPROTO_ICMPV6 && buf[0] >= 133 && buf[0] <= 137)
            p->is_nd = 1;
        return AX_PARSE_OK;
    default:
        return AX_PARSE_OK;
    }
    __builtin_memcpy(&p->t.sport, &buf[0], 2);
    __builtin_memcpy(&p->t.dport, &buf[2], 2);
    p->policy_port = ((__u16)buf[2] << 8) | buf[3];
    p->has_ports = 1;
    return AX_PARSE_OK;
}

static __always_inline int ax_parse(struct __sk_buff *skb, struct ax_pkt *p)
{
    p->len = skb->len;
    if (skb->protocol == bpf_htons(ETH_P_IP)) {
        struct iphdr ip;
        if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0)
            return AX_PARSE_BAD;
        if (ip.ihl < 5)
            return AX_PARSE_BAD;
        p->t.family = 4;
        p->t.proto = ip.protocol;
        __builtin_memcpy(p->t.saddr, &ip.saddr, 4);
        __builtin_memcpy(p->t.daddr, &ip.daddr, 4);
        /* non-first fragments carry no L4 header: decided on protocol only */
        if (ip.frag_off & bpf_htons(0x1FFF))
            return AX_PARSE_OK;
        return ax_parse_l4(skb, ETH_HLEN + ip.ihl * 4, p);
    }
    if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
        struct ipv6hdr ip6;
        if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip6, sizeof(ip6)) < 0)
            return AX_PARSE_BAD;
        p->t.family = 6;
        /* Extension headers are not walked: their next-header value is the
         * protocol the policy sees, so such packets are decided by
         * protocol-wide (or ANY) entries, never passed blindly. */
        p->t.proto = ip6.nexthdr;
        __builtin_memcpy(p->t.saddr, &ip6.saddr, 16);
        __builtin_memcpy(p->t.daddr, &ip6.daddr, 16);
        return ax_parse_l4(skb, ETH_HLEN + sizeof(ip6), p);
    }
    return AX_PARSE_PASS;
}

#endif
