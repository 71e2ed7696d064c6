/* Packet parsing into a flow tuple. */
#ifndef AXONEME_PARSE_H
#define AXONEME_PARSE_H

#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
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
    __u8 is_nd;         /* ICMPv6 neighbour discovery or MLD: link-local control, never policed */
    __u8 has_ports;
    __u8 pad;
};

#define AX_PARSE_PASS 1      /* not IP (ARP, ...): pass unpoliced */
#define AX_PARSE_OK 0
#define AX_PARSE_BAD (-1)

/* Bytes of L4 header a protocol needs parsed (0: none). */
static __always_inline __u32 ax_l4_need(__u8 proto)
{
    switch (proto) {
    case IPPROTO_TCP:
        return 14;  /* through the flags byte */
    case IPPROTO_UDP:
    case IPPROTO_SCTP:
        return 4;
    case IPPROTO_ICMP:
    case IPPROTO_ICMPV6:
        return 8;
    }
    return 0;
}

static __always_inline void ax_parse_l4(const __u8 *l4, struct ax_pkt *p)
{
    switch (p->t.proto) {
    case IPPROTO_TCP:
        p->tcp_flags = l4[13];
        /* fall through */
    case IPPROTO_UDP:
    case IPPROTO_SCTP:
        __builtin_memcpy(&p->t.sport, &l4[0], 2);
        __builtin_memcpy(&p->t.dport, &l4[2], 2);
        p->policy_port = ((__u16)l4[2] << 8) | l4[3];
        p->has_ports = 1;
        return;
    case IPPROTO_ICMP:
    case IPPROTO_ICMPV6:
        p->icmp_type = l4[0];
        p->icmp_code = l4[1];
        p->policy_port = l4[0];
        /* echo request/reply: 8/0 (v4), 128/129 (v6): tuple ports = echo id */
        if ((p->t.proto == IPPROTO_ICMP && (l4[0] == 8 || l4[0] == 0)) ||
            (p->t.proto == IPPROTO_ICMPV6 && (l4[0] == 128 || l4[0] == 129))) {
            __builtin_memcpy(&p->t.sport, &l4[4], 2);
            __builtin_memcpy(&p->t.dport, &l4[4], 2);
        }
        /* ND (133-137) and multicast listener discovery (130-132, MLDv2 143):
         * never routed off the link, sent before a new endpoint has policy */
        if (p->t.proto == IPPROTO_ICMPV6 &&
            ((l4[0] >= 133 && l4[0] <= 137) || (l4[0] >= 130 && l4[0] <= 132) || l4[0] == 143))
            p->is_nd = 1;
        return;
    }
}

/* Direct packet access; headers outside the linear part are pulled in first
 * (bpf_skb_pull_data) so non-linear skbs parse the same. */
#define AX_PULL_LEN 128

static __always_inline int ax_parse(struct __sk_buff *skb, struct ax_pkt *p)
{
    p->len = skb->len;
    __u16 proto = skb->protocol;
    if (proto != bpf_htons(ETH_P_IP) && proto != bpf_htons(ETH_P_IPV6))
        return AX_PARSE_PASS;

    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    if (data + AX_PULL_LEN > end && skb->len > (__u32)(end - data)) {
        bpf_skb_pull_data(skb, skb->len < AX_PULL_LEN ? skb->len : AX_PULL_LEN);
        data = (void *)(long)skb->data;
        end = (void *)(long)skb->data_end;
    }

    __u8 *l4;
    if (proto == bpf_htons(ETH_P_IP)) {
        struct iphdr *ip = data + ETH_HLEN;
        if ((void *)(ip + 1) > end)
            return AX_PARSE_BAD;
        __u32 ihl = ip->ihl;
        if (ihl < 5)
            return AX_PARSE_BAD;
        p->t.family = 4;
        p->t.proto = ip->protocol;
        __builtin_memcpy(p->t.saddr, &ip->saddr, 4);
        __builtin_memcpy(p->t.daddr, &ip->daddr, 4);
        /* non-first fragments carry no L4 header: decided on protocol only */
        if (ip->frag_off & bpf_htons(0x1FFF))
            return AX_PARSE_OK;
        l4 = (__u8 *)ip + ihl * 4;
    } else {
        struct ipv6hdr *ip6 = data + ETH_HLEN;
        if ((void *)(ip6 + 1) > end)
            return AX_PARSE_BAD;
        p->t.family = 6;
        /* Extension headers are not walked: their next-header value is the
         * protocol the policy sees, so such packets are decided by
         * protocol-wide (or ANY) entries, never passed blindly. */
        p->t.proto = ip6->nexthdr;
        __builtin_memcpy(p->t.saddr, &ip6->saddr, 16);
        __builtin_memcpy(p->t.daddr, &ip6->daddr, 16);
        l4 = (__u8 *)(ip6 + 1);
    }
    __u32 need = ax_l4_need(p->t.proto);
    if (!need)
        return AX_PARSE_OK;
    if ((void *)(l4 + 14) > end) {
        /* short packet: check exactly what this protocol needs */
        if ((void *)(l4 + 8) > end) {
            if (need > 4 || (void *)(l4 + 4) > end)
                return AX_PARSE_BAD;
        } else if (need > 8) {
            return AX_PARSE_BAD;
        }
    }
    if ((void *)(l4 + 4) > end)
        return AX_PARSE_BAD;
    if (need == 4) {
        __builtin_memcpy(&p->t.sport, &l4[0], 2);
        __builtin_memcpy(&p->t.dport, &l4[2], 2);
        p->policy_port = ((__u16)l4[2] << 8) | l4[3];
        p->has_ports = 1;
        return AX_PARSE_OK;
    }
    if ((void *)(l4 + 8) > end)
        return AX_PARSE_BAD;
    if (need == 8) {
        ax_parse_l4(l4, p);
        return AX_PARSE_OK;
    }
    if ((void *)(l4 + 14) > end)
        return AX_PARSE_BAD;
    ax_parse_l4(l4, p);
    return AX_PARSE_OK;
}

#endif
