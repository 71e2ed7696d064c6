/* Local endpoints: who sits behind each host-side veth. */
#ifndef AXONEME_ENDPOINT_H
#define AXONEME_ENDPOINT_H

#include "lib/common.h"

#define AX_EP_F_ENFORCE_INGRESS 1
#define AX_EP_F_ENFORCE_EGRESS 2

/* Value of both endpoint maps. ifname/ifindex let cleanup() find the tc
 * filters a previous agent attached. The enforce flags are informational:
 * the policy map alone decides (the agent writes an allow-all wildcard entry
 * for a direction it does not enforce). */
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

static __always_inline struct ax_endpoint *ax_lxc_lookup(__u8 family, const __u8 *addr)
{
    struct ax_lxc_key k = {};
    k.family = family;
    __builtin_memcpy(k.addr, addr, 16);
    return ax_lxc.lookup(&k);
}

#endif
