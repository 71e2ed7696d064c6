"""The flow store: a bounded ring of Flow records, filters and live subscribers."""

from __future__ import annotations

import asyncio
import collections
import datetime as _dt
import json
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from axoneme.agent._hubblefilter import FilterError, FlowPredicate, compile_filters
from axoneme.core.flow import (
    EVENT_TYPE_NAMES,
    POLICY_FIELDS,
    POLICY_MATCH_NAMES,
    DropReason,
    Flow,
    FlowEndpoint,
    FlowPolicy,
    FlowVerdict,
)

LOG = logging.getLogger(__name__)

DEFAULT_FLOW_BUFFER = 4095

__all__ = ["DEFAULT_FLOW_BUFFER", "FlowFilter", "FlowStore", "flow_from_json"]


@dataclass(frozen=True, slots=True)
class FlowFilter:
    """What ``axoneme observe`` asks for; every set field must match.

    ``hubble`` holds Hubble's whitelist/blacklist filters (``_hubblefilter``);
    ``since``/``until`` bound the flow's time (epoch seconds, inclusive)."""

    verdict: str | None = None
    namespace: str | None = None
    pod: str | None = None  # ns/name, either side
    from_pod: str | None = None
    to_pod: str | None = None
    labels: tuple[str, ...] = ()  # k=v, either side (k8s source unless given)
    protocol: str | None = None
    port: int | None = None
    type: str | None = None  # l7 | policy-verdict | drop | trace
    since: float | None = None
    until: float | None = None
    hubble: FlowPredicate | None = field(default=None, compare=False)

    @classmethod
    def from_query(cls, q: Mapping[str, str], labels: Iterable[str] = ()) -> FlowFilter:
        """From the API's query; FilterError (-> 400) on a bad value."""
        port = q.get("port")
        hubble = None
        if q.get("filters"):
            try:
                spec = json.loads(q["filters"])
                hubble = compile_filters(spec.get("whitelist") or (), spec.get("blacklist") or ())
            except (ValueError, AttributeError, TypeError) as e:
                raise FilterError(f"invalid filters: {e}") from None
        return cls(verdict=q.get("verdict") or None, namespace=q.get("namespace") or None,
                   pod=q.get("pod") or None, from_pod=q.get("from_pod") or None,
                   to_pod=q.get("to_pod") or None, labels=tuple(labels),
                   protocol=(q.get("protocol") or "").lower() or None,
                   port=int(port) if port else None, type=q.get("type") or None,
                   since=_time_param(q.get("since"), "since"),
                   until=_time_param(q.get("until"), "until"), hubble=hubble)

    def matches(self, flow: Flow) -> bool:
        if self.verdict and flow.verdict.value != self.verdict.upper():
            return False
        if self.since is not None and flow.time < self.since:
            return False
        if self.until is not None and flow.time > self.until:
            return False
        if self.hubble is not None and not self.hubble(flow):
            return False
        src = _podname(flow.source)
        dst = _podname(flow.destination)
        if self.namespace and self.namespace not in (flow.source.namespace, flow.destination.namespace):
            return False
        if self.pod and self.pod not in (src, dst):
            return False
        if self.from_pod and self.from_pod != src:
            return False
        if self.to_pod and self.to_pod != dst:
            return False
        for want in self.labels:
            if not (_has_label(flow.source, want) or _has_label(flow.destination, want)):
                return False
        if self.protocol:
            proto = flow.protocol
            if self.protocol in ("icmp", "icmpv4", "icmpv6"):
                if not proto.startswith("icmp"):
                    return False
            elif proto != self.protocol:
                return False
        if self.port is not None and self.port not in flow.ports():
            return False
        if self.type:
            kind = "l7" if flow.type == "L7" else flow.event_type
            if self.type == "drop":
                if flow.verdict is not FlowVerdict.DROPPED:
                    return False
            elif kind != self.type:
                return False
        return True


def _time_param(value: str | None, name: str) -> float | None:
    if not value:
        return None
    try:
        return _parse_time(float(value) if value.replace(".", "", 1).isdigit() else value)
    except ValueError:
        raise FilterError(f"invalid time {value!r} ({name})") from None


def _podname(ep: FlowEndpoint) -> str:
    return f"{ep.namespace}/{ep.pod_name}" if ep.pod_name else ""


def _has_label(ep: FlowEndpoint, want: str) -> bool:
    if ":" not in want.split("=", 1)[0]:
        want = "k8s:" + want
    return want in ep.labels


