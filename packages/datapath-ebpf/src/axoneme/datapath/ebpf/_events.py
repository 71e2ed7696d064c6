"""Ring-buffer records -> core.flow.Flow."""

from __future__ import annotations

import ipaddress
import time

from axoneme.core.flow import DropReason, Flow, FlowEndpoint, FlowVerdict
from axoneme.datapath.ebpf import _layout as L

_TCP_FLAGS = (("FIN", 0x01), ("SYN", 0x02), ("RST", 0x04), ("PSH", 0x08), ("ACK", 0x10),
              ("URG", 0x20), ("ECE", 0x40), ("CWR", 0x80))
_PROTO_NAMES = {6: "TCP", 17: "UDP", 132: "SCTP"}


def ktime_offset() -> float:
    """Add to a bpf_ktime_get_ns() value (CLOCK_MONOTONIC) in seconds to get wall time."""
    return time.time() - time.clock_gettime(time.CLOCK_MONOTONIC)


def _addr(family: int, raw: bytes) -> str:
    if family == 4:
        return str(ipaddress.IPv4Address(bytes(raw[:4])))
    return str(ipaddress.IPv6Address(bytes(raw[:16])))


def _l4(ev: L.Event) -> dict[str, object]:
    name = _PROTO_NAMES.get(ev.proto)
    if name is not None:
        body: dict[str, object] = {"source_port": ev.sport, "destination_port": ev.dport}
        if ev.proto == 6:
            body["flags"] = {n: True for n, bit in _TCP_FLAGS if ev.tcp_flags & bit}
        return {name: body}
    if ev.proto == 1:
        return {"ICMPv4": {"type": ev.icmp_type, "code": ev.icmp_code}}
    if ev.proto == 58:
        return {"ICMPv6": {"type": ev.icmp_type, "code": ev.icmp_code}}
    return {}


def to_flow(ev: L.Event, offset: float) -> Flow:
    """Turn one record into a Flow; only the deciding endpoint's id is known
    here (the agent enriches names and labels)."""
    ingress = ev.direction == L.DIR_INGRESS
    # the deciding endpoint is the destination for ingress, the source for egress
    src = FlowEndpoint(identity=ev.src_identity, id=0 if ingress else ev.ep_id)
    dst = FlowEndpoint(identity=ev.dst_identity, id=ev.ep_id if ingress else 0)
    if ev.type == L.EVENT_DROP:
        verdict = FlowVerdict.DROPPED
        try:
            reason: DropReason | None = DropReason(ev.reason)
        except ValueError:
            reason = None
        event_type = "drop"
    else:
        verdict = {L.VERDICT_REDIRECTED: FlowVerdict.REDIRECTED,
                   L.VERDICT_AUDIT: FlowVerdict.AUDIT}.get(ev.verdict, FlowVerdict.FORWARDED)
        reason = None
        event_type = "policy-verdict"
    return Flow(
        time=ev.ktime / 1e9 + offset,
        verdict=verdict,
        ip_source=_addr(ev.family, bytes(ev.saddr)),
        ip_destination=_addr(ev.family, bytes(ev.daddr)),
        source=src,
        destination=dst,
        traffic_direction="INGRESS" if ingress else "EGRESS",
        type="L3_L4",
        event_type=event_type,
        drop_reason=reason,
        l4=_l4(ev),
        is_reply=False,
        ip_version="IPv4" if ev.family == 4 else "IPv6",
        match_type=L.MATCH_TYPES.get(ev.match_type, ""),
    )
