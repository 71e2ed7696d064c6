"""What-if: the truth-table delta between the policies in force and a candidate set.

What ``axoneme policy diff`` computes, offline, with the engine the agent and
``policy trace``/``policy matrix`` use (two ``OfflineCluster``s over one
cluster: before and after):

1. The candidate set is the policies in force with the new ones upserted
   (a new policy replaces the one of the same kind, namespace and name),
   minus the removed ones; or, with ``replace``, the new ones alone. A
   promoted policy is a staged one in force (annotation
   ``policy.axoneme.io/mode: audit``) without its annotation; a new
   policy of the same name wins over it.
2. The probed ports are every port boundary the resolved MapStates of
   either side name (each key's first and last port, per protocol), the
   observed connections' ports, any ports asked for, and, when some key
   covers every port (a wildcard, or an unenforced direction), one port no
   key names ("any other port"). Between two such points no key starts
   or ends, so no verdict can change there that a probed point misses.
3. Every pod to every pod on each port, as ``policy matrix``: a probe
   flips when its verdict differs. Each flip carries ``policy trace`` of
   both sides (the deciding rules and why).
4. Each observed connection (``observed.observe``) is decided with the
   candidate set; it flips when the observed verdict (passed or dropped by
   policy) differs from the candidate's. Each observed L7 request (HTTP,
   Kafka, DNS through the agent's proxies) on a connection the candidate
   lets through is decided with its fields as ``policy trace`` L7 inputs.
   Connections whose pod no longer exists are counted, not decided; so are
   connections the candidate would newly send to an L7 proxy (nothing says
   what their requests were).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from axoneme.core.cluster import Cluster
from axoneme.core.identity import ReservedIdentity
from axoneme.core.mapstate import Protocol
from axoneme.core.policy.api import MODE_ANNOTATION, Policy, PolicyRef
from axoneme.core.policy.engine import EngineOptions
from axoneme.core.policy.observed import Connection, Observed, PeerInfo, Request
from axoneme.core.policy.parse import parse_policy_obj
from axoneme.core.policy.trace import (
    ALLOWED,
    DENIED,
    REDIRECTED,
    OfflineCluster,
    Peer,
    PortSpec,
    Probe,
    SideResult,
    TraceInputError,
    TraceResult,
    matrix,
    resolve_peer,
    trace,
)

__all__ = ["Candidate", "DiffResult", "FlowFlip", "ProbeFlip", "compose", "diff", "enforced",
           "probe_ports", "trace_json"]

_PORT_PROTOCOLS = (Protocol.TCP, Protocol.UDP, Protocol.SCTP)
# reserved identities a flow's address alone does not give offline (world ones it does)
_KEEP_IDENTITIES = frozenset(int(r) for r in ReservedIdentity
                             if r not in (ReservedIdentity.UNKNOWN, ReservedIdentity.WORLD, ReservedIdentity.WORLD_IPV4,
                                          ReservedIdentity.WORLD_IPV6))


@dataclass
class Candidate:
    """The candidate set and how it was made from the policies in force."""

    policies: list[Policy]
    added: list[PolicyRef] = field(default_factory=list)
    replaced: list[PolicyRef] = field(default_factory=list)
    removed: list[PolicyRef] = field(default_factory=list)
    promoted: list[PolicyRef] = field(default_factory=list)  # staged -> enforced (also in replaced)

    def to_json(self) -> dict[str, Any]:
        def refs(items: Iterable[PolicyRef]) -> list[dict[str, str]]:
            return [{"kind": r.kind.value, "namespace": r.namespace, "name": r.name} for r in items]
        return {"added": refs(self.added), "replaced": refs(self.replaced),
                "removed": refs(self.removed), "promoted": refs(self.promoted),
                "policies": len(self.policies)}


def enforced(policy: Policy) -> Policy:
    """A staged policy (``policy.axoneme.io/mode: audit``) as it is once promoted."""
    raw = copy.deepcopy(policy.raw)
    meta = raw.get("metadata")
    annotations = meta.get("annotations") if isinstance(meta, dict) else None
    if isinstance(annotations, dict):
        annotations.pop(MODE_ANNOTATION, None)
    return parse_policy_obj(raw, policy.origin or "<api>")


def compose(in_force: Sequence[Policy], new: Sequence[Policy], replace: bool = False,
            remove: Sequence[PolicyRef] = (), promote: Sequence[PolicyRef] = ()) -> Candidate:
    """Rule 1 of the module doc (``promote``: staged policies in force, enforced);
    TraceInputError for a removed or promoted policy not in force, or one promoted
    that is not staged."""
    current = {} if replace else {p.ref: p for p in in_force}
    cand = Candidate([])
    staged = []
    for ref in promote:
        pol = next((p for p in in_force if p.ref == ref), None)
        if pol is None or not pol.audit:
            known = ", ".join(str(p.ref) for p in sorted(in_force, key=lambda p: p.ref) if p.audit)
            why = "is not in force" if pol is None else "is not staged (it is enforced already)"
            raise TraceInputError(f"{ref} {why} (staged: {known or 'none'}) (--promote)")
        staged.append(enforced(pol))
        cand.promoted.append(ref)
    new = [*staged, *new]
    if replace:
        cand.removed = sorted(p.ref for p in in_force)
    for ref in remove:
        if ref not in current:
            known = ", ".join(str(r) for r in sorted(current)) or "none"
            raise TraceInputError(f"{ref} is not in force (in force: {known}) (--remove)")
        del current[ref]
        cand.removed.append(ref)
    for pol in new:
        if pol.ref in current and not replace:
            cand.replaced.append(pol.ref)
        else:
            cand.added.append(pol.ref)
        current[pol.ref] = pol
    cand.policies = list(current.values())
    return cand


# -- probes ----------------------------------------------------------------------------

def probe_ports(envs: Sequence[OfflineCluster], extra: Iterable[tuple[Protocol, int]] = ()
                ) -> tuple[list[PortSpec], set[PortSpec]]:
    """Rule 2: (ports to probe, which of them stand for "any other port")."""
    points: dict[Protocol, set[int]] = {}
    covered: dict[Protocol, list[tuple[int, int]]] = {}
    wildcard = False
    for env in envs:
        for ep in env.endpoints.values():
            for key in env.engine.resolve(ep.id):
                if key.protocol is Protocol.ANY or key.prefix_len == 0:
                    wildcard = True
                    if key.protocol is Protocol.ANY:
                        continue
                if key.protocol not in _PORT_PROTOCOLS:
                    continue
                lo, hi = key.port_range()
                if key.prefix_len:
                    covered.setdefault(key.protocol, []).append((lo, hi))
                    points.setdefault(key.protocol, set()).update({max(lo, 1), hi})
    for proto, port in extra:
        if proto in _PORT_PROTOCOLS and 1 <= port <= 65535:
            points.setdefault(proto, set()).add(port)
    others: set[PortSpec] = set()
    if wildcard:
        for proto in (Protocol.TCP, Protocol.UDP, *([Protocol.SCTP] if Protocol.SCTP in points else [])):
            other = _uncovered(covered.get(proto, []), points.get(proto, set()))
            if other is not None:
                points.setdefault(proto, set()).add(other)
                others.add(PortSpec(other, proto))
    specs = [PortSpec(port, proto) for proto in sorted(points) for port in sorted(points[proto])]
    return specs, others


def _uncovered(ranges: Sequence[tuple[int, int]], points: set[int]) -> int | None:
    """The lowest port from 1024 up (then from 1) that no range covers and no point names."""
    for start, stop in ((1024, 65536), (1, 1024)):
        port = start
        for lo, hi in sorted(ranges):
            if hi < port:
                continue
            if lo > port:
                break
            port = hi + 1
        while port < stop and port in points:
            port += 1
        if port < stop and not any(lo <= port <= hi for lo, hi in ranges):
            return port
    return None


# -- results ---------------------------------------------------------------------------

def _side_json(side: SideResult) -> dict[str, Any]:
    return {"verdict": side.verdict, "rules": list(side.rules), "reason": side.reason}


def trace_json(r: TraceResult) -> dict[str, Any]:
    """``TraceResult.to_json`` plus each side's reason."""
    out = r.to_json()
    out["egress"] = _side_json(r.egress)
    out["ingress"] = _side_json(r.ingress)
    return out


