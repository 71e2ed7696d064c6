/* Peer identity resolution shared by both programs. */
#ifndef AXONEME_IDENTITY_H
#define AXONEME_IDENTITY_H

#include "lib/common.h"
#include "lib/endpoint.h"
#include "lib/ipcache.h"

/* Order: a local endpoint's own identity, then the longest ipcache prefix,
 * then host for packets the node itself sent (no input interface), else
 * world (Cilium: anything the ipcache does not know is world). */
static __always_inline __u32 ax_peer_identity(__u8 family, const __u8 *addr, int local_origin)
{
    struct ax_endpoint *e = ax_lxc_lookup(family, addr);
    if (e)
        return e->identity;
    __u32 id = ax_ipcache_identity(family, addr);
    if (id)
        return id;
    return local_origin ? AX_ID_HOST : AX_ID_WORLD;
}

static __always_inline void ax_drop_simple(const struct ax_pkt *p, __u8 dir, __u32 ep_id,
                                           __u32 src_id, __u32 dst_id, __u16 reason, __u64 now)
{
    struct ax_verdict v = {};
    v.reason = reason;
    ax_emit_drop(p, dir, ep_id, src_id, dst_id, &v, now);
}

#endif
