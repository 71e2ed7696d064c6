"""Flow records with Hubble's field names, and the compact line format.

``Flow.to_json`` is Hubble's ``flow.Flow`` message in protojson's form (proto
field names, enums by name, ``event_type`` as ``{type, sub_type}``), plus a
few fields of ours that Hubble lacks (``l7.reason``, ``l7.kafka.topics``):
a protojson reader that ignores unknown fields takes every line.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from enum import Enum, StrEnum
from typing import Any


class FlowVerdict(StrEnum):
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


# Cilium's monitor message types (pkg/monitor/api/types.go MessageType*): Hubble's
# event_type.type. DO NOT CHANGE: Hubble's filters and printer read these numbers.
EVENT_TYPES = {"drop": 1, "debug": 2, "capture": 3, "trace": 4, "policy-verdict": 5,
               "trace-sock": 7, "l7": 129, "agent": 130}
EVENT_TYPE_NAMES = {v: k for k, v in EVENT_TYPES.items()}
# Cilium's PolicyMatch* (pkg/monitor/api/types.go): policy_match_type as a number
POLICY_MATCH_TYPES = {"": 0, "NONE": 0, "L3_ONLY": 1, "L3_L4": 2, "L4_ONLY": 3, "ALL": 4,
                      "L3_PROTO": 5, "PROTO_ONLY": 6}
POLICY_MATCH_NAMES = {1: "L3_ONLY", 2: "L3_L4", 3: "L4_ONLY", 4: "ALL", 5: "L3_PROTO",
                      6: "PROTO_ONLY"}
# Hubble's TraceObservationPoint names -> the monitor's trace sub_type (TraceToLxc..)
TRACE_POINTS = {"TO_ENDPOINT": 0, "TO_PROXY": 1, "TO_HOST": 2, "TO_STACK": 3, "TO_OVERLAY": 4,
                "FROM_ENDPOINT": 5, "FROM_PROXY": 6, "FROM_HOST": 7, "FROM_STACK": 8,
                "FROM_OVERLAY": 9, "FROM_NETWORK": 10, "TO_NETWORK": 11}
# label keys of a FlowPolicy (Cilium's policy labels, and ours for the rule)
POLICY_LABEL_KIND = "k8s:io.cilium.k8s.policy.derived-from"
POLICY_LABEL_NAME = "k8s:io.cilium.k8s.policy.name"
POLICY_LABEL_NAMESPACE = "k8s:io.cilium.k8s.policy.namespace"
POLICY_LABEL_RULE = "axoneme:rule"
POLICY_LABEL_DEFAULT_DENY = "axoneme:default-deny"


@dataclass(frozen=True, slots=True)
class FlowPolicy:
    """One policy that decided a flow: Hubble's ``flow.Policy``.

    ``rule`` is the path of the deciding rule in the policy's document
    (``spec.ingress[0]``); ``default_deny`` marks a policy named because it
    put the endpoint into default deny in that direction (``rule`` is then
    the section that did: ``spec.ingress``, ``spec.egressDeny``, ...).
    Hubble's message has no field for either: they travel as labels."""

    name: str
    namespace: str = ""
    kind: str = ""
    rule: str = ""
    default_deny: bool = False
    revision: int = 0

    @property
    def labels(self) -> tuple[str, ...]:
        out = [f"{POLICY_LABEL_KIND}={self.kind}", f"{POLICY_LABEL_NAME}={self.name}"]
        if self.namespace:
            out.append(f"{POLICY_LABEL_NAMESPACE}={self.namespace}")
        if self.rule:
            out.append(f"{POLICY_LABEL_RULE}={self.rule}")
        if self.default_deny:
            out.append(f"{POLICY_LABEL_DEFAULT_DENY}=true")
        return tuple(out)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kind": self.kind, "labels": list(self.labels)}
        if self.namespace:
            out["namespace"] = self.namespace
        if self.revision:
            out["revision"] = str(self.revision)  # protojson: uint64 as a string
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> FlowPolicy:
        labels = dict(str(x).split("=", 1) for x in d.get("labels") or () if "=" in str(x))
        return cls(name=str(d.get("name", "")), namespace=str(d.get("namespace", "")),
                   kind=str(d.get("kind", "")), rule=labels.get(POLICY_LABEL_RULE, ""),
                   default_deny=labels.get(POLICY_LABEL_DEFAULT_DENY) == "true",
                   revision=int(d.get("revision") or 0))

    @classmethod
    def from_rule_ref(cls, text: str, default_deny: bool = False) -> FlowPolicy | None:
        """``"CiliumNetworkPolicy ns/name spec.ingress[0]"`` (a MapState entry's
        ``derived_from``; a clusterwide policy has no ``ns/``) -> FlowPolicy;
        None for a reference that names no policy (``allow-localhost``)."""
        parts = text.split(" ", 2)
        if len(parts) < 2 or not parts[0].endswith("Policy"):
            return None
        ns, _, name = parts[1].rpartition("/")
        return cls(name=name, namespace=ns, kind=parts[0],
                   rule=parts[2] if len(parts) > 2 else "", default_deny=default_deny)

    def compact(self) -> str:
        return f"{self.name} ({self.kind})"


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
    # filled in by the agent's flow store where known (Hubble's fields of the same names)
    uuid: str = ""
    node_name: str = ""
    trace_observation_point: str = ""  # TRACE_POINTS name, "" when unknown
    interface: tuple[int, str] | None = None  # (ifindex, name) of the observing interface
    ethernet: tuple[str, str] | None = None  # (source MAC, destination MAC)
    source_names: tuple[str, ...] = ()  # DNS names the source IP was learned for
    destination_names: tuple[str, ...] = ()
    ingress_allowed_by: tuple[FlowPolicy, ...] = ()
    egress_allowed_by: tuple[FlowPolicy, ...] = ()
    ingress_denied_by: tuple[FlowPolicy, ...] = ()
    egress_denied_by: tuple[FlowPolicy, ...] = ()

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
            "event_type": self.hubble_event_type(),
            "Summary": self.summary or self.default_summary(),
        }
        if self.uuid:
            out["uuid"] = self.uuid
        if self.node_name:
            out["node_name"] = self.node_name
        if self.trace_observation_point:
            out["trace_observation_point"] = self.trace_observation_point
        if self.interface is not None:
            out["interface"] = {"index": self.interface[0], "name": self.interface[1]}
        if self.source_names:
            out["source_names"] = list(self.source_names)
        if self.destination_names:
            out["destination_names"] = list(self.destination_names)
        if self.ethernet is not None:
            out["ethernet"] = {"source": self.ethernet[0], "destination": self.ethernet[1]}
        for name in POLICY_FIELDS:
            policies = getattr(self, name)
            if policies:
                out[name] = [p.to_json() for p in policies]
        if self.drop_reason is not None:
            out["drop_reason"] = int(self.drop_reason)
            out["drop_reason_desc"] = self.drop_reason.name
        if self.is_reply is not None:
            out["is_reply"] = self.is_reply
        if self.l7 is not None:
            out["l7"] = self.l7
        if self.match_type:
            out["policy_match_type"] = POLICY_MATCH_TYPES.get(self.match_type, 0)
        return out

    def hubble_event_type(self) -> dict[str, int]:
        """Hubble's ``CiliumEventType``: the monitor message type, and its sub type
        (a drop's reason code, a trace's observation point)."""
        kind = "l7" if self.type == "L7" else self.event_type
        out = {"type": EVENT_TYPES.get(kind, 0)}
        sub = 0
        if kind == "drop" and self.drop_reason is not None:
            sub = int(self.drop_reason)
        elif kind == "trace":
            sub = TRACE_POINTS.get(self.trace_observation_point, 0)
        if sub:
            out["sub_type"] = sub
        return out

    def decided_by(self) -> tuple[FlowPolicy, ...]:
        """The policies that decided this flow in its traffic direction."""
        ingress = self.traffic_direction == "INGRESS"
        if self.verdict is FlowVerdict.DROPPED:
            return self.ingress_denied_by if ingress else self.egress_denied_by
        return self.ingress_allowed_by if ingress else self.egress_allowed_by

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

    def hosts(self) -> tuple[str, str]:
        """Source and destination as ``hubble observe`` names them: ``ns/pod:port``
        (or the IP), in the packet's own direction."""
        sport, dport = self.ports()

        def side(ep: FlowEndpoint, ip: str, port: int | None) -> str:
            name = f"{ep.namespace}/{ep.pod_name}" if ep.pod_name else ip
            return f"{name}:{port}" if port is not None else name

        return side(self.source, self.ip_source, sport), side(
            self.destination, self.ip_destination, dport)

    def type_text(self) -> str:
        """What kind of event this is, as Hubble's TYPE column says it."""
        if self.type == "L7" and self.l7:
            return f"{self.protocol or 'l7'}-{str(self.l7.get('type', 'REQUEST')).lower()}"
        if self.event_type == "policy-verdict":
            return f"policy-verdict:{self.match_type or 'none'} {self.traffic_direction}"
        if self.verdict is FlowVerdict.DROPPED and self.drop_reason is not None:
            return DROP_REASON_TEXT.get(self.drop_reason, self.drop_reason.name)
        if self.event_type == "trace" and self.trace_observation_point:
            return self.trace_observation_point.lower().replace("_", "-")
        return self.event_type

    def verdict_text(self) -> str:
        """The verdict and, where known, the policies that decided it (``BY name (Kind)``);
        AUDIT: ``AUDIT would be DROPPED BY name (Kind)`` (the staged policies)."""
        if self.verdict is FlowVerdict.AUDIT:
            would = self.ingress_denied_by if self.traffic_direction == "INGRESS" else self.egress_denied_by
            if would:
                return "AUDIT would be DROPPED BY " + ", ".join(p.compact() for p in would)
        by = self.decided_by()
        names = (" BY " + ", ".join(p.compact() for p in by)) if by else ""
        return f"{self.verdict.value}{names}"

    def compact(self) -> str:
        """One line as ``hubble observe`` prints it."""
        ts = _dt.datetime.fromtimestamp(self.time).strftime("%b %e %H:%M:%S.%f")[:-3]
        src, dst = self.hosts()
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
                f"{self.verdict_text()} ({self.summary or self.default_summary()})")