class FlowStore:
    """Bounded ring of flows; ``add`` is thread-safe and callable from proxies.

    Subscribers are asyncio queues fed on the agent's loop."""

    def __init__(self, capacity: int = DEFAULT_FLOW_BUFFER,
                 enrich: Callable[[Flow], Flow] | None = None,
                 on_flow: Callable[[Flow], None] | None = None) -> None:
        self.capacity = capacity
        self._ring: collections.deque[Flow] = collections.deque(maxlen=capacity)
        self._lock = threading.Lock()
        self._subscribers: set[asyncio.Queue[Flow | None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._enrich = enrich
        self._on_flow = on_flow
        self.seen = 0

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def add(self, flow: Flow) -> Flow:
        """Store one flow (enriched with local endpoint info) and notify subscribers."""
        if self._enrich is not None:
            try:
                flow = self._enrich(flow)
            except Exception:  # enrichment is best effort, never loses the flow
                LOG.debug("flow enrichment failed", exc_info=True)
        with self._lock:
            self._ring.append(flow)
            self.seen += 1
            subs = list(self._subscribers)
        if self._on_flow is not None:
            try:
                self._on_flow(flow)
            except Exception:
                LOG.debug("flow callback failed", exc_info=True)
        if subs and self._loop is not None:
            for q in subs:
                self._loop.call_soon_threadsafe(_offer, q, flow)
        return flow

    def last(self, n: int | None = None, flt: FlowFilter | None = None,
             first: bool = False) -> list[Flow]:
        """The last ``n`` matching flows (all when None), oldest first; with
        ``first`` the oldest ``n`` instead (Hubble's ``--first``)."""
        with self._lock:
            flows = list(self._ring)
        if flt is not None:
            flows = [f for f in flows if flt.matches(f)]
        if n is not None:
            if n <= 0:
                return []
            flows = flows[:n] if first else flows[-n:]
        return flows

    def subscribe(self) -> asyncio.Queue[Flow | None]:
        q: asyncio.Queue[Flow | None] = asyncio.Queue(maxsize=10000)
        with self._lock:
            self._subscribers.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[Flow | None]) -> None:
        with self._lock:
            self._subscribers.discard(q)

    def __len__(self) -> int:
        with self._lock:
            return len(self._ring)


def _offer(q: asyncio.Queue[Flow | None], flow: Flow) -> None:
    try:
        q.put_nowait(flow)
    except asyncio.QueueFull:  # a slow reader loses flows rather than the agent memory
        pass


def _endpoint_from_json(d: Mapping[str, Any] | None) -> FlowEndpoint:
    d = d or {}
    return FlowEndpoint(identity=int(d.get("identity", 0)), namespace=str(d.get("namespace", "")),
                        pod_name=str(d.get("pod_name", "")),
                        labels=tuple(str(x) for x in d.get("labels", ()) or ()),
                        id=int(d.get("ID", 0) or 0))


def _parse_time(value: Any) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value:
        return _dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return _dt.datetime.now(tz=_dt.UTC).timestamp()


def _event_type(d: Mapping[str, Any]) -> str:
    """``event_type`` as Hubble's object ({type, sub_type}) or our older name."""
    et = d.get("event_type")
    if isinstance(et, Mapping):
        return EVENT_TYPE_NAMES.get(int(et.get("type", 0) or 0), "policy-verdict")
    if isinstance(et, str) and et:
        return et
    return "l7" if d.get("Type") == "L7" else "policy-verdict"


def _match_type(value: Any) -> str:
    if isinstance(value, int):
        return POLICY_MATCH_NAMES.get(value, "")
    return str(value or "")


def flow_from_json(d: Mapping[str, Any]) -> Flow:
    """The inverse of ``Flow.to_json`` (for POST /v1/flows and clients)."""
    ip = d.get("IP") or {}
    reason = d.get("drop_reason")
    drop: DropReason | None = None
    if reason is not None:
        drop = DropReason(int(reason))
    elif d.get("drop_reason_desc"):
        drop = DropReason[str(d["drop_reason_desc"])]
    iface = d.get("interface")
    eth = d.get("ethernet")
    policies = {name: tuple(FlowPolicy.from_json(p) for p in d.get(name) or ())
                for name in POLICY_FIELDS}
    return Flow(
        time=_parse_time(d.get("time")),
        verdict=FlowVerdict(str(d.get("verdict", "FORWARDED")).upper()),
        ip_source=str(ip.get("source", "")),
        ip_destination=str(ip.get("destination", "")),
        source=_endpoint_from_json(d.get("source")),
        destination=_endpoint_from_json(d.get("destination")),
        traffic_direction=str(d.get("traffic_direction", "INGRESS")),
        type=str(d.get("Type", "L3_L4")),
        event_type=_event_type(d),
        drop_reason=drop,
        l4=dict(d.get("l4") or {}),
        l7=dict(d["l7"]) if d.get("l7") is not None else None,
        is_reply=d.get("is_reply"),
        ip_version=str(ip.get("ipVersion", "IPv4")),
        match_type=_match_type(d.get("policy_match_type")),
        summary=str(d.get("Summary", "")),
        uuid=str(d.get("uuid", "")),
        node_name=str(d.get("node_name", "")),
        trace_observation_point=str(d.get("trace_observation_point", "")),
        interface=(int(iface.get("index", 0)), str(iface.get("name", ""))) if iface else None,
        source_names=tuple(str(x) for x in d.get("source_names") or ()),
        destination_names=tuple(str(x) for x in d.get("destination_names") or ()),
        ethernet=(str(eth.get("source", "")), str(eth.get("destination", ""))) if eth else None,
        **policies,
    )