def _final(r: TraceResult) -> str:
    """Allowed or denied: a redirect passes at L3/L4 (the proxy decides requests)."""
    return DENIED if r.verdict == DENIED else ALLOWED


@dataclass(frozen=True)
class ProbeFlip:
    src: str
    dst: str
    spec: PortSpec
    port: int
    protocol: Protocol
    any_other_port: bool
    before: TraceResult
    after: TraceResult

    def to_json(self) -> dict[str, Any]:
        return {"from": self.src, "to": self.dst, "port": self.port,
                "protocol": str(self.protocol), "any_other_port": self.any_other_port,
                "before": _final(self.before), "after": _final(self.after),
                "before_trace": trace_json(self.before), "after_trace": trace_json(self.after)}


@dataclass(frozen=True)
class FlowFlip:
    """An observed connection (or L7 request) the candidate decides otherwise."""

    connection: Connection | Request
    after: TraceResult

    @property
    def change(self) -> str:
        return "would drop" if self.connection.passed else "would admit"

    def to_json(self) -> dict[str, Any]:
        c = self.connection
        out = {"from": c.source.name, "to": c.destination.name,
               "source_ip": c.source.ip, "destination_ip": c.destination.ip,
               "port": c.port, "protocol": str(c.protocol), "observed": c.verdict,
               "after": _final(self.after), "change": self.change, "flows": c.count,
               "last_seen": c.last_seen, "after_trace": trace_json(self.after)}
        if isinstance(c, Request):
            out["l7"] = {"parser": c.parser, **{k: list(v) if isinstance(v, tuple) else v
                                                for k, v in c.fields}}
        return out


