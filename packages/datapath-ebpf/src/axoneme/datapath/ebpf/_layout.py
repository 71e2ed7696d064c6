"""ctypes mirrors of the BPF map structs and the constants Python shares with C.

Every struct here is a wire format with the kernel programs: a privileged test
(``test_ctypes_mirrors_match_c_structs`` in packages/datapath-ebpf/tests/test_ebpf_maps.py)
compiles the C and checks each struct of ``MIRRORS``: size, field names, offsets.
The skb marks are not here: they come from ``axoneme.core.marks`` (``_bpf.MARK_DEFINES``).
"""

from __future__ import annotations

import ctypes as ct

# DO NOT CHANGE: mirrors lib/common.h
DIR_INGRESS = 0
DIR_EGRESS = 1
ID_HOST = 1
ID_WORLD = 2
METRIC_EVENTS_SUPPRESSED = 0
METRIC_EVENTS_LOST = 1
METRIC_CT_CREATE_FAILED = 2
METRIC_DROPPED = 3
METRIC_FORWARDED = 4
METRIC_REDIRECTED = 5
METRIC_REPLY = 6
METRIC_UNKNOWN_ENDPOINT = 7
METRIC_NAMES = {
    METRIC_EVENTS_SUPPRESSED: "events_suppressed",
    METRIC_EVENTS_LOST: "events_lost",
    METRIC_CT_CREATE_FAILED: "ct_create_failed",
    METRIC_DROPPED: "packets_dropped",
    METRIC_FORWARDED: "packets_forwarded",
    METRIC_REDIRECTED: "packets_redirected",
    METRIC_REPLY: "packets_reply",
    METRIC_UNKNOWN_ENDPOINT: "packets_unknown_endpoint",
}
# DO NOT CHANGE: mirrors lib/endpoint.h
EP_F_ENFORCE_INGRESS = 1
EP_F_ENFORCE_EGRESS = 2
EP_F_FAIL_CLOSED_INGRESS = 4
EP_F_FAIL_CLOSED_EGRESS = 8
EP_F_NO_WILD_INGRESS = 16
EP_F_NO_WILD_EGRESS = 32
EP_F_NO_ADDR = 64
# DO NOT CHANGE: mirrors lib/ipcache.h
IPCACHE_F_NODE = 1
# DO NOT CHANGE: mirrors lib/policy.h
POLICY_STATIC_PREFIX = 72
POLICY_FULL_PREFIX = 96
POLICY_F_AUDIT = 1
POLICY_F_AUTH = 2
# DO NOT CHANGE: mirrors lib/events.h
EVENT_DROP = 1
EVENT_POLICY_VERDICT = 2
VERDICT_DROPPED = 0
VERDICT_FORWARDED = 1
VERDICT_REDIRECTED = 2
VERDICT_AUDIT = 3
MATCH_TYPES = {0: "", 1: "L3_ONLY", 2: "L3_L4", 3: "L4_ONLY", 4: "ALL"}


class Endpoint(ct.Structure):
    # DO NOT CHANGE: mirrors struct ax_endpoint in lib/endpoint.h
    _fields_ = [
        ("ep_id", ct.c_uint32),
        ("identity", ct.c_uint32),
        ("ifindex", ct.c_uint32),
        ("flags", ct.c_uint32),
        ("ipv4", ct.c_uint8 * 4),
        ("ipv6", ct.c_uint8 * 16),
        ("ifname", ct.c_char * 16),
    ]


class LxcKey(ct.Structure):
    # DO NOT CHANGE: mirrors struct ax_lxc_key in lib/endpoint.h
    _fields_ = [
        ("family", ct.c_uint8),
        ("pad", ct.c_uint8 * 3),
        ("addr", ct.c_uint8 * 16),
    ]


class IPCacheKey(ct.Structure):
    # DO NOT CHANGE: mirrors struct ax_ipcache_key in lib/ipcache.h
    _fields_ = [
        ("prefixlen", ct.c_uint32),
        ("family", ct.c_uint8),
        ("pad", ct.c_uint8 * 3),
        ("addr", ct.c_uint8 * 16),
    ]


class IPCacheValue(ct.Structure):
    # DO NOT CHANGE: mirrors struct ax_ipcache_value in lib/ipcache.h
    _fields_ = [
        ("identity", ct.c_uint32),
        ("flags", ct.c_uint32),
    ]


class PolicyKey(ct.Structure):
    # DO NOT CHANGE: mirrors struct ax_policy_key in lib/policy.h
    _fields_ = [
        ("prefixlen", ct.c_uint32),
        ("ep_id", ct.c_uint32),
        ("identity", ct.c_uint32),
        ("direction", ct.c_uint8),
        ("protocol", ct.c_uint8),
        ("dport", ct.c_uint16),  # network byte order
        ("pad", ct.c_uint32),  # 0: aligns the trie node's value (see lib/policy.h)
    ]


# DO NOT CHANGE: mirrors AX_ADDR_SLOT_BASE in lib/policy.h
ADDR_SLOT_BASE = 0xFE000000


