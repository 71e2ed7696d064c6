"""Offline analysis: a cluster description + policies -> verdicts with reasons.

What ``axoneme policy trace`` and ``axoneme policy matrix`` compute. Every
pod of the cluster becomes a local endpoint of one PolicyEngine, so the
verdicts come from the same MapStates (and the same ``MapState.lookup``)
the datapaths enforce.

Decision for ``src -> dst`` on a port (Cilium):
1. A pod talking to itself never leaves its network namespace: allowed.
2. Egress is decided by the source pod's MapState (peer = the destination's
   identity and address), when the source is a pod; otherwise no egress
   policy applies.
3. Ingress is decided by the destination pod's MapState (peer = the
   source's identity and address), when the destination is a pod.
4. The flow is allowed only if both sides allow; if an allowing side
   redirects to an L7 proxy, the flow is "redirected", or, when an L7
   request is given, the L7 rules of every redirecting side decide.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from axoneme.core.cluster import Cluster, Pod
from axoneme.core.endpoint import Endpoint, host_endpoint
from axoneme.core.errors import AxonemeError, PolicyError
from axoneme.core.identity import RESERVED_NAMES, ReservedIdentity
from axoneme.core.l7 import GenericRule, fqdn_parser
from axoneme.core.mapstate import (
    ADDRESS_IDENTITY,
    Decision,
    Direction,
    Entry,
    Key,
    MapState,
    Protocol,
    Verdict,
)
from axoneme.core.plugins import GROUP_L7, l7_parser, registry
from axoneme.core.policy.api import Policy
from axoneme.core.policy.audit import policy_names
from axoneme.core.policy.engine import EngineOptions, PolicyEngine
from axoneme.core.policy.fqdn import fqdn_matches
from axoneme.core.policy.services import Service
from axoneme.core.yamlsafe import excerpt

LOG = logging.getLogger(__name__)

ALLOWED, DENIED, REDIRECTED = "allowed", "denied", "redirected"


class TraceInputError(PolicyError):
    """Bad trace/matrix input (unknown pod, bad port): exit 2."""


# -- building the offline engine -------------------------------------------------------

@dataclass
class OfflineCluster:
    """A cluster loaded into a PolicyEngine: pods ``ns/name`` -> endpoints."""

    cluster: Cluster
    engine: PolicyEngine
    endpoints: dict[str, Endpoint] = field(default_factory=dict)

    @classmethod
    def build(cls, cluster: Cluster, policies: Sequence[Policy],
              options: EngineOptions | None = None, services: Iterable[Service] = (),
              node_labels: Mapping[str, str] | None = None) -> OfflineCluster:
        """``services``: what toServices resolves against (``ServiceCatalog``);
        ``node_labels``: the node ``entity:host`` stands for, whose host endpoint
        host policies (CCNP nodeSelector) select (None: no host endpoint, host
        policies are not evaluated, as on an agent without the host firewall)."""
        opts = options or EngineOptions()
        engine = PolicyEngine(options=opts)
        out = cls(cluster, engine)
        engine.set_services(services)
        if node_labels is not None:
            engine.set_host_endpoint(host_endpoint(node_labels))
        with engine.batch():
            for n, key in enumerate(sorted(cluster.pods), 1):
                pod = cluster.pods[key]
                ident = engine.allocator.allocate(cluster.identity_labels(pod, opts.cluster_name))
                ep = Endpoint(n, ident.id, ident.labels, ipv4=pod.ipv4, ipv6=pod.ipv6,
                              namespace=pod.namespace, pod_name=pod.name, named_ports=pod.ports)
                engine.upsert_endpoint(ep)
                out.endpoints[key] = ep
            for policy in policies:
                engine.upsert_policy(policy)
        return out

    def pod(self, key: str) -> Pod:
        return self.cluster.pods[key]

    def learn_dns(self, answers: Mapping[str, Iterable[str]]) -> None:
        """Feed DNS answers (name -> IPs) to the toFQDNs selectors, as the
        agent's DNS proxy would: each selector matching a name stands for the
        union of those names' IPs (``/32`` CIDR identities)."""
        names = {n.lower().rstrip("."): frozenset(ips) for n, ips in answers.items()}
        # the installed FQDN parser's matcher (what the node's DNS proxy would
        # use), core's toFQDNs matching when there is none
        parser = fqdn_parser()
        matches = parser.fqdn_matches if parser is not None else fqdn_matches
        for peer in self.engine.fqdn_selectors():
            ips: set[str] = set()
            for name, addrs in names.items():
                if matches(peer, name):
                    ips |= addrs
            self.engine.update_fqdn(peer, sorted(ips))


