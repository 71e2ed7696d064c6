/* Connection tracking: only used to let reply traffic of allowed connections
 * through. Forward packets are policed every time (revocation hits
 * established connections on their next forward packet). */
#ifndef AXONEME_CONNTRACK_H
#define AXONEME_CONNTRACK_H

#include "lib/common.h"
#include "lib/parse.h"

/* axoneme_ct_v1 (LRU hash) key: struct ax_tuple (parse.h) of the packet that
 * opened the connection, i.e. the forward orientation. A packet whose
 * reversed tuple is present is a reply. */
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
    __u8 pad;
};

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

/* Record an allowed forward packet. Returns 1 if the connection is new,
 * 0 if it was already tracked, <0 if the entry could not be created. */
static __always_inline int ax_ct_forward(struct ax_pkt *p, __u64 now, __u32 ep_id,
                                         __u32 src_id, __u32 dst_id, __u16 proxy_port)
{
    struct ax_ct_entry *e = ax_ct.lookup(&p->t);
    if (e && ax_ct_alive(e, p->t.proto, now)) {
        e->last_seen = now;
        __sync_fetch_and_add(&e->packets, 1);
        __sync_fetch_and_add(&e->bytes, p->len);
        e->proxy_port = proxy_port;
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
    ax_ct_note_flags(&n, p);
    if (ax_ct.update(&p->t, &n) < 0)
        return -1;
    return 1;
}

#endif
