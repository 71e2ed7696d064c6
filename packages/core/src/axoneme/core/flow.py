"""Flow records with Hubble's field names, and the compact line format."""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class FlowVerdict(str, Enum):
    FORWARDED = "FORWARDED"
    DROPPED = "DROPPED"
    REDIRECTED = "REDIRECTED"
    AUDIT = "AUDIT"
    ERROR = "ERROR"
    TRACED = "TRACED"


class DropReason(int, Enum):
    """Cilium's drop codes (bpf/lib/common.h DROP_* = -code); names are Hubble's."""

    POLICY_DENIED = 133
    INVALID_PACKET_DROPPED = 134
    CT_TRUNCATED_OR_INVALID_HEADER = 135
    CT_UNKNOWN_L4_PROTOCOL = 137
    UNSUPPORTED_L3_PROTOCOL = 139
    UNKNOWN_L4_PROTOCOL = 142
    NO_MATCHING_LOCAL_CONTAINER_FOUND = 152
    CT_MAP_INSERTION_FAILED = 155
    NO_CONFIGURATION_AVAILABLE_TO_PERFORM_POLICY_DECISION = 165
    INVALID_IDENTITY = 171
    POLICY_DENY = 181
    AUTH_REQUIRED = 189
    DROP_EP_NOT_READY = 203


DROP_REASON_TEXT = {
    DropReason.POLICY_DENIED: "Policy denied",
    DropReason.POLICY_DENY: "Policy denied by denylist",
    DropReason.CT_MAP_INSERTION_FAILED: "CT: Map insertion failed",
    DropReason.UNSUPPORTED_L3_PROTOCOL: "Unsupported L3 protocol",
    DropReason.UNKNOWN_L4_PROTOCOL: "Unknown L4 protocol",
    DropReason.INVALID_PACKET_DROPPED: "Invalid packet",
    DropReason.CT_TRUNCATED_OR_INVALID_HEADER: "CT: Truncated or invalid header",
    DropReason.CT_UNKNOWN_L4_PROTOCOL: "CT: Unknown L4 protocol",
    DropReason.NO_CONFIGURATION_AVAILABLE_TO_PERFORM_POLICY_DECISION: "No configuration available to perform policy decision",
    DropReason.INVALID_IDENTITY: "Invalid identity",
    DropReason.AUTH_REQUIRED: "Authentication required",
    # a managed pod interface whose endpoint record is missing: nothing can decide
    DropReason.NO_MATCHING_LOCAL_CONTAINER_FOUND: "No matching local container found",
    # the endpoint's policy did not fit its policy map: it fails closed
    DropReason.DROP_EP_NOT_READY: "Endpoint not ready (policy map full: failing closed)",
}


@dataclass(frozen=True, slots=True)
class FlowEndpoint:
    identity: int = 0
    namespace: str = ""
    pod_name: str = ""
    labels: tuple[str, ...] = ()
    id: int = 0  # local endpoint id, 0 if not local

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"identity": self.identity}
        if self.id:
            out["ID"] = self.id
        if self.namespace:
            out["namespace"] = self.namespace
        if self.pod_name:
            out["pod_name"] = self.pod_name
        if self.labels:
            out["labels"] = list(self.labels)
        return out