# -- peers -----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Peer:
    """One side of a trace: a pod (endpoint set) or an address/entity with an identity."""

    name: str
    identity: int
    endpoint: Endpoint | None = None
    address: str | None = None  # for address keys (a pod's IPv4, else its IPv6)


_ENTITY_IDS = {name: int(rid) for rid, name in RESERVED_NAMES.items()}


def resolve_peer(env: OfflineCluster, text: str, flag: str) -> Peer:
    """``ns/pod``, ``pod`` (namespace default), an IP, or ``entity:<name>``."""
    if text.startswith("entity:"):
        name = text.split(":", 1)[1]
        if name not in _ENTITY_IDS:
            raise TraceInputError(f"unknown entity {name!r} (one of {', '.join(sorted(_ENTITY_IDS))}) ({flag})")
        # the host firewall's endpoint, when the trace has a node (host policies apply)
        return Peer(text, _ENTITY_IDS[name],
                    env.engine.host_endpoint() if _ENTITY_IDS[name] == int(ReservedIdentity.HOST)
                    else None)
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        addr = None
    if addr is not None:
        for key, ep in env.endpoints.items():
            if text in (ep.ipv4, ep.ipv6) or any(
                    ip and ipaddress.ip_address(ip) == addr for ip in (ep.ipv4, ep.ipv6)):
                return Peer(key, ep.identity, ep, str(addr))
        return Peer(str(addr), env.engine.identity_of_ip(str(addr)), None, str(addr))
    key = text if "/" in text else f"default/{text}"
    found = env.endpoints.get(key)
    if found is None:
        known = ", ".join(sorted(env.endpoints)) or "none"
        raise TraceInputError(f"unknown pod {text!r} (pods: {known}) ({flag})")
    return Peer(key, found.identity, found, endpoint_address(found))


def endpoint_address(ep: Endpoint) -> str | None:
    """The address a pod is probed at (its IPv4, else its IPv6), canonical."""
    ip = ep.ipv4 or ep.ipv6
    return str(ipaddress.ip_address(ip)) if ip else None


# -- ports -----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class PortSpec:
    """``--port`` value: a number or a named port, with a protocol."""

    port: int
    protocol: Protocol
    name: str | None = None
    explicit_protocol: bool = False

    def __str__(self) -> str:
        return f"{self.name or self.port}/{self.protocol}"

    def resolve(self, pod: Pod | None) -> tuple[Protocol, int] | None:
        """The number on a destination pod (None: a named port it does not have)."""
        if self.name is None:
            return self.protocol, self.port
        for np in pod.ports if pod is not None else ():
            if np.name == self.name and (not self.explicit_protocol or
                                         Protocol.parse(np.protocol) == self.protocol):
                return Protocol.parse(np.protocol), np.port
        return None


def _ascii_number(text: str, max_digits: int) -> int | None:
    """``text`` as a number if it is 1..``max_digits`` ASCII digits.

    ``str.isdigit`` accepts ``²`` (``int`` then raises) and other scripts'
    digits, and ``int`` of a long digit string is slow, then raises: check
    both before converting.
    """
    if text.isascii() and text.isdigit() and len(text) <= max_digits:
        return int(text)
    return None