POLICY_FIELDS = ("ingress_allowed_by", "egress_allowed_by", "ingress_denied_by",
                 "egress_denied_by")


def _fast_constructor(cls: type[Flow]) -> Callable[..., Flow]:
    """``cls(...)``'s equal (same signature, defaults, every slot set) for
    the hot paths: a frozen dataclass's ``__init__`` sets each of Flow's 27
    fields through ``object.__setattr__`` (2.3 us a Flow); this sets the
    slots through their descriptors (~1 us). The L7 proxies build two Flows
    per request (issue 17). Generated from ``dataclasses.fields``, so a new
    field needs nothing here (tests/test_core_flow_new.py compares it with ``Flow``)."""
    ns: dict[str, Any] = {"_new": object.__new__, "_cls": cls, "_MISSING": MISSING}
    params: list[str] = []
    body: list[str] = []
    for f in fields(cls):
        n = f.name
        ns[f"_set_{n}"] = cls.__dict__[n].__set__
        if f.default is not MISSING:
            ns[f"_d_{n}"] = f.default
            params.append(f"{n}=_d_{n}")
        elif f.default_factory is not MISSING:
            ns[f"_f_{n}"] = f.default_factory
            params.append(f"{n}=_MISSING")
            body.append(f"    if {n} is _MISSING: {n} = _f_{n}()")
        else:
            params.append(n)
        body.append(f"    _set_{n}(o, {n})")
    src = (f"def new_flow({', '.join(params)}):\n    o = _new(_cls)\n" + "\n".join(body)
           + "\n    return o\n")
    exec(compile(src, f"<{cls.__name__} fast constructor>", "exec"), ns)  # noqa: S102
    fn: Callable[..., Flow] = ns["new_flow"]
    return fn


#: ``Flow(...)``, faster (see ``_fast_constructor``): for per-request flow records.
new_flow = _fast_constructor(Flow)
