/* Policy map and the decision procedure (mirror of core.mapstate.MapState.lookup). */
#ifndef AXONEME_POLICY_H
#define AXONEME_POLICY_H

#include "lib/common.h"

/* axoneme_policy_v1: one global LPM trie for every endpoint (with
 * axoneme_policy_hash_v1 below: the keys of prefix 72 and 96 live there).
 * LPM data = ep_id (4) | identity (4) | direction (1) | protocol (1) | dport (2)
 * | pad (4) = 128 bits, of which the first 96 are ever matched. ep_id, identity and direction are always matched (72 bits);
 * protocol ANY stops there (prefixlen 72, protocol/port 0); otherwise the
 * protocol byte (80) plus the port prefix: prefixlen = 80 + port prefix.
 * A port range is a set of port prefixes; ICMP keys carry the type in dport
 * with prefix 16. identity 0 is the wildcard peer. ep_id/identity are in host
 * order (always matched in full), dport in network order (prefix-matched).
 * pad (never matched, always 0) makes the LPM data 16 bytes: the kernel
 * stores the value right after the data in a trie node whose data starts at
 * offset 24, so with 12 bytes of data the entry's u64 counters sat at 4 mod 8
 * and the atomic add on `bytes` crossed a cache line in about every other
 * node: a split lock, ~1.3 us per packet in a VM (bench-results/b1-lookup.md).
 * With 16 bytes the value, and so each counter, is 8-byte aligned. */
struct ax_policy_key {
    __u32 prefixlen;
    __u32 ep_id;
    __u32 identity;
    __u8 direction;
    __u8 protocol;
    __be16 dport;
    __u32 pad;
};

#define AX_POLICY_STATIC_PREFIX 72
#define AX_POLICY_FULL_PREFIX 96

#define AX_POLICY_F_AUDIT 1
#define AX_POLICY_F_AUTH 2

/* l4_prefix mirrors core Key.l4_prefix (0 = ANY protocol, 1 + port prefix
 * otherwise) so the lookup can compare specificity without the matched key.
 * packets/bytes count the packets this entry decided (atomic adds). */
struct ax_policy_entry {
    __u16 proxy_port;
    __u8 deny;
    __u8 flags;
    __u8 l4_prefix;
    __u8 pad[3];
    __u64 packets;
    __u64 bytes;
};

BPF_TABLE_PINNED("lpm_trie", struct ax_policy_key, struct ax_policy_entry, ax_policy,
                 AX_POLICY_MAX, AX_PIN_ROOT "/axoneme_policy_v1", BPF_F_NO_PREALLOC);

/* axoneme_policy_hash_v1: the keys of prefix exactly 96 (a protocol and a
 * full port or ICMP type) or 72 (protocol ANY) live in this hash instead of
 * the trie, which holds only the others (protocol-only and port-range
 * prefixes, 80..95). Same key and value. A lookup is exact: the 96 key is
 * the longest possible match, a trie match is longer than the 72 key, so
 * hash(96), else trie, else hash(72) is the trie's longest match over all
 * keys, in a time that does not grow with the number of entries (a trie
 * walk is one node per branching bit: ~17 deep at 100k entries). */
BPF_TABLE_PINNED("hash", struct ax_policy_key, struct ax_policy_entry, ax_policy_hash,
                 AX_POLICY_MAX, AX_PIN_ROOT "/axoneme_policy_hash_v1", BPF_F_NO_PREALLOC);

/* axoneme_paddr_v1: address keys (core Key.address: one peer address,
 * whatever its identity; NetworkPolicy ipBlock over pods, per-destination
 * named ports). Per endpoint, each peer address that has address keys maps
 * to a slot; the address's keys live in axoneme_policy_v1 with the slot in
 * the identity field. Slots are AX_ADDR_SLOT_BASE + n, never an identity.
 * Key: ep_id (host order) | family (4 or 6) | pad | addr[16] (network
 * order, IPv4 in addr[0..3], the rest 0), as struct ax_tuple holds it. */
struct ax_paddr_key {
    __u32 ep_id;
    __u8 family;
    __u8 pad[3];
    __u8 addr[16];
};

struct ax_paddr_value {
    __u32 slot;
};

#define AX_ADDR_SLOT_BASE 0xFE000000

BPF_TABLE_PINNED("hash", struct ax_paddr_key, struct ax_paddr_value, ax_paddr,
                 AX_POLICY_MAX, AX_PIN_ROOT "/axoneme_paddr_v1", BPF_F_NO_PREALLOC);

struct ax_verdict {
    __u16 reason;      /* 0 = allowed, else AX_DROP_POLICY / AX_DROP_POLICY_DENY */
    __u16 proxy_port;  /* != 0: redirect to the L7 proxy */
    __u8 match_type;
    __u8 audit;        /* allowed by an AX_POLICY_F_AUDIT entry: reported as AUDIT */
    __u8 pad[2];
};