def parse_port(text: str) -> PortSpec:
    """``80``, ``80/UDP``, ``http``, ``serve-80/TCP``."""
    head, sep, proto = text.partition("/")
    shown = excerpt(text)
    protocol = Protocol.TCP
    if sep:
        if proto.upper() not in ("TCP", "UDP", "SCTP"):
            raise TraceInputError(f"bad protocol {excerpt(proto)!r} in {shown!r}: TCP, UDP or SCTP (--port)")
        protocol = Protocol.parse(proto)
    if head.isascii() and head.isdigit():
        number = _ascii_number(head, 5)
        if number is None or not 1 <= number <= 65535:
            raise TraceInputError(f"bad port {shown!r}: 1-65535 (--port)")
        return PortSpec(number, protocol, None, bool(sep))
    if (not head or len(head) > 15 or not head.isascii()
            or not all(c.isalnum() or c == "-" for c in head) or head.startswith("-")):
        raise TraceInputError(f"bad port {shown!r}: a number 1-65535 or a port name (--port)")
    return PortSpec(0, protocol, head, bool(sep))


def parse_icmp_type(text: str, family: str) -> int:
    from axoneme.core.policy.parse import ICMP_TYPES

    fam = {"ipv4": "IPv4", "ipv6": "IPv6"}.get(family.lower())
    if fam is None:
        raise TraceInputError(f"bad ICMP family {excerpt(family)!r}: IPv4 or IPv6 (--icmp-family)")
    number = _ascii_number(text, 3)
    if number is not None and 0 <= number <= 255:
        return number
    if text in ICMP_TYPES[fam]:
        return ICMP_TYPES[fam][text]
    raise TraceInputError(f"bad ICMP type {excerpt(text)!r}: 0-255 or one of "
                          f"{', '.join(sorted(ICMP_TYPES[fam]))} (--icmp-type)")


# -- deciding --------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class SideResult:
    """One direction's decision."""

    verdict: str  # allowed | denied | redirected
    rules: tuple[str, ...] = ()
    reason: str = ""
    entry: Entry | None = None
    key: Key | None = None
    # allowed, but a staged policy (policy.axoneme.io/mode: audit) would deny it: its rules
    audited_by: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"verdict": self.verdict, "rules": list(self.rules)}
        if self.audited_by:
            out["audit"] = {"verdict": DENIED, "rules": list(self.audited_by)}
        return out


@dataclass(frozen=True, slots=True)
class L7Result:
    verdict: str
    rules: tuple[dict[str, Any], ...] = ()
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "rules": list(self.rules)}


@dataclass(frozen=True, slots=True)
class TraceResult:
    verdict: str
    egress: SideResult
    ingress: SideResult
    l7: L7Result | None
    source: Peer
    destination: Peer
    protocol: Protocol
    port: int

    @property
    def audited_by(self) -> tuple[str, ...]:
        """The staged policies that would deny an allowed flow ("Kind ns/name")."""
        if self.verdict == DENIED:
            return ()
        return tuple(sorted(policy_names(self.egress.audited_by + self.ingress.audited_by)))

    def to_json(self) -> dict[str, Any]:
        out = {"verdict": self.verdict, "egress": self.egress.to_json(),
               "ingress": self.ingress.to_json(),
               "l7": self.l7.to_json() if self.l7 is not None else None}
        if self.audited_by:
            out["audit"] = {"verdict": DENIED, "by": list(self.audited_by)}
        return out


def _side(env: OfflineCluster, ep: Endpoint | None, direction: Direction, peer: Peer,
          protocol: Protocol, port: int) -> SideResult:
    what = "egress" if direction is Direction.EGRESS else "ingress"
    if ep is None:
        return SideResult(ALLOWED, (), f"not a pod: no {what} policy applies")
    enforced = env.engine.enforcement(ep.id)[0 if direction is Direction.INGRESS else 1]
    dec = env.engine.explain(ep.id, direction, peer.identity, protocol, port, peer.address)
    selecting = any(r.peer_rules(direction) for r in env.engine.selecting_rules(ep.id))
    return side_from_decision(dec, ep.pod, what, enforced, selecting)


