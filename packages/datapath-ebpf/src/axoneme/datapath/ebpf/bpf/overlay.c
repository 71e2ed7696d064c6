/* tc on the tunnel device (a collect_md "external" VXLAN device, Cilium's
 * bpf_overlay on cilium_vxlan): the source's security identity travels in
 * the VXLAN header's VNI, so the receiving node judges a packet by the
 * identity of the pod that sent it, even before (or without) an ipcache
 * entry for its address.
 *
 * ax_to_overlay (tc egress: packets the node sends into the tunnel)
 * 1. Only IPv4 is tunnelled (the routes to other nodes' pod CIDRs are IPv4);
 *    anything else passes and the device, lacking a tunnel key, drops it.
 * 2. The identity for the VNI: a local endpoint's own; else the ipcache's
 *    (host for the node's own addresses), if it fits the VNI's 24 bits and is
 *    not a node-local CIDR identity; else world.
 * 3. The remote node: the next hop of the kernel's route to the destination
 *    (`<pod CIDR> via <node IP> dev axon_vxlan onlink`, bpf_fib_lookup), so
 *    the routes stay the one place that says where a pod CIDR lives. No
 *    route through this device: dropped (the device could not send it).
 * 4. bpf_skb_set_tunnel_key: remote = that node, tunnel_id = the identity.
 *
 * ax_from_overlay (tc ingress: packets the tunnel delivered)
 * 1. A packet to a local endpoint: the identity is the VNI's when it names
 *    one (host -> remote-node, as Cilium: the sender's own node); 0 or world
 *    (nothing better known by the sender) -> the ipcache's, else world.
 * 2. The endpoint's INGRESS policy decides here, before routing
 *    (ax_deliver_local, lib/deliver.h): CHECKED for to-container, or the
 *    TO_PROXY mark for an L7 rule. Other packets pass.
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

#define AX_VNI_MAX 0xFFFFFF

/* The identity a packet carries in the VNI (step 2 of ax_to_overlay). */
static __always_inline __u32 ax_overlay_source_identity(const struct ax_pkt *p)
{
    struct ax_endpoint *src = ax_lxc_lookup(p->t.family, p->t.saddr);
    if (src)
        return src->identity;
    __u32 id = ax_ipcache_identity(p->t.family, p->t.saddr);
    if (id == 0 || id > AX_VNI_MAX)
        return AX_ID_WORLD;
    return id;
}

int ax_to_overlay(struct __sk_buff *skb)
{
    struct ax_pkt p = {};
    int rc = ax_parse(skb, &p);
    if (rc < 0 || rc == AX_PARSE_PASS || p.t.family != 4)
        return TC_ACT_OK;
    struct bpf_fib_lookup fib = {};
    fib.family = 2; /* AF_INET */
    fib.l4_protocol = p.t.proto;
    /* tot_len 0: the kernel checks the skb against the device's MTU */
    fib.ifindex = skb->ifindex;
    __builtin_memcpy(&fib.ipv4_src, p.t.saddr, 4);
    __builtin_memcpy(&fib.ipv4_dst, p.t.daddr, 4);
    int r = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
    if ((r != BPF_FIB_LKUP_RET_SUCCESS && r != BPF_FIB_LKUP_RET_NO_NEIGH)
        || fib.ifindex != skb->ifindex)
        return TC_ACT_SHOT;
    struct bpf_tunnel_key key = {};
    key.tunnel_id = ax_overlay_source_identity(&p);
    key.remote_ipv4 = bpf_ntohl(fib.ipv4_dst);
    key.tunnel_ttl = 64;
    if (bpf_skb_set_tunnel_key(skb, &key, sizeof(key), BPF_F_ZERO_CSUM_TX) < 0)
        return TC_ACT_SHOT;
    return TC_ACT_OK;
}

/* The sender's identity from the VNI (step 1 of ax_from_overlay); 0: none. */
static __always_inline __u32 ax_overlay_vni_identity(struct __sk_buff *skb)
{
    struct bpf_tunnel_key key = {};
    if (bpf_skb_get_tunnel_key(skb, &key, sizeof(key), 0) < 0)
        return 0;
    __u32 id = key.tunnel_id;
    if (id == AX_ID_HOST)
        return AX_ID_REMOTE_NODE;
    if (id == 0 || id == AX_ID_WORLD || id > AX_VNI_MAX)
        return 0;
    return id;
}

int ax_from_overlay(struct __sk_buff *skb)
{
    struct ax_pkt p = {};
    int rc = ax_parse(skb, &p);
    if (rc < 0 || rc == AX_PARSE_PASS || p.is_nd)
        return TC_ACT_OK;  /* to-container decides (an invalid header is dropped there) */
    struct ax_endpoint *dst = ax_lxc_lookup(p.t.family, p.t.daddr);
    if (!dst)
        return TC_ACT_OK;
    __u32 src_id = ax_overlay_vni_identity(skb);
    if (!src_id)
        src_id = ax_remote_identity(p.t.family, p.t.saddr, 0);
    return ax_deliver_local(skb, &p, dst, src_id, AX_CT_CACHE_FROM_OVERLAY,
                            bpf_ktime_get_ns());
}
