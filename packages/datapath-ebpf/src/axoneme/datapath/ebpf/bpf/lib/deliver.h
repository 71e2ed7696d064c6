/* Local delivery of traffic from elsewhere: a packet that entered the node
 * through one of its devices (another node's pod over the wire or the
 * tunnel, a peer outside the cluster) on its way to a local endpoint. As
 * Cilium's ipv4_local_delivery from bpf_host/bpf_overlay, the endpoint's
 * INGRESS policy decides here, at tc ingress of the device, before routing:
 * so an L7 rule can still send the packet to the proxy (TPROXY, in the
 * mangle PREROUTING chain, runs after this hook; to-container runs after
 * routing, too late to redirect).
 */
#ifndef AXONEME_DELIVER_H
#define AXONEME_DELIVER_H

#include "lib/common.h"
#include "lib/parse.h"
#include "lib/endpoint.h"
#include "lib/policy.h"
#include "lib/conntrack.h"
#include "lib/events.h"
#include "lib/identity.h"
#include "lib/verdict.h"

/* Decide ``p`` (from peer identity ``src_id``) for the local endpoint ``ep``:
 * 1. Replies of tracked connections, and forward packets whose CT entry
 *    caches a verdict of the current revision for ``owner``, pass (the
 *    cached mark set again).
 * 2. The endpoint's INGRESS policy decides (peer = src_id), unless it fails
 *    closed in that direction (dropped, EP_NOT_READY).
 * 3. Allowed: tracked in CT; a new connection emits a policy-verdict event.
 *    An entry with a proxy port marks the skb for the proxy (TPROXY);
 *    otherwise it is marked CHECKED, so the endpoint's to-container lets it
 *    through without deciding again (by the ipcache alone, which may not
 *    know the peer yet: the tunnel's identity would be lost). */
static __always_inline int ax_deliver_local(struct __sk_buff *skb, struct ax_pkt *p,
                                            const struct ax_endpoint *ep, __u32 src_id,
                                            __u8 owner, __u64 now)
{
    struct ax_ct_entry *ce;
    __u32 rev;
    if (ax_ct_fast_path(skb, p, now, owner, 0, &ce, &rev))
        return TC_ACT_OK;
    __u32 ep_id = ep->ep_id;
    __u32 dst_id = ep->identity;
    struct ax_verdict v = {};
    if (ax_endpoint_drops(p, ep, AX_DIR_INGRESS, src_id, dst_id, now, &v))
        return TC_ACT_SHOT;
    __u16 redirect = v.proxy_port;
    __u32 mark = redirect ? ax_to_proxy_mark(redirect, src_id) : AX_MARK_MAGIC_CHECKED;
    int ct = ax_ct_forward(ce, p, now, ep_id, src_id, dst_id, redirect, owner, rev, mark);
    if (ct < 0)
        return ax_ct_create_failed(p, AX_DIR_INGRESS, ep_id, src_id, dst_id, now);
    if (ct > 0)
        ax_emit(p, AX_EVENT_POLICY_VERDICT, AX_ALLOWED_VERDICT(&v, redirect),
                AX_DIR_INGRESS, ep_id, src_id, dst_id, &v, now);
    return ax_pass(skb, mark, redirect != 0);
}

#endif