static __always_inline struct ax_policy_entry *
ax_policy_longest(__u32 ep_id, __u32 identity, __u8 dir, __u8 proto, __u16 port)
{
    struct ax_policy_key k = {};
    k.prefixlen = AX_POLICY_FULL_PREFIX;
    k.ep_id = ep_id;
    k.identity = identity;
    k.direction = dir;
    k.protocol = proto;
    k.dport = bpf_htons(port);
    struct ax_policy_entry *e = ax_policy_hash.lookup(&k);
    if (e)
        return e;
    e = ax_policy.lookup(&k);
    if (e)
        return e;
    k.prefixlen = AX_POLICY_STATIC_PREFIX;
    k.protocol = 0;
    k.dport = 0;
    return ax_policy_hash.lookup(&k);
}

static __always_inline void ax_policy_account(struct ax_policy_entry *e, __u32 len)
{
    __sync_fetch_and_add(&e->packets, 1);
    __sync_fetch_and_add(&e->bytes, len);
}

/* Longest L4 match among the address keys of the peer address (none: 0). */
static __always_inline struct ax_policy_entry *
ax_policy_address(__u32 ep_id, __u8 family, const __u8 *addr, __u8 dir, __u8 proto, __u16 port)
{
    struct ax_paddr_key k = {};
    k.ep_id = ep_id;
    k.family = family;
    __builtin_memcpy(k.addr, addr, 16);
    struct ax_paddr_value *slot = ax_paddr.lookup(&k);
    if (!slot)
        return 0;
    return ax_policy_longest(ep_id, slot->slot, dir, proto, port);
}

/* Decide one packet for one endpoint and direction (mirror of
 * core.mapstate.MapState.lookup). Precedence:
 * 1. Longest L4 match among keys for the peer identity (the LPM lookup),
 *    among the address keys of the peer address, and among wildcard
 *    (identity 0) keys.
 * 2. A deny from any of them wins, regardless of specificity.
 * 3. Otherwise the longest L4 prefix decides; a tie goes to the address
 *    entry, then the identity-specific one.
 * 4. No match: dropped with DROP_POLICY (default deny).
 * 5. An allow entry with AX_POLICY_F_AUDIT (a staged policy or audit mode
 *    would drop the packet) allows it; the new connection's verdict event
 *    says AUDIT instead of FORWARDED.
 * ``no_addr`` / ``no_wild``: the agent knows the endpoint has no address
 * keys / no wildcard keys in this direction (AX_EP_F_NO_*, lib/endpoint.h),
 * so those lookups would miss: they are skipped. */
static __always_inline void ax_policy_decide(__u32 ep_id, __u32 identity, __u8 family,
                                             const __u8 *peer_addr, __u8 dir,
                                             __u8 proto, __u16 port, __u32 len,
                                             int no_addr, int no_wild, struct ax_verdict *v)
{
    struct ax_policy_entry *spec = 0, *wild = 0, *addr = 0, *chosen = 0;
    __u8 specific = 0;

    if (identity)
        spec = ax_policy_longest(ep_id, identity, dir, proto, port);
    if (!no_addr)
        addr = ax_policy_address(ep_id, family, peer_addr, dir, proto, port);
    if (!no_wild)
        wild = ax_policy_longest(ep_id, 0, dir, proto, port);
    v->proxy_port = 0;
    v->reason = 0;
    v->audit = 0;
    if (addr && addr->deny) {
        chosen = addr;
        specific = 1;
        v->reason = AX_DROP_POLICY_DENY;
    } else if (spec && spec->deny) {
        chosen = spec;
        specific = 1;
        v->reason = AX_DROP_POLICY_DENY;
    } else if (wild && wild->deny) {
        chosen = wild;
        v->reason = AX_DROP_POLICY_DENY;
    } else {
        if (addr) {
            chosen = addr;
            specific = 1;
        }
        if (spec && (!chosen || spec->l4_prefix > chosen->l4_prefix)) {
            chosen = spec;
            specific = 1;
        }
        if (wild && (!chosen || wild->l4_prefix > chosen->l4_prefix)) {
            chosen = wild;
            specific = 0;
        }
    }
    if (!chosen) {
        v->reason = AX_DROP_POLICY;
        v->match_type = AX_MATCH_NONE;
        return;
    }
    if (specific)
        v->match_type = chosen->l4_prefix ? AX_MATCH_L3_L4 : AX_MATCH_L3_ONLY;
    else
        v->match_type = chosen->l4_prefix ? AX_MATCH_L4_ONLY : AX_MATCH_ALL;
    if (!v->reason) {
        v->proxy_port = chosen->proxy_port;
        v->audit = (chosen->flags & AX_POLICY_F_AUDIT) && !chosen->proxy_port;
    }
    ax_policy_account(chosen, len);
}

#endif
