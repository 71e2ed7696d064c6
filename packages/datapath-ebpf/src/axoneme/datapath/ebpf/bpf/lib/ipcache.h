/* ipcache: IP/prefix -> security identity. */
#ifndef AXONEME_IPCACHE_H
#define AXONEME_IPCACHE_H

#include "lib/common.h"

/* axoneme_ipcache_v1 (LPM trie) key. The LPM data starts at `family`:
 * prefixlen = 32 (family + pad, always matched) + the address prefix.
 * IPv4 in addr[0..3] (network order), IPv6 in addr[0..15]. One trie holds
 * both families; the family byte keeps them apart. */
struct ax_ipcache_key {
    __u32 prefixlen;
    __u8 family;
    __u8 pad[3];
    __u8 addr[16];
};

#define AX_IPCACHE_F_NODE 1  /* written by the datapath: a node address (host) */

struct ax_ipcache_value {
    __u32 identity;
    __u32 flags;
};

BPF_TABLE_PINNED("lpm_trie", struct ax_ipcache_key, struct ax_ipcache_value, ax_ipcache,
                 AX_IPCACHE_MAX, AX_PIN_ROOT "/axoneme_ipcache_v1", BPF_F_NO_PREALLOC);

/* axoneme_ipcache_host_v1: the host entries (/32, /128) live in this hash
 * instead of the trie, which holds only the shorter prefixes. Same key (with
 * the full prefixlen) and value. An exact match is the longest prefix, so
 * hash, else trie, is the longest match over all entries, and a pod or node
 * address costs one hash lookup however many entries there are. */
BPF_TABLE_PINNED("hash", struct ax_ipcache_key, struct ax_ipcache_value, ax_ipcache_host,
                 AX_IPCACHE_MAX, AX_PIN_ROOT "/axoneme_ipcache_host_v1", BPF_F_NO_PREALLOC);

/* Identity of an address; 0 when the ipcache has no covering prefix. */
static __always_inline __u32 ax_ipcache_identity(__u8 family, const __u8 *addr)
{
    struct ax_ipcache_key k = {};
    k.prefixlen = 32 + (family == 4 ? 32 : 128);
    k.family = family;
    __builtin_memcpy(k.addr, addr, 16);
    struct ax_ipcache_value *v = ax_ipcache_host.lookup(&k);
    if (!v)
        v = ax_ipcache.lookup(&k);
    return v ? v->identity : 0;
}

#endif