def side_from_decision(dec: Decision, pod: str, what: str, enforced: bool,
                       selecting: bool = False) -> SideResult:
    rules = tuple(sorted(dec.entry.derived_from)) if dec.entry is not None else ()
    if dec.verdict is Verdict.DENIED_BY_RULE:
        return SideResult(DENIED, rules, "denied by a deny rule", dec.entry, dec.key)
    if dec.verdict is Verdict.DENIED:
        return SideResult(DENIED, (), "default deny: no rule allows", None, None)
    verdict = REDIRECTED if dec.verdict is Verdict.REDIRECTED else ALLOWED
    why = (f"policies select {pod} for {what} but none enables default deny" if selecting
           else f"no policy selects {pod} for {what}")
    reason = "redirected to the L7 proxy by" if verdict == REDIRECTED else "allowed by"
    audited = tuple(sorted(dec.entry.audited_by)) if dec.entry is not None and dec.entry.audit else ()
    if not enforced and not rules:
        return SideResult(verdict, (), f"{why}: allowed by default", dec.entry, dec.key, audited)
    return SideResult(verdict, rules, reason, dec.entry, dec.key, audited)


def l7_rule_json(parser: str, rule: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"parser": parser}
    if isinstance(rule, GenericRule):
        return {**out, **rule.as_dict()}
    try:
        items = [(f.name, getattr(rule, f.name)) for f in fields(rule)]
    except TypeError:
        return {"parser": parser, "rule": repr(rule)}
    for name, value in items:
        if value in (None, "", (), []):
            continue
        if isinstance(value, tuple):
            value = [v if isinstance(v, str) else {f.name: getattr(v, f.name) for f in fields(v)}
                     for v in value]
        out[name] = value
    return out


def _l7(sides: Sequence[SideResult], request: Mapping[str, Any] | None) -> L7Result | None:
    redirects = [s for s in sides if s.verdict == REDIRECTED and s.entry is not None and s.entry.l7]
    if not redirects:
        return None
    rules = tuple(l7_rule_json(s.entry.l7.parser, r) for s in redirects  # type: ignore[union-attr]
                  for r in s.entry.l7.rules)  # type: ignore[union-attr]
    if not request:
        return L7Result(REDIRECTED, rules, "redirected to the L7 proxy (give --l7 KEY=VALUE or "
                                           "--http-*/--kafka-* flags to decide a request)")
    reasons: list[str] = []
    for side in redirects:
        l7 = side.entry.l7 if side.entry is not None else None
        if l7 is None:
            continue
        try:
            parser = l7_parser(l7.parser)
        except AxonemeError as e:
            return L7Result(DENIED, rules, f"cannot evaluate {l7.parser} rules: {e}")
        check_trace_inputs(l7.parser, parser, request)
        try:
            req = parser.request_from_trace(dict(request))
            verdict = parser.match(l7.rules, req)
        except (AxonemeError, NotImplementedError, TypeError, ValueError) as e:
            return L7Result(DENIED, rules, f"cannot evaluate {l7.parser} rules: {e}")
        reasons.append(verdict.reason or ("allowed" if verdict.allowed else "denied"))
        if not verdict.allowed:
            return L7Result(DENIED, rules, "; ".join(reasons))
    return L7Result(ALLOWED, rules, "; ".join(reasons))


def check_trace_inputs(name: str, parser: Any, request: Mapping[str, Any]) -> None:
    """TraceInputError for an ``--l7`` key the parser does not accept.

    Shorthand options (``--http-method`` -> ``http_method``: ``<parser>_KEY``
    for an installed parser) are not checked: a parser ignores the others'."""
    accepted = getattr(parser, "trace_inputs", None) or {}
    if not accepted:
        return
    shorthands = tuple(f"{n}_" for n in registry().names(GROUP_L7))
    unknown = sorted(k for k in request if k not in accepted and not k.startswith(shorthands))
    if unknown:
        raise TraceInputError(f"the {name} L7 parser does not take {', '.join(map(repr, unknown))} "
                              f"(it takes: {', '.join(sorted(accepted))}) (--l7)")