@dataclass
class DiffResult:
    candidate: Candidate
    ports: list[PortSpec]
    others: set[PortSpec]
    probes: int
    flips: list[ProbeFlip]
    connections: int = 0
    flow_flips: list[FlowFlip] = field(default_factory=list)
    flows_skipped: dict[str, int] = field(default_factory=dict)
    flows_considered: bool = False

    @property
    def flipped(self) -> bool:
        return bool(self.flips or self.flow_flips)

    def to_json(self) -> dict[str, Any]:
        to_denied = sum(1 for f in self.flips if _final(f.after) == DENIED)
        out: dict[str, Any] = {
            "candidate": self.candidate.to_json(),
            "ports": [{"port": s.port, "protocol": str(s.protocol), "any_other_port": s in self.others}
                      for s in self.ports],
            "probes": self.probes,
            "flips": [f.to_json() for f in self.flips],
            "summary": {"flips": len(self.flips), "allowed_to_denied": to_denied,
                        "denied_to_allowed": len(self.flips) - to_denied,
                        "observed_connections": self.connections,
                        "observed_flips": len(self.flow_flips)},
        }
        if self.flows_considered:
            out["flows"] = {"connections": self.connections, "skipped": dict(self.flows_skipped),
                            "flips": [f.to_json() for f in self.flow_flips]}
        return out


# -- computing -------------------------------------------------------------------------

def _peer_of(env: OfflineCluster, side: PeerInfo, flag: str) -> Peer | None:
    """A flow's side in ``env``: its pod, else its address; a reserved identity the
    flow names (host, remote-node, ...: the node's own addresses, which the offline
    engine does not know) is kept. None: a pod that no longer exists."""
    if side.pod:
        if side.pod not in env.endpoints:
            return None
        return resolve_peer(env, side.pod, flag)
    if side.identity in _KEEP_IDENTITIES:
        return Peer(side.ip, side.identity, None, side.ip)
    return resolve_peer(env, side.ip, flag)


def decide_connection(env: OfflineCluster, conn: Connection) -> TraceResult | None:
    """The candidate's decision for one observed connection (None: a pod that is gone)."""
    src = _peer_of(env, conn.source, "flow source")
    dst = _peer_of(env, conn.destination, "flow destination")
    if src is None or dst is None:
        return None
    return trace(env, src, dst, conn.protocol, conn.port)


