/* Connection tracking: only used to let reply traffic of allowed connections
 * through. Forward packets are policed every time (revocation hits
 * established connections on their next forward packet). */
#ifndef AXONEME_CONNTRACK_H
#define AXONEME_CONNTRACK_H

#include "lib/common.h"
#include "lib/parse.h"
#include "lib/events.h"

/* axoneme_ct_v1 (LRU hash) key: struct ax_tuple (parse.h) of the packet that
 * opened the connection, i.e. the forward orientation. A packet whose
 * reversed tuple is present is a reply.
 *
 * Verdict cache: a forward packet is decided by the policy maps unless the
 * entry holds a verdict computed at the current policy revision
 * (axoneme_rev_v1, bumped by the agent after every policy, ipcache or
 * endpoint change). So every forward packet still sees the current policy
 * (revocation drops the next packet), without walking the LPM tries again
 * for packets of a connection when nothing changed. */
struct ax_ct_entry {
    __u64 created;     /* ktime ns */
    __u64 last_seen;   /* ktime ns of the last forward or reply packet */
    __u64 packets;     /* forward packets */
    __u64 bytes;
    __u64 reply_packets;
    __u32 src_identity;
    __u32 dst_identity;
    __u32 ep_id;       /* endpoint whose policy opened it (first decider) */
    __u16 proxy_port;
    __u8 flags;
    __u8 cache_owner;  /* AX_CT_CACHE_*: which program cached the verdict */
    __u32 policy_rev;  /* revision the cached verdict was computed at */
    __u32 cached_mark; /* skb->mark an allowed packet gets (0: none) */
};

#define AX_CT_CACHE_NONE 0
#define AX_CT_CACHE_FROM_CONTAINER 1
#define AX_CT_CACHE_TO_CONTAINER 2
#define AX_CT_CACHE_FROM_NETDEV 3
#define AX_CT_CACHE_TO_NETDEV 4
#define AX_CT_CACHE_NETDEV_LOCAL 5  /* from-netdev deciding for a local endpoint (deliver.h) */
#define AX_CT_CACHE_FROM_OVERLAY 6  /* from-overlay deciding for a local endpoint (overlay.c) */

/* axoneme_rev_v1: one u64, the policy revision (pinned: programs of a
 * previous agent run and the current one must see the same revision). */
BPF_TABLE_PINNED("array", __u32, __u64, ax_rev, 1, AX_PIN_ROOT "/axoneme_rev_v1");

static __always_inline __u32 ax_policy_rev(void)
{
    __u32 zero = 0;
    __u64 *r = ax_rev.lookup(&zero);
    return r ? (__u32)*r : 0;
}

#define AX_CT_F_CLOSING 1

/* Lifetimes (Cilium defaults): TCP 6 h, after FIN/RST 10 s, others 60 s. */
#define AX_CT_LIFETIME_TCP (21600ULL * AX_NSEC_PER_SEC)
#define AX_CT_LIFETIME_CLOSE (10ULL * AX_NSEC_PER_SEC)
#define AX_CT_LIFETIME_OTHER (60ULL * AX_NSEC_PER_SEC)

BPF_TABLE_PINNED("lru_hash", struct ax_tuple, struct ax_ct_entry, ax_ct, AX_CT_MAX,
                 AX_PIN_ROOT "/axoneme_ct_v1");

static __always_inline int ax_ct_alive(const struct ax_ct_entry *e, __u8 proto, __u64 now)
{
    __u64 life = AX_CT_LIFETIME_OTHER;
    if (proto == IPPROTO_TCP)
        life = (e->flags & AX_CT_F_CLOSING) ? AX_CT_LIFETIME_CLOSE : AX_CT_LIFETIME_TCP;
    return now - e->last_seen < life;
}

static __always_inline void ax_tuple_reverse(const struct ax_tuple *in, struct ax_tuple *out)
{
    __builtin_memcpy(out->saddr, in->daddr, 16);
    __builtin_memcpy(out->daddr, in->saddr, 16);
    out->sport = in->dport;
    out->dport = in->sport;
    out->proto = in->proto;
    out->family = in->family;
    out->pad[0] = 0;
    out->pad[1] = 0;
}

/* TCP FIN or RST seen: shorten the lifetime of the entry. */
static __always_inline void ax_ct_note_flags(struct ax_ct_entry *e, const struct ax_pkt *p)
{
    if (p->t.proto == IPPROTO_TCP && (p->tcp_flags & 0x05))
        e->flags |= AX_CT_F_CLOSING;
}

