/* Local endpoints: who sits behind each host-side veth. */
#ifndef AXONEME_ENDPOINT_H
#define AXONEME_ENDPOINT_H

#include "lib/common.h"

#define AX_EP_F_ENFORCE_INGRESS 1
#define AX_EP_F_ENFORCE_EGRESS 2
#define AX_EP_F_FAIL_CLOSED_INGRESS 4
#define AX_EP_F_FAIL_CLOSED_EGRESS 8
#define AX_EP_F_NO_WILD_INGRESS 16
#define AX_EP_F_NO_WILD_EGRESS 32
#define AX_EP_F_NO_ADDR 64

/* Value of both endpoint maps. ifname/ifindex let cleanup() find the tc
 * filters a previous agent attached. The enforce flags are informational:
 * the policy map alone decides (the agent writes an allow-all wildcard entry
 * for a direction it does not enforce). A FAIL_CLOSED flag overrides the
 * policy map: the endpoint's new policy could not be written (map full), so
 * every packet it would decide in that direction is dropped
 * (AX_DROP_EP_NOT_READY) rather than decided by the stale, older policy.
 * The NO_* flags let the policy decision skip lookups that would miss: the
 * endpoint has no wildcard (identity 0) key in that direction (NO_WILD_*),
 * no address key at all (NO_ADDR). The agent clears a NO_* flag before it
 * writes the first such key and sets it after the last one is deleted; a
 * record without them (an older agent's) just does every lookup. */
struct ax_endpoint {
    __u32 ep_id;
    __u32 identity;
    __u32 ifindex;
    __u32 flags;
    __u8 ipv4[4];
    __u8 ipv6[16];
    char ifname[16];
};

/* axoneme_endpoints_v1: key = host-side ifindex (u32, host order), the
 * interface the tc programs run on. */
BPF_TABLE_PINNED("hash", __u32, struct ax_endpoint, ax_endpoints, AX_EP_MAX,
                 AX_PIN_ROOT "/axoneme_endpoints_v1");

/* The host endpoint (host firewall) is also recorded under key 0 (no
 * interface has ifindex 0), so the pod programs find it: traffic between the
 * host and its local pods meets the host's policy too, as Cilium's. */
#define AX_HOST_EP_KEY 0

static __always_inline struct ax_endpoint *ax_host_endpoint(void)
{
    __u32 k = AX_HOST_EP_KEY;
    return ax_endpoints.lookup(&k);
}

/* axoneme_lxc_v1 key: an endpoint's own address. family 4 or 6, IPv4 in
 * addr[0..3] with the rest zero. Lets from-container find a local destination
 * endpoint and apply its ingress policy before routing. */
struct ax_lxc_key {
    __u8 family;
    __u8 pad[3];
    __u8 addr[16];
};

BPF_TABLE_PINNED("hash", struct ax_lxc_key, struct ax_endpoint, ax_lxc, AX_EP_MAX * 2,
                 AX_PIN_ROOT "/axoneme_lxc_v1");

static __always_inline int ax_ep_failing_closed(const struct ax_endpoint *ep, __u8 dir)
{
    __u32 bit = dir == AX_DIR_INGRESS ? AX_EP_F_FAIL_CLOSED_INGRESS : AX_EP_F_FAIL_CLOSED_EGRESS;
    return (ep->flags & bit) != 0;
}

static __always_inline int ax_ep_no_wild(const struct ax_endpoint *ep, __u8 dir)
{
    __u32 bit = dir == AX_DIR_INGRESS ? AX_EP_F_NO_WILD_INGRESS : AX_EP_F_NO_WILD_EGRESS;
    return (ep->flags & bit) != 0;
}

static __always_inline struct ax_endpoint *ax_lxc_lookup(__u8 family, const __u8 *addr)
{
    struct ax_lxc_key k = {};
    k.family = family;
    __builtin_memcpy(k.addr, addr, 16);
    return ax_lxc.lookup(&k);
}

#endif
