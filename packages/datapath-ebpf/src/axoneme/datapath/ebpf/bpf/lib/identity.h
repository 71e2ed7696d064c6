/* Peer identity resolution shared by both programs. */
#ifndef AXONEME_IDENTITY_H
#define AXONEME_IDENTITY_H

#include "lib/common.h"
#include "lib/endpoint.h"
#include "lib/ipcache.h"

/* Order: a local endpoint's own identity, then the longest ipcache prefix,
 * then host for packets the node itself sent (no input interface), else
 * world (Cilium: anything the ipcache does not know is world).
 * ax_remote_identity: the same once the address is known not to be a local
 * endpoint's (the caller looked it up already). */
static __always_inline __u32 ax_remote_identity(__u8 family, const __u8 *addr, int local_origin)
{
    __u32 id = ax_ipcache_identity(family, addr);
    if (id)
        return id;
    return local_origin ? AX_ID_HOST : AX_ID_WORLD;
}

static __always_inline __u32 ax_peer_identity(__u8 family, const __u8 *addr, int local_origin)
{
    struct ax_endpoint *e = ax_lxc_lookup(family, addr);
    if (e)
        return e->identity;
    return ax_remote_identity(family, addr, local_origin);
}

static __always_inline void ax_drop_simple(const struct ax_pkt *p, __u8 dir, __u32 ep_id,
                                           __u32 src_id, __u32 dst_id, __u16 reason, __u64 now)
{
    struct ax_verdict v = {};
    v.reason = reason;
    ax_emit_drop(p, dir, ep_id, src_id, dst_id, &v, now);
}

/* A packet on an interface our programs are attached to, but without an
 * endpoint record (removed, or never written): no policy can decide it, so
 * it is dropped and counted. Non-IP (ARP) and ICMPv6 ND/MLD link control
 * still pass: they carry no workload traffic. */
static __always_inline int ax_drop_unknown_endpoint(struct __sk_buff *skb, __u8 dir)
{
    struct ax_pkt p = {};
    int rc = ax_parse(skb, &p);
    if (rc == AX_PARSE_PASS || (rc >= 0 && p.is_nd))
        return TC_ACT_OK;
    ax_metric_inc(AX_METRIC_UNKNOWN_ENDPOINT);
    ax_drop_simple(&p, dir, 0, 0, 0, AX_DROP_NO_LXC, bpf_ktime_get_ns());
    return TC_ACT_SHOT;
}

#endif