/* Returns 1 when the packet is a reply of a live tracked connection. */
static __always_inline int ax_ct_is_reply(struct ax_pkt *p, __u64 now)
{
    struct ax_tuple r;
    ax_tuple_reverse(&p->t, &r);
    struct ax_ct_entry *e = ax_ct.lookup(&r);
    if (!e || !ax_ct_alive(e, p->t.proto, now))
        return 0;
    e->last_seen = now;
    __sync_fetch_and_add(&e->reply_packets, 1);
    ax_ct_note_flags(e, p);
    return 1;
}

/* The live CT entry of this forward tuple, or NULL. */
static __always_inline struct ax_ct_entry *ax_ct_forward_lookup(struct ax_pkt *p, __u64 now)
{
    struct ax_ct_entry *e = ax_ct.lookup(&p->t);
    if (e && !ax_ct_alive(e, p->t.proto, now))
        return 0;
    return e;
}

/* Fast path: the entry caches a verdict of the current revision for this
 * program. Returns 1 (and accounts the packet) when it does. */
static __always_inline int ax_ct_cached(struct ax_ct_entry *e, struct ax_pkt *p, __u64 now,
                                        __u8 owner, __u32 rev)
{
    if (!e || e->cache_owner != owner || e->policy_rev != rev)
        return 0;
    e->last_seen = now;
    __sync_fetch_and_add(&e->packets, 1);
    __sync_fetch_and_add(&e->bytes, p->len);
    ax_ct_note_flags(e, p);
    return 1;
}

/* The CT fast path, run by both programs before any policy lookup.
 * ``owner``: the calling program's AX_CT_CACHE_*. Returns 1 when the packet
 * is decided already (the caller passes it):
 * 1. the live forward entry caches a verdict of the current revision for
 *    this program: its mark (a redirect, CHECKED) is set again. Never for a
 *    packet from the ingress proxy (``from_proxy``): it must not be
 *    redirected again, so policy decides it every time;
 * 2. there is no live forward entry and the packet is a reply of a live
 *    connection (one CT lookup for established forward traffic, two for
 *    replies).
 * Returns 0 when policy must decide; then ``*ce`` is the live forward entry
 * (or NULL) and ``*rev`` the revision, both for ax_ct_forward. The revision
 * is read before any policy lookup: a change racing with this packet bumps
 * it afterwards and invalidates what the caller caches. */
static __always_inline int ax_ct_fast_path(struct __sk_buff *skb, struct ax_pkt *p, __u64 now,
                                           __u8 owner, int from_proxy,
                                           struct ax_ct_entry **ce, __u32 *rev)
{
    *rev = ax_policy_rev();
    struct ax_ct_entry *e = ax_ct_forward_lookup(p, now);
    *ce = e;
    if (!from_proxy && ax_ct_cached(e, p, now, owner, *rev)) {
        if (e->cached_mark)
            skb->mark = e->cached_mark;
        ax_metric_inc(AX_METRIC_FORWARDED);
        return 1;
    }
    if (!e && ax_ct_is_reply(p, now)) {
        ax_metric_inc(AX_METRIC_REPLY);
        return 1;
    }
    return 0;
}

/* Record an allowed forward packet (``e`` from ax_ct_forward_lookup) and
 * cache its verdict. Returns 1 if the connection is new, 0 if it was already
 * tracked, <0 if the entry could not be created. */
static __always_inline int ax_ct_forward(struct ax_ct_entry *e, struct ax_pkt *p, __u64 now,
                                         __u32 ep_id, __u32 src_id, __u32 dst_id,
                                         __u16 proxy_port, __u8 owner, __u32 rev, __u32 mark)
{
    if (e) {
        e->last_seen = now;
        __sync_fetch_and_add(&e->packets, 1);
        __sync_fetch_and_add(&e->bytes, p->len);
        e->proxy_port = proxy_port;
        e->cache_owner = owner;
        e->policy_rev = rev;
        e->cached_mark = mark;
        /* a new SYN on a closing tuple reopens it */
        if (p->t.proto == IPPROTO_TCP && (p->tcp_flags & 0x02) && !(p->tcp_flags & 0x10))
            e->flags &= ~AX_CT_F_CLOSING;
        ax_ct_note_flags(e, p);
        return 0;
    }
    struct ax_ct_entry n = {};
    n.created = now;
    n.last_seen = now;
    n.packets = 1;
    n.bytes = p->len;
    n.src_identity = src_id;
    n.dst_identity = dst_id;
    n.ep_id = ep_id;
    n.proxy_port = proxy_port;
    n.cache_owner = owner;
    n.policy_rev = rev;
    n.cached_mark = mark;
    ax_ct_note_flags(&n, p);
    if (ax_ct.update(&p->t, &n) < 0)
        return -1;
    return 1;
}

#endif
