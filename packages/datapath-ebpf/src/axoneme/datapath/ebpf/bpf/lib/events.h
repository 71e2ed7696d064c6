/* Verdict/drop events to user space, with monitor aggregation, and counters. */
#ifndef AXONEME_EVENTS_H
#define AXONEME_EVENTS_H

#include "lib/common.h"
#include "lib/parse.h"
#include "lib/policy.h"

#define AX_EVENT_DROP 1
#define AX_EVENT_POLICY_VERDICT 2

#define AX_VERDICT_DROPPED 0
#define AX_VERDICT_FORWARDED 1
#define AX_VERDICT_REDIRECTED 2
#define AX_VERDICT_AUDIT 3        /* forwarded, but a staged policy or audit mode would drop it */

/* The verdict of a new connection's policy-verdict event. */
#define AX_ALLOWED_VERDICT(v, redirected) \
    ((redirected) ? AX_VERDICT_REDIRECTED : (v)->audit ? AX_VERDICT_AUDIT : AX_VERDICT_FORWARDED)

/* One ring buffer record. Ports host order (for ICMP: type/code fields). */
struct ax_event {
    __u64 ktime;
    __u32 ep_id;          /* the endpoint whose policy decided */
    __u32 src_identity;
    __u32 dst_identity;
    __u32 len;
    __u16 reason;         /* drop reason, 0 when forwarded */
    __u16 proxy_port;
    __u16 sport;
    __u16 dport;
    __u8 type;            /* AX_EVENT_* */
    __u8 verdict;         /* AX_VERDICT_* */
    __u8 direction;       /* policy direction of ep_id */
    __u8 match_type;
    __u8 family;
    __u8 proto;
    __u8 tcp_flags;
    __u8 icmp_type;
    __u8 icmp_code;
    __u8 pad[3];
    __u8 saddr[16];
    __u8 daddr[16];
};

BPF_RINGBUF_OUTPUT(ax_events, AX_RINGBUF_PAGES);

/* axoneme_metrics_v1: per-CPU u64 counters, key = AX_METRIC_* slot. */
BPF_TABLE_PINNED("percpu_array", __u32, __u64, ax_metrics, AX_METRIC_MAX,
                 AX_PIN_ROOT "/axoneme_metrics_v1");

/* ax_dropagg (not pinned, rebuilt per run): key = struct ax_tuple of a
 * dropped packet with pad[0] = direction; value = ktime of its last drop
 * event. At most one drop event per flow per second. */
BPF_TABLE("lru_hash", struct ax_tuple, __u64, ax_dropagg, 16384);

static __always_inline void ax_metric_inc(__u32 slot)
{
    __u64 *c = ax_metrics.lookup(&slot);
    if (c)
        *c += 1;  /* per-CPU: no atomics needed */
}

static __always_inline void ax_emit(const struct ax_pkt *p, __u8 type, __u8 verdict, __u8 dir,
                                    __u32 ep_id, __u32 src_id, __u32 dst_id,
                                    const struct ax_verdict *v, __u64 now)
{
    struct ax_event *ev = ax_events.ringbuf_reserve(sizeof(struct ax_event));
    if (!ev) {
        ax_metric_inc(AX_METRIC_EVENTS_LOST);
        return;
    }
    ev->ktime = now;
    ev->ep_id = ep_id;
    ev->src_identity = src_id;
    ev->dst_identity = dst_id;
    ev->len = p->len;
    ev->reason = v->reason;
    ev->proxy_port = v->proxy_port;
    ev->sport = bpf_ntohs(p->t.sport);
    ev->dport = bpf_ntohs(p->t.dport);
    ev->type = type;
    ev->verdict = verdict;
    ev->direction = dir;
    ev->match_type = v->match_type;
    ev->family = p->t.family;
    ev->proto = p->t.proto;
    ev->tcp_flags = p->tcp_flags;
    ev->icmp_type = p->icmp_type;
    ev->icmp_code = p->icmp_code;
    ev->pad[0] = 0;
    ev->pad[1] = 0;
    ev->pad[2] = 0;
    __builtin_memcpy(ev->saddr, p->t.saddr, 16);
    __builtin_memcpy(ev->daddr, p->t.daddr, 16);
    ax_events.ringbuf_submit(ev, 0);
}

/* Drop event, aggregated per flow and direction (monitor aggregation). */
static __always_inline void ax_emit_drop(const struct ax_pkt *p, __u8 dir, __u32 ep_id,
                                         __u32 src_id, __u32 dst_id,
                                         const struct ax_verdict *v, __u64 now)
{
    struct ax_tuple k = p->t;
    k.pad[0] = dir;
    __u64 *last = ax_dropagg.lookup(&k);
    ax_metric_inc(AX_METRIC_DROPPED);
    if (last && now - *last < AX_NSEC_PER_SEC) {
        ax_metric_inc(AX_METRIC_EVENTS_SUPPRESSED);
        return;
    }
    ax_dropagg.update(&k, &now);
    ax_emit(p, AX_EVENT_DROP, AX_VERDICT_DROPPED, dir, ep_id, src_id, dst_id, v, now);
}

#endif
