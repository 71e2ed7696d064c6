/* Constants and small helpers shared by every axoneme tc program.
 *
 * Values that Python mirrors (drop reasons, event kinds, metric slots)
 * are fenced: change them here AND in _layout.py, the alignment test checks
 * the structs but not these numbers.
 */
#ifndef AXONEME_COMMON_H
#define AXONEME_COMMON_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/pkt_cls.h>

/* DO NOT CHANGE: mirrored in _layout.py */
#define AX_DIR_INGRESS 0
#define AX_DIR_EGRESS 1

/* skb->mark values (Cilium's MARK_MAGIC_* layout: magic in bits 8..11).
 * Not defined here: _bpf.assemble_source generates AX_MARK_MAGIC_MASK,
 * AX_MARK_MAGIC_TO_PROXY, AX_MARK_MAGIC_PROXY_INGRESS, AX_MARK_MAGIC_CHECKED and
 * the identity layout's AX_MARK_TO_PROXY_IDENTITY, AX_PROXY_MARK_PORT_BASE/SPAN,
 * AX_MAX_MARK_IDENTITY from axoneme.core.marks, the one definition the proxies
 * share (its module doc draws the layout).
 * TO_PROXY: the packet goes to the L7 proxy on a port (TPROXY): the mark
 *        carries the source identity the packet was judged by and the port
 *        as an offset (ax_to_proxy_mark), or just the port in bits 16..31
 *        when the identity or the port does not fit.
 * PROXY_INGRESS: set by an ingress L7 proxy on its upstream sockets; such
 *        packets are never redirected again but still go through L3/L4
 *        policy, as the source identity in the mark's upper 16 bits when
 *        the proxy had one (ax_from_proxy_identity). (An egress proxy's
 *        packets, PROXY_EGRESS, are not special here: the destination's
 *        ingress policy, L7 included, still applies.)
 * CHECKED: from-container already applied the local destination's ingress
 *        policy, so to-container lets the packet through unchecked. */
#ifndef AX_MARK_MAGIC_MASK
#error "the AX_MARK_* defines come from axoneme.core.marks (_bpf.assemble_source)"
#endif

/* Sent by an ingress L7 proxy's upstream socket: never redirected again. */
static __always_inline int ax_from_ingress_proxy(const struct __sk_buff *skb)
{
    return (skb->mark & AX_MARK_MAGIC_MASK) == AX_MARK_MAGIC_PROXY_INGRESS;
}

/* The mark that sends a packet from ``src_id`` to the L7 proxy listening on
 * ``port`` (core.marks.to_proxy_identity_mark): the identity reaches the
 * proxy on its accepted socket, so the proxy judges the connection by the
 * identity the datapath used (the VNI's for a tunnelled packet) rather than
 * by its own ipcache lookup. */
static __always_inline __u32 ax_to_proxy_mark(__u16 port, __u32 src_id)
{
    __u32 off = (__u32)port - AX_PROXY_MARK_PORT_BASE; /* wraps when port < base */
    if (src_id == 0 || src_id > AX_MAX_MARK_IDENTITY || off >= AX_PROXY_MARK_PORT_SPAN)
        return AX_MARK_MAGIC_TO_PROXY | ((__u32)port << 16);
    return (src_id << 16) | AX_MARK_TO_PROXY_IDENTITY | ((off >> 8) << 12)
           | AX_MARK_MAGIC_TO_PROXY | (off & 0xFF);
}

/* The source identity an ingress proxy's upstream packet carries (0: none;
 * core.marks.identity_of_from_proxy_mark). */
static __always_inline __u32 ax_from_proxy_identity(const struct __sk_buff *skb)
{
    return ax_from_ingress_proxy(skb) ? (skb->mark >> 16) & AX_MAX_MARK_IDENTITY : 0;
}

/* Reserved identities (Cilium numbers). */
#define AX_ID_HOST 1
#define AX_ID_WORLD 2
#define AX_ID_REMOTE_NODE 6

/* Drop reasons: Cilium's DROP_* codes (positive), Hubble's DropReason. */
#define AX_DROP_POLICY 133
#define AX_DROP_INVALID 134
#define AX_DROP_CT_INVALID_HDR 135
#define AX_DROP_UNSUPPORTED_L3 139
#define AX_DROP_NO_LXC 152            /* managed interface without an endpoint record */
#define AX_DROP_CT_CREATE_FAILED 155
#define AX_DROP_POLICY_DENY 181
#define AX_DROP_EP_NOT_READY 203      /* endpoint failing closed: its policy did not fit */

/* Policy match types as Hubble reports them. */
#define AX_MATCH_NONE 0
#define AX_MATCH_L3_ONLY 1
#define AX_MATCH_L3_L4 2
#define AX_MATCH_L4_ONLY 3
#define AX_MATCH_ALL 4

/* Per-CPU metric slots in axoneme_metrics_v1. */
#define AX_METRIC_EVENTS_SUPPRESSED 0
#define AX_METRIC_EVENTS_LOST 1
#define AX_METRIC_CT_CREATE_FAILED 2
#define AX_METRIC_DROPPED 3
#define AX_METRIC_FORWARDED 4
#define AX_METRIC_REDIRECTED 5
#define AX_METRIC_REPLY 6
#define AX_METRIC_UNKNOWN_ENDPOINT 7
#define AX_METRIC_MAX 8

#define AX_NSEC_PER_SEC 1000000000ULL

#endif
