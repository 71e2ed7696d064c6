/* tc on the node's devices (Cilium's bpf_host on native devices): traffic
 * from other nodes and from outside the cluster to local endpoints, and the
 * host firewall (the host endpoint's policy for the node's own traffic).
 * The device's record in axoneme_endpoints_v1 is the host endpoint (ep_id
 * HOST_ENDPOINT_ID, identity host); without one the host firewall is off on
 * the device (its part passes everything).
 *
 * ax_from_netdev (tc ingress: packets entering the node through the device)
 * 0. A packet to a local endpoint: its INGRESS policy decides here, before
 *    routing, so an L7 rule redirects it to the proxy (ax_deliver_local,
 *    lib/deliver.h; peer = source identity: ipcache, else world).
 * 1. Only packets to the node itself are the host's: the destination's
 *    identity is host (the ipcache holds the node's addresses). Other
 *    forwarded packets pass.
 * 2. Replies of tracked connections (the host's own, opened on the way out)
 *    pass without policy.
 * 3. The host's INGRESS policy decides (peer = source identity: ipcache,
 *    else world), unless it fails closed in that direction.
 * 4. Allowed: tracked in CT; a new connection emits a policy-verdict event.
 *
 * ax_to_netdev (tc egress: packets leaving the node through the device)
 * 1. Only packets the node itself sends are the host's: the source's
 *    identity is host. Forwarded pod traffic passes (the pod decided).
 * 2.-4. as above with the host's EGRESS policy (peer = destination).
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
#include "lib/deliver.h"

static __always_inline int ax_host_netdev(struct __sk_buff *skb, struct ax_pkt *p, int rc,
                                          __u8 dir, __u8 owner, __u64 now)
{
    __u32 ifindex = skb->ifindex;
    struct ax_endpoint *ep = ax_endpoints.lookup(&ifindex);
    if (!ep)
        return TC_ACT_OK;
    if (rc == AX_PARSE_PASS)
        return TC_ACT_OK;
    if (rc < 0) {
        ax_drop_simple(p, dir, ep->ep_id, 0, 0, AX_DROP_CT_INVALID_HDR, now);
        return TC_ACT_SHOT;
    }
    if (p->is_nd)
        return TC_ACT_OK;
    __u32 src_id, dst_id;
    if (dir == AX_DIR_INGRESS) {
        if (ax_ipcache_identity(p->t.family, p->t.daddr) != AX_ID_HOST)
            return TC_ACT_OK;
        dst_id = AX_ID_HOST;
        src_id = ax_remote_identity(p->t.family, p->t.saddr, 0);
    } else {
        if (ax_ipcache_identity(p->t.family, p->t.saddr) != AX_ID_HOST)
            return TC_ACT_OK;
        src_id = AX_ID_HOST;
        dst_id = ax_peer_identity(p->t.family, p->t.daddr, 0);
    }
    struct ax_ct_entry *ce;
    __u32 rev;
    if (ax_ct_fast_path(skb, p, now, owner, 0, &ce, &rev))
        return TC_ACT_OK;
    struct ax_verdict v = {};
    if (ax_endpoint_drops(p, ep, dir, src_id, dst_id, now, &v))
        return TC_ACT_SHOT;
    int ct = ax_ct_forward(ce, p, now, ep->ep_id, src_id, dst_id, 0, owner, rev, 0);
    if (ct < 0)
        return ax_ct_create_failed(p, dir, ep->ep_id, src_id, dst_id, now);
    if (ct > 0)
        ax_emit(p, AX_EVENT_POLICY_VERDICT, AX_ALLOWED_VERDICT(&v, 0), dir, ep->ep_id,
                src_id, dst_id, &v, now);
    return ax_pass(skb, 0, 0);
}

int ax_from_netdev(struct __sk_buff *skb)
{
    struct ax_pkt p = {};
    int rc = ax_parse(skb, &p);
    __u64 now = bpf_ktime_get_ns();
    if (rc >= 0 && rc != AX_PARSE_PASS && !p.is_nd) {
        struct ax_endpoint *dst = ax_lxc_lookup(p.t.family, p.t.daddr);
        if (dst)
            return ax_deliver_local(skb, &p, dst, ax_remote_identity(p.t.family, p.t.saddr, 0),
                                    AX_CT_CACHE_NETDEV_LOCAL, now);
    }
    return ax_host_netdev(skb, &p, rc, AX_DIR_INGRESS, AX_CT_CACHE_FROM_NETDEV, now);
}

int ax_to_netdev(struct __sk_buff *skb)
{
    struct ax_pkt p = {};
    int rc = ax_parse(skb, &p);
    return ax_host_netdev(skb, &p, rc, AX_DIR_EGRESS, AX_CT_CACHE_TO_NETDEV, bpf_ktime_get_ns());
}