@dataclass(frozen=True, slots=True)
class Flow:
    """One observed verdict. ``l4`` and ``l7`` are Hubble-shaped dicts."""

    time: float
    verdict: FlowVerdict
    ip_source: str
    ip_destination: str
    source: FlowEndpoint
    destination: FlowEndpoint
    traffic_direction: str  # INGRESS | EGRESS
    type: str = "L3_L4"  # L3_L4 | L7
    event_type: str = "policy-verdict"  # policy-verdict | drop | trace | l7
    drop_reason: DropReason | None = None
    l4: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    l7: dict[str, Any] | None = field(default=None, hash=False, compare=False)
    is_reply: bool | None = None
    ip_version: str = "IPv4"
    match_type: str = ""  # L3_ONLY | L3_L4 | L4_ONLY | ALL | NONE
    summary: str = ""

    @property
    def protocol(self) -> str:
        if self.l7:
            # Hubble: the protocol's record is the one mapping in ``l7`` (http, kafka, dns, ...)
            return str(self.l7.get("type_name", "")) or next(
                (k for k, v in self.l7.items() if isinstance(v, dict)), "")
        return next(iter(self.l4), "").lower()

    def ports(self) -> tuple[int | None, int | None]:
        for proto in ("TCP", "UDP", "SCTP"):
            if proto in self.l4:
                return self.l4[proto].get("source_port"), self.l4[proto].get("destination_port")
        return None, None

    def to_json(self) -> dict[str, Any]:
        ts = _dt.datetime.fromtimestamp(self.time, tz=_dt.UTC)
        out: dict[str, Any] = {
            "time": ts.isoformat(timespec="microseconds").replace("+00:00", "Z"),
            "verdict": self.verdict.value,
            "Type": self.type,
            "traffic_direction": self.traffic_direction,
            "IP": {"source": self.ip_source, "destination": self.ip_destination,
                   "ipVersion": self.ip_version},
            "l4": self.l4,
            "source": self.source.to_json(),
            "destination": self.destination.to_json(),
            "event_type": self.event_type,
            "Summary": self.summary or self.default_summary(),
        }
        if self.drop_reason is not None:
            out["drop_reason"] = int(self.drop_reason)
            out["drop_reason_desc"] = self.drop_reason.name
        if self.is_reply is not None:
            out["is_reply"] = self.is_reply
        if self.l7 is not None:
            out["l7"] = self.l7
        if self.match_type:
            out["policy_match_type"] = self.match_type
        return out

    def default_summary(self) -> str:
        for proto in ("TCP", "UDP", "SCTP"):
            if proto in self.l4:
                flags = self.l4[proto].get("flags")
                if flags:
                    return f"{proto} Flags: " + ", ".join(k for k, v in flags.items() if v)
                return proto
        for proto in ("ICMPv4", "ICMPv6"):
            if proto in self.l4:
                return f"{proto} type {self.l4[proto].get('type')} code {self.l4[proto].get('code', 0)}"
        if self.l7:
            return str(self.l7.get("summary", "L7"))
        return ""

    def compact(self) -> str:
        """One line as ``hubble observe`` prints it."""
        ts = _dt.datetime.fromtimestamp(self.time).strftime("%b %e %H:%M:%S.%f")[:-3]
        sport, dport = self.ports()

        def side(ep: FlowEndpoint, ip: str, port: int | None) -> str:
            name = f"{ep.namespace}/{ep.pod_name}" if ep.pod_name else ip
            return f"{name}:{port}" if port is not None else name

        src = side(self.source, self.ip_source, sport)
        dst = side(self.destination, self.ip_destination, dport)
        arrow = "<-" if self.is_reply else "->"
        if self.is_reply:
            src, dst = dst, src
            s_id, d_id = self.destination.identity, self.source.identity
        else:
            s_id, d_id = self.source.identity, self.destination.identity
        what = ""
        if self.type == "L7" and self.l7:
            what = f"{self.l7.get('type', 'REQUEST').lower()} "
        elif self.event_type == "policy-verdict":
            what = "policy-verdict:" + (self.match_type or "none") + " "
            what += f"{self.traffic_direction} "
        reason = ""
        if self.verdict is FlowVerdict.DROPPED and self.drop_reason is not None:
            reason = DROP_REASON_TEXT.get(self.drop_reason, self.drop_reason.name) + " "
        return (f"{ts}: {src} (ID:{s_id}) {arrow} {dst} (ID:{d_id}) {what}{reason}"
                f"{self.verdict.value} ({self.summary or self.default_summary()})")
