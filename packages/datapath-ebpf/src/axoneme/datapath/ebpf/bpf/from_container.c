/* tc ingress of the host-side veth: packets leaving the pod.
 *
 * 0. An interface without an endpoint record: dropped (NO_LXC), link
 *    control aside.
 * 1. Replies of tracked connections pass without policy.
 * 2. The pod's EGRESS policy decides (peer = destination identity), unless
 *    the endpoint fails closed in that direction (dropped, EP_NOT_READY).
 * 3. If the destination is a local endpoint, its INGRESS policy decides too
 *    (before routing, so an ingress L7 redirect can still go to the proxy);
 *    the skb is then marked CHECKED so its to-container program skips it.
 * 3b. If the destination is the host (identity host, not a pod) and the
 *    host firewall is on (a host endpoint record), the host's INGRESS
 *    policy decides too.
 * 4. Allowed: tracked in CT (a new connection emits policy-verdict events);
 *    an entry with a proxy port marks the skb for the proxy (TPROXY), unless
 *    the packet already comes from the proxy.
 * Steps 2-3 are skipped when the CT entry caches a verdict computed at the
 * current policy revision (see conntrack.h): same result, no LPM walks.
 */
#include "lib/common.h"
#include "lib/parse.h"
#include "lib/endpoint.h"
#include "lib/ipcache.h"
#include "lib/policy.h"
#include "lib/conntrack.h"
#include "lib/events.h"
#include "lib/identity.h"
#include "lib/verdict.h"

int ax_from_container(struct __sk_buff *skb)
{
    __u32 ifindex = skb->ifindex;
    struct ax_endpoint *ep = ax_endpoints.lookup(&ifindex);
    if (!ep)
        return ax_drop_unknown_endpoint(skb, AX_DIR_EGRESS);

    struct ax_pkt p = {};
    int rc = ax_parse(skb, &p);
    if (rc == AX_PARSE_PASS)
        return TC_ACT_OK;
    __u64 now = bpf_ktime_get_ns();
    __u32 ep_id = ep->ep_id;
    __u32 src_id = ep->identity;
    if (rc < 0) {
        ax_drop_simple(&p, AX_DIR_EGRESS, ep_id, src_id, 0, AX_DROP_CT_INVALID_HDR, now);
        return TC_ACT_SHOT;
    }
    if (p.is_nd)
        return TC_ACT_OK;
    int from_proxy = ax_from_ingress_proxy(skb);
    struct ax_ct_entry *ce;
    __u32 rev;
    if (ax_ct_fast_path(skb, &p, now, AX_CT_CACHE_FROM_CONTAINER, from_proxy, &ce, &rev))
        return TC_ACT_OK;

    struct ax_endpoint *dst_ep = ax_lxc_lookup(p.t.family, p.t.daddr);
    __u32 dst_id = dst_ep ? dst_ep->identity : ax_remote_identity(p.t.family, p.t.daddr, 0);

    struct ax_verdict ve = {};
    if (ax_endpoint_drops(&p, ep, AX_DIR_EGRESS, src_id, dst_id, now, &ve))
        return TC_ACT_SHOT;
    __u16 redirect = from_proxy ? 0 : ve.proxy_port;

    struct ax_verdict vi = {};
    int checked_ingress = 0;
    __u32 dst_ep_id = 0;
    if (dst_ep && !redirect) {
        dst_ep_id = dst_ep->ep_id;
        if (ax_endpoint_drops(&p, dst_ep, AX_DIR_INGRESS, src_id, dst_id, now, &vi))
            return TC_ACT_SHOT;
        checked_ingress = 1;
        if (!from_proxy)
            redirect = vi.proxy_port;
    }

    struct ax_verdict vh = {};
    struct ax_endpoint *host = 0;
    if (!dst_ep && !redirect && dst_id == AX_ID_HOST) {
        host = ax_host_endpoint();
        if (host && ax_endpoint_drops(&p, host, AX_DIR_INGRESS, src_id, dst_id, now, &vh))
            return TC_ACT_SHOT;
    }

    __u32 mark = 0;
    if (redirect)
        mark = ax_to_proxy_mark(redirect, src_id);
    else if (checked_ingress)
        mark = AX_MARK_MAGIC_CHECKED;
    int ct = ax_ct_forward(ce, &p, now, ep_id, src_id, dst_id, redirect,
                           from_proxy ? AX_CT_CACHE_NONE : AX_CT_CACHE_FROM_CONTAINER, rev, mark);
    if (ct < 0)
        return ax_ct_create_failed(&p, AX_DIR_EGRESS, ep_id, src_id, dst_id, now);
    if (ct > 0) {
        ax_emit(&p, AX_EVENT_POLICY_VERDICT, AX_ALLOWED_VERDICT(&ve, ve.proxy_port && !from_proxy),
                AX_DIR_EGRESS, ep_id, src_id, dst_id, &ve, now);
        if (checked_ingress)
            ax_emit(&p, AX_EVENT_POLICY_VERDICT, AX_ALLOWED_VERDICT(&vi, vi.proxy_port && !from_proxy),
                    AX_DIR_INGRESS, dst_ep_id, src_id, dst_id, &vi, now);
        if (host)
            ax_emit(&p, AX_EVENT_POLICY_VERDICT, AX_ALLOWED_VERDICT(&vh, 0),
                    AX_DIR_INGRESS, host->ep_id, src_id, dst_id, &vh, now);
    }
    return ax_pass(skb, mark, redirect != 0);
}