def trace(env: OfflineCluster, src: Peer, dst: Peer, protocol: Protocol, port: int,
          l7_request: Mapping[str, Any] | None = None) -> TraceResult:
    if src.endpoint is not None and dst.endpoint is not None and src.endpoint.id == dst.endpoint.id:
        same = SideResult(ALLOWED, (), "a pod talking to itself: no policy applies")
        return TraceResult(ALLOWED, same, same, None, src, dst, protocol, port)
    egress = _side(env, src.endpoint, Direction.EGRESS, dst, protocol, port)
    ingress = _side(env, dst.endpoint, Direction.INGRESS, src, protocol, port)
    if DENIED in (egress.verdict, ingress.verdict):
        return TraceResult(DENIED, egress, ingress, None, src, dst, protocol, port)
    l7 = _l7((egress, ingress), l7_request)
    if l7 is None:
        final = ALLOWED
    else:
        final = l7.verdict
    return TraceResult(final, egress, ingress, l7, src, dst, protocol, port)


# -- matrix ----------------------------------------------------------------------------

class _FastLookup:
    """MapState.lookup over an index by (identity, address, direction): the
    same procedure, fewer keys."""

    def __init__(self, state: MapState) -> None:
        groups: dict[tuple[int, str, Direction], dict[Key, Entry]] = {}
        for key, entry in state.items():
            groups.setdefault((key.identity, key.address, key.direction), {})[key] = entry
        self._groups = groups
        self._cache: dict[tuple[int, str, Direction], MapState] = {}

    def lookup(self, identity: int, direction: Direction, protocol: Protocol, port: int,
               address: str | None = None) -> Decision:
        sub = self._cache.get((identity, address or "", direction))
        if sub is None:
            entries = dict(self._groups.get((0, "", direction), {}))
            entries.update(self._groups.get((identity, "", direction), {}))
            if address:
                entries.update(self._groups.get((ADDRESS_IDENTITY, address, direction), {}))
            sub = self._cache[(identity, address or "", direction)] = MapState(entries)
        return sub.lookup(identity, direction, protocol, port, address)


@dataclass(frozen=True, slots=True)
class Probe:
    src: str
    dst: str
    port: int
    protocol: Protocol
    verdict: str
    spec: PortSpec
    audited_by: tuple[str, ...] = ()  # allowed, but staged policies would deny it

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"from": self.src, "to": self.dst, "port": self.port,
                               "protocol": str(self.protocol), "verdict": self.verdict}
        if self.audited_by:
            out["audit"] = {"verdict": DENIED, "by": list(self.audited_by)}
        return out


def matrix(env: OfflineCluster, ports: Sequence[PortSpec]) -> list[Probe]:
    """Every pod to every pod (itself included) on each port; named ports per destination.

    A destination without the named port gets no probe (nothing listens there)."""
    pods = sorted(env.endpoints)
    fast = {k: _FastLookup(env.engine.resolve(ep.id)) for k, ep in env.endpoints.items()}
    probes: list[Probe] = []
    for spec in ports:
        for s in pods:
            sep = env.endpoints[s]
            for d in pods:
                dep = env.endpoints[d]
                target = spec.resolve(env.cluster.pods[d])
                if target is None:
                    continue
                proto, number = target
                audited: tuple[str, ...] = ()
                if s == d:
                    ok = True
                else:
                    decs = (fast[s].lookup(dep.identity, Direction.EGRESS, proto, number,
                                           endpoint_address(dep)),
                            fast[d].lookup(sep.identity, Direction.INGRESS, proto, number,
                                           endpoint_address(sep)))
                    ok = all(dec.allowed for dec in decs)
                    if ok:
                        audited = tuple(sorted(policy_names(
                            n for dec in decs if dec.entry is not None and dec.entry.audit
                            for n in dec.entry.audited_by)))
                probes.append(Probe(s, d, number, proto, ALLOWED if ok else DENIED, spec, audited))
    return probes


__all__ = ["OfflineCluster", "Peer", "PortSpec", "Probe", "SideResult", "L7Result", "TraceResult",
           "TraceInputError", "check_trace_inputs", "endpoint_address", "matrix", "parse_icmp_type", "parse_port", "resolve_peer", "trace"]