class PolicyAddrKey(ct.Structure):
    # DO NOT CHANGE: mirrors struct ax_paddr_key in lib/policy.h
    _fields_ = [
        ("ep_id", ct.c_uint32),
        ("family", ct.c_uint8),
        ("pad", ct.c_uint8 * 3),
        ("addr", ct.c_uint8 * 16),
    ]


class PolicyAddrValue(ct.Structure):
    # DO NOT CHANGE: mirrors struct ax_paddr_value in lib/policy.h
    _fields_ = [
        ("slot", ct.c_uint32),
    ]


class PolicyEntry(ct.Structure):
    # DO NOT CHANGE: mirrors struct ax_policy_entry in lib/policy.h
    _fields_ = [
        ("proxy_port", ct.c_uint16),
        ("deny", ct.c_uint8),
        ("flags", ct.c_uint8),
        ("l4_prefix", ct.c_uint8),
        ("pad", ct.c_uint8 * 3),
        ("packets", ct.c_uint64),
        ("bytes", ct.c_uint64),
    ]


class Tuple(ct.Structure):
    # DO NOT CHANGE: mirrors struct ax_tuple in lib/parse.h
    _fields_ = [
        ("saddr", ct.c_uint8 * 16),
        ("daddr", ct.c_uint8 * 16),
        ("sport", ct.c_uint16),
        ("dport", ct.c_uint16),
        ("proto", ct.c_uint8),
        ("family", ct.c_uint8),
        ("pad", ct.c_uint8 * 2),
    ]


class CTEntry(ct.Structure):
    # DO NOT CHANGE: mirrors struct ax_ct_entry in lib/conntrack.h
    _fields_ = [
        ("created", ct.c_uint64),
        ("last_seen", ct.c_uint64),
        ("packets", ct.c_uint64),
        ("bytes", ct.c_uint64),
        ("reply_packets", ct.c_uint64),
        ("src_identity", ct.c_uint32),
        ("dst_identity", ct.c_uint32),
        ("ep_id", ct.c_uint32),
        ("proxy_port", ct.c_uint16),
        ("flags", ct.c_uint8),
        ("cache_owner", ct.c_uint8),
        ("policy_rev", ct.c_uint32),
        ("cached_mark", ct.c_uint32),
    ]


class Event(ct.Structure):
    # DO NOT CHANGE: mirrors struct ax_event in lib/events.h
    _fields_ = [
        ("ktime", ct.c_uint64),
        ("ep_id", ct.c_uint32),
        ("src_identity", ct.c_uint32),
        ("dst_identity", ct.c_uint32),
        ("len", ct.c_uint32),
        ("reason", ct.c_uint16),
        ("proxy_port", ct.c_uint16),
        ("sport", ct.c_uint16),
        ("dport", ct.c_uint16),
        ("type", ct.c_uint8),
        ("verdict", ct.c_uint8),
        ("direction", ct.c_uint8),
        ("match_type", ct.c_uint8),
        ("family", ct.c_uint8),
        ("proto", ct.c_uint8),
        ("tcp_flags", ct.c_uint8),
        ("icmp_type", ct.c_uint8),
        ("icmp_code", ct.c_uint8),
        ("pad", ct.c_uint8 * 3),
        ("saddr", ct.c_uint8 * 16),
        ("daddr", ct.c_uint8 * 16),
    ]


# (ctypes mirror, C struct name) for the layout check.
MIRRORS: tuple[tuple[type[ct.Structure], str], ...] = (
    (Endpoint, "ax_endpoint"),
    (LxcKey, "ax_lxc_key"),
    (IPCacheKey, "ax_ipcache_key"),
    (IPCacheValue, "ax_ipcache_value"),
    (PolicyKey, "ax_policy_key"),
    (PolicyEntry, "ax_policy_entry"),
    (PolicyAddrKey, "ax_paddr_key"),
    (PolicyAddrValue, "ax_paddr_value"),
    (Tuple, "ax_tuple"),
    (CTEntry, "ax_ct_entry"),
    (Event, "ax_event"),
)


# pin name -> (key size, value size) the programs of this version expect
PINNED_SIZES = {
    "axoneme_policy_v1": (ct.sizeof(PolicyKey), ct.sizeof(PolicyEntry)),
    "axoneme_policy_hash_v1": (ct.sizeof(PolicyKey), ct.sizeof(PolicyEntry)),
    "axoneme_ipcache_host_v1": (ct.sizeof(IPCacheKey), ct.sizeof(IPCacheValue)),
    "axoneme_paddr_v1": (ct.sizeof(PolicyAddrKey), ct.sizeof(PolicyAddrValue)),
    "axoneme_ipcache_v1": (ct.sizeof(IPCacheKey), ct.sizeof(IPCacheValue)),
    "axoneme_endpoints_v1": (4, ct.sizeof(Endpoint)),
    "axoneme_lxc_v1": (ct.sizeof(LxcKey), ct.sizeof(Endpoint)),
    "axoneme_ct_v1": (ct.sizeof(Tuple), ct.sizeof(CTEntry)),
    "axoneme_metrics_v1": (4, 8),
    "axoneme_rev_v1": (4, 8),
}