def _build(cluster: Cluster, policies: Sequence[Policy], options: EngineOptions,
           dns: Mapping[str, Iterable[str]]) -> OfflineCluster:
    env = OfflineCluster.build(cluster, policies, options)
    if dns:
        env.learn_dns(dns)
    return env


def diff(cluster: Cluster, in_force: Sequence[Policy], candidate: Candidate,
         options: EngineOptions | None = None, observed: Observed | None = None,
         extra_ports: Iterable[tuple[Protocol, int]] = ()) -> DiffResult:
    """Rules 2-4 of the module doc."""
    opts = options or EngineOptions()
    dns = observed.dns if observed is not None else {}
    before = _build(cluster, in_force, opts, dns)
    after = _build(cluster, candidate.policies, opts, dns)
    extra = list(extra_ports)
    if observed is not None:
        extra += [(c.protocol, c.port) for c in observed.connections
                  if c.source.pod and c.destination.pod]
    specs, others = probe_ports((before, after), extra)
    old = {(p.src, p.dst, p.protocol, p.port): p for p in matrix(before, specs)}
    new = matrix(after, specs)
    flips: list[ProbeFlip] = []
    for p in new:
        q: Probe | None = old.get((p.src, p.dst, p.protocol, p.port))
        if q is None or q.verdict == p.verdict:
            continue
        flips.append(ProbeFlip(p.src, p.dst, p.spec, p.port, p.protocol, p.spec in others,
                               _trace_pods(before, p), _trace_pods(after, p)))
    result = DiffResult(candidate, specs, others, len(new), flips)
    if observed is not None:
        result.flows_considered = True
        result.connections = len(observed.connections)
        result.flows_skipped = dict(observed.skipped)
        _decide_observed(after, observed, result)
    return result


def _count(result: DiffResult, why: str, n: int) -> None:
    result.flows_skipped[why] = result.flows_skipped.get(why, 0) + n


def _decide_observed(after: OfflineCluster, observed: Observed, result: DiffResult) -> None:
    """Rule 4: connections, then L7 requests (on connections the candidate still lets
    through at L3/L4: a denied connection is reported once, as a connection)."""
    l4_denied: set[tuple[str, str, Protocol, int]] = set()
    proxied: set[tuple[str, str, Protocol, int]] = {
        (r.source.name, r.destination.name, r.protocol, r.port) for r in observed.requests}
    for conn in observed.connections:
        decided = decide_connection(after, conn)
        if decided is None:
            _count(result, "pod no longer exists", conn.count)
            continue
        where = (conn.source.name, conn.destination.name, conn.protocol, conn.port)
        if _final(decided) == DENIED:
            l4_denied.add(where)
        elif decided.verdict == REDIRECTED and where not in proxied and conn.passed:
            # the candidate sends it to an L7 proxy: only its requests could be denied
            _count(result, "connections the candidate sends to an L7 proxy: their requests "
                           "were not observed, decided at L3/L4 only", conn.count)
        if (_final(decided) == ALLOWED) != conn.passed:
            result.flow_flips.append(FlowFlip(conn, decided))
    for req in observed.requests:
        if (req.source.name, req.destination.name, req.protocol, req.port) in l4_denied:
            continue
        src = _peer_of(after, req.source, "flow source")
        dst = _peer_of(after, req.destination, "flow destination")
        if src is None or dst is None:
            _count(result, "pod no longer exists", req.count)
            continue
        request = {k: list(v) if isinstance(v, tuple) else v for k, v in req.fields}
        try:
            decided = trace(after, src, dst, req.protocol, req.port, request)
        except TraceInputError:
            _count(result, f"{req.parser} requests the {req.parser} parser cannot take as input",
                   req.count)
            continue
        if (_final(decided) == ALLOWED) != req.passed:
            result.flow_flips.append(FlowFlip(req, decided))


def _trace_pods(env: OfflineCluster, p: Probe) -> TraceResult:
    return trace(env, resolve_peer(env, p.src, "--from"), resolve_peer(env, p.dst, "--to"),
                 p.protocol, p.port)
