/* The steps around a policy decision that both programs take. */
#ifndef AXONEME_VERDICT_H
#define AXONEME_VERDICT_H

#include "lib/common.h"
#include "lib/parse.h"
#include "lib/endpoint.h"
#include "lib/policy.h"
#include "lib/events.h"
#include "lib/identity.h"

/* Decide the packet by ``ep``'s policy for ``dir`` (the peer is the source
 * for INGRESS, the destination for EGRESS), or drop it with EP_NOT_READY
 * while the endpoint fails closed in that direction. A drop is reported
 * here (event, metric); returns 1 when the packet is dropped. */
static __always_inline int ax_endpoint_drops(const struct ax_pkt *p, const struct ax_endpoint *ep,
                                             __u8 dir, __u32 src_id, __u32 dst_id, __u64 now,
                                             struct ax_verdict *v)
{
    __u32 peer = dir == AX_DIR_INGRESS ? src_id : dst_id;
    if (ax_ep_failing_closed(ep, dir))
        v->reason = AX_DROP_EP_NOT_READY;
    else
        ax_policy_decide(ep->ep_id, peer, p->t.family,
                         dir == AX_DIR_INGRESS ? p->t.saddr : p->t.daddr,
                         dir, p->t.proto, p->policy_port, p->len,
                         (ep->flags & AX_EP_F_NO_ADDR) != 0, ax_ep_no_wild(ep, dir), v);
    if (!v->reason)
        return 0;
    ax_emit_drop(p, dir, ep->ep_id, src_id, dst_id, v, now);
    return 1;
}

/* An allowed packet whose CT entry could not be created (ax_ct_forward < 0):
 * dropped (CT_CREATE_FAILED) and counted. */
static __always_inline int ax_ct_create_failed(const struct ax_pkt *p, __u8 dir, __u32 ep_id,
                                               __u32 src_id, __u32 dst_id, __u64 now)
{
    ax_metric_inc(AX_METRIC_CT_CREATE_FAILED);
    ax_drop_simple(p, dir, ep_id, src_id, dst_id, AX_DROP_CT_CREATE_FAILED, now);
    return TC_ACT_SHOT;
}

/* An allowed packet goes on with ``mark`` (0: the skb's mark is left as
 * is), counted as redirected to a proxy or forwarded. */
static __always_inline int ax_pass(struct __sk_buff *skb, __u32 mark, int redirected)
{
    if (mark)
        skb->mark = mark;
    ax_metric_inc(redirected ? AX_METRIC_REDIRECTED : AX_METRIC_FORWARDED);
    return TC_ACT_OK;
}

#endif
