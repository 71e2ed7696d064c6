/* tc egress of the host-side veth: packets entering the pod.
 *
 * 1. Packets marked CHECKED by a local source's from-container pass (the
 *    mark is cleared).
 * 2. Replies of tracked connections pass without policy.
 * 0. An interface without an endpoint record: dropped (NO_LXC), link
 *    control aside.
 * 3. The pod's INGRESS policy decides (peer = source identity: the one an
 *    ingress proxy's upstream packet carries in its mark, else the local
 *    endpoint's or the ipcache's; packets the node itself sent without an
 *    ipcache entry are host), unless the
 *    endpoint fails closed in that direction (dropped, EP_NOT_READY).
 * 3b. A packet the host itself sent (identity host, no input interface)
 *    meets the host's EGRESS policy first when the host firewall is on.
 * 4. Allowed: tracked in CT; a new connection emits a policy-verdict event.
 *    Step 3 is skipped when the CT entry caches a verdict of the current
 *    policy revision (see conntrack.h).
 *    A proxy port only sets the TO_PROXY mark here: at this hook the packet
 *    is past routing, so ingress L7 from non-local sources is not redirected
 *    (pod-to-pod ingress L7 is redirected by the source's from-container).
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

int ax_to_container(struct __sk_buff *skb)
{
    __u32 ifindex = skb->ifindex;
    struct ax_endpoint *ep = ax_endpoints.lookup(&ifindex);
    if (!ep)
        return ax_drop_unknown_endpoint(skb, AX_DIR_INGRESS);

    if ((skb->mark & AX_MARK_MAGIC_MASK) == AX_MARK_MAGIC_CHECKED) {
        skb->mark = 0;
        return TC_ACT_OK;
    }
    struct ax_pkt p = {};
    int rc = ax_parse(skb, &p);
    if (rc == AX_PARSE_PASS)
        return TC_ACT_OK;
    __u64 now = bpf_ktime_get_ns();
    __u32 ep_id = ep->ep_id;
    __u32 dst_id = ep->identity;
    if (rc < 0) {
        ax_drop_simple(&p, AX_DIR_INGRESS, ep_id, 0, dst_id, AX_DROP_CT_INVALID_HDR, now);
        return TC_ACT_SHOT;
    }
    if (p.is_nd)
        return TC_ACT_OK;
    int from_proxy = ax_from_ingress_proxy(skb);
    struct ax_ct_entry *ce;
    __u32 rev;
    if (ax_ct_fast_path(skb, &p, now, AX_CT_CACHE_TO_CONTAINER, from_proxy, &ce, &rev))
        return TC_ACT_OK;

    /* an ingress proxy's upstream leg: the identity the proxy judged its
     * client by (the node's ipcache may not know a tunnelled client) */
    __u32 src_id = from_proxy ? ax_from_proxy_identity(skb) : 0;
    if (!src_id)
        src_id = ax_peer_identity(p.t.family, p.t.saddr, skb->ingress_ifindex == 0);

    struct ax_verdict vh = {};
    struct ax_endpoint *host = 0;
    if (src_id == AX_ID_HOST && skb->ingress_ifindex == 0) {
        host = ax_host_endpoint();
        if (host && ax_endpoint_drops(&p, host, AX_DIR_EGRESS, src_id, dst_id, now, &vh))
            return TC_ACT_SHOT;
    }
    struct ax_verdict v = {};
    if (ax_endpoint_drops(&p, ep, AX_DIR_INGRESS, src_id, dst_id, now, &v))
        return TC_ACT_SHOT;
    __u16 redirect = from_proxy ? 0 : v.proxy_port;
    __u32 mark = redirect ? ax_to_proxy_mark(redirect, src_id) : 0;
    int ct = ax_ct_forward(ce, &p, now, ep_id, src_id, dst_id, redirect,
                           from_proxy ? AX_CT_CACHE_NONE : AX_CT_CACHE_TO_CONTAINER, rev, mark);
    if (ct < 0)
        return ax_ct_create_failed(&p, AX_DIR_INGRESS, ep_id, src_id, dst_id, now);
    if (ct > 0) {
        if (host)
            ax_emit(&p, AX_EVENT_POLICY_VERDICT, AX_ALLOWED_VERDICT(&vh, 0),
                    AX_DIR_EGRESS, host->ep_id, src_id, dst_id, &vh, now);
        ax_emit(&p, AX_EVENT_POLICY_VERDICT, AX_ALLOWED_VERDICT(&v, redirect),
                AX_DIR_INGRESS, ep_id, src_id, dst_id, &v, now);
    }
    return ax_pass(skb, mark, redirect != 0);
}
