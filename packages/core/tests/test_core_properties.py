"""Property tests of resolution: order independence and monotonicity of denies/allows."""

from __future__ import annotations

import dataclasses
import ipaddress

from axoneme.core.endpoint import Endpoint, NamedPort
from axoneme.core.errors import PolicyError
from axoneme.core.labels import Labels
from axoneme.core.mapstate import Direction, MapState, Protocol, Verdict
from axoneme.core.policy.api import (
    CIDRPeer,
    EndpointPeer,
    EntityPeer,
    ICMPField,
    L7Spec,
    PeerRule,
    Policy,
    PolicyKind,
    PolicyRef,
    PortProtocol,
    PortRule,
    Rule,
)
from axoneme.core.policy.engine import EngineOptions, PolicyEngine
from axoneme.core.selectors import LabelSelector
from axoneme.l7.http import HTTPRule
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

APPS = ("a", "b", "c", "d")
NETS = [ipaddress.ip_network(n) for n in ("198.51.100.0/24", "198.51.100.128/25", "192.0.2.0/24",
                                          "0.0.0.0/0", "198.51.100.130/32", "198.51.100.7/32")]


def sel(app: str | None) -> LabelSelector:
    return LabelSelector.build({"k8s:app": app} if app else {})


peers = st.one_of(
    st.builds(lambda a: EndpointPeer(sel(a)), st.sampled_from((*APPS, None))),
    st.builds(EntityPeer, st.sampled_from(("cluster", "world", "host", "all", "none"))),
    st.builds(lambda n, e: CIDRPeer(NETS[n], tuple(NETS[i] for i in e if NETS[i].subnet_of(NETS[n]) and i != n)),
              st.integers(0, len(NETS) - 1), st.lists(st.integers(0, len(NETS) - 1), max_size=2)),
)
port_protocols = st.sampled_from((
    PortProtocol(80, protocol="TCP"), PortProtocol(80), PortProtocol(0, protocol="UDP"),
    PortProtocol(80, end_port=95, protocol="TCP"), PortProtocol(53, protocol="UDP"),
    PortProtocol(0, protocol="TCP", name="web"),
))
l7s = st.sampled_from((None, L7Spec("http"), L7Spec("http", (HTTPRule(method="GET"),)),
                       L7Spec("http", (HTTPRule(path="/x"),))))


@st.composite
def peer_rules(draw: st.DrawFn, deny: bool | None = None) -> PeerRule:
    is_deny = draw(st.booleans()) if deny is None else deny
    direction = draw(st.sampled_from((Direction.INGRESS, Direction.EGRESS)))
    ps = draw(st.one_of(st.none(), st.lists(peers, min_size=1, max_size=2).map(tuple)))
    ports: tuple[PortRule, ...] = ()
    icmps: tuple[ICMPField, ...] = ()
    kind = draw(st.integers(0, 2))
    if kind == 1:
        pps = tuple(draw(st.lists(port_protocols, min_size=1, max_size=2)))
        l7 = None if is_deny or any(p.end_port or p.port == 0 for p in pps) else draw(l7s)
        ports = (PortRule(pps, l7),)
    elif kind == 2:
        icmps = (ICMPField("IPv4", draw(st.sampled_from((0, 8)))),)
    return PeerRule(direction, deny=is_deny, peers=ps, ports=ports, icmps=icmps,
                    path=f"spec.{'deny' if is_deny else 'allow'}")


@st.composite
def policies(draw: st.DrawFn, name: str, deny: bool | None = None) -> Policy:
    ref = PolicyRef(PolicyKind.CILIUM_CLUSTERWIDE_NETWORK_POLICY, "", name)
    rules = tuple(draw(st.lists(peer_rules(deny), min_size=1, max_size=3)))
    subject = sel(draw(st.sampled_from((*APPS, None))))
    rule = Rule(ref, subject, rules, enforce_ingress=draw(st.booleans()), enforce_egress=draw(st.booleans()))
    return Policy(ref, (rule,))


def policy_sets(deny: bool | None = None, max_size: int = 5) -> st.SearchStrategy[list[Policy]]:
    return st.integers(0, max_size).flatmap(
        lambda n: st.tuples(*(policies(f"p{i}", deny) for i in range(n))).map(list))


def build(pols: list[Policy], order: list[int] | None = None, endpoints_first: bool = True,
          mode: str = "default") -> PolicyEngine:
    engine = PolicyEngine(options=EngineOptions(enforcement_mode=mode))

    def add_endpoints() -> None:
        for n, app in enumerate(APPS, 1):
            ident = engine.allocator.allocate(Labels.from_strings([f"k8s:app={app}"]))
            named = (NamedPort("web", 8000 + n),) if n % 2 else ()
            engine.upsert_endpoint(Endpoint(n, ident.id, ident.labels, ipv4=f"10.244.0.{n}", named_ports=named))

    if endpoints_first:
        add_endpoints()
    for i in order if order is not None else range(len(pols)):
        engine.upsert_policy(pols[i])
    if not endpoints_first:
        add_endpoints()
    return engine


def canonical(engine: PolicyEngine, state: MapState) -> set[tuple[object, ...]]:
    """A MapState with identities named by their labels (CIDR numbers depend on order)."""
    out = set()
    for key, entry in state.items():
        ident = engine.allocator.get(key.identity)
        name = "*" if key.identity == 0 else tuple(ident.label_strings()) if ident else key.identity
        l7 = (entry.l7.parser, frozenset(entry.l7.rules)) if entry.l7 else None
        out.add((name, key.direction, key.protocol, key.port, key.prefix_len, entry.deny,
                 entry.proxy_port, l7, entry.derived_from))
    return out


PROBES = [(Protocol.TCP, 80), (Protocol.TCP, 81), (Protocol.TCP, 90), (Protocol.UDP, 80),
          (Protocol.UDP, 53), (Protocol.TCP, 8001), (Protocol.ICMP, 8), (Protocol.ICMP, 0)]
PEER_IPS = ["10.244.0.1", "10.244.0.2", "10.244.0.3", "10.244.0.4", "198.51.100.1",
            "198.51.100.200", "192.0.2.9", "203.0.113.1"]


def allowed_set(engine: PolicyEngine) -> set[tuple[object, ...]]:
    out = set()
    peers_ids = {ip: engine.identity_of_ip(ip) for ip in PEER_IPS}
    peers_ids["host"] = 1
    for ep in engine.endpoints():
        for peer, ident in peers_ids.items():
            for d in (Direction.INGRESS, Direction.EGRESS):
                for proto, port in PROBES:
                    if engine.explain(ep.id, d, ident, proto, port).allowed:
                        out.add((ep.id, peer, d, proto, port))
    return out


SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(policy_sets(), st.randoms(use_true_random=False), st.booleans())
def test_resolution_is_order_independent(pols: list[Policy], rnd, endpoints_first: bool) -> None:
    order = list(range(len(pols)))
    rnd.shuffle(order)
    e1 = build(pols)
    e2 = build(pols, order, endpoints_first)
    for ep in e1.endpoints():
        assert canonical(e1, e1.resolve(ep.id)) == canonical(e2, e2.resolve(ep.id))
        assert e1.enforcement(ep.id) == e2.enforcement(ep.id)


@SETTINGS
@given(policy_sets(), st.data())
def test_incremental_equals_fresh(pols: list[Policy], data: st.DataObject) -> None:
    engine = build(pols)
    if pols:
        victim = data.draw(st.integers(0, len(pols) - 1))
        engine.delete_policy(pols[victim].ref)
        rest = [p for i, p in enumerate(pols) if i != victim]
        fresh = build(rest)
        for ep in fresh.endpoints():
            assert canonical(engine, engine.resolve(ep.id)) == canonical(fresh, fresh.resolve(ep.id))


def widened_deny(pol: Policy, index: int) -> Policy:
    """One of a policy's allow rules as an L3-only deny: the case where a deny must prune allows."""
    ref = PolicyRef(PolicyKind.CILIUM_CLUSTERWIDE_NETWORK_POLICY, "", "derived-deny")
    rule = pol.rules[0]
    pr = rule.rules[index % len(rule.rules)]
    deny = PeerRule(pr.direction, deny=True, peers=pr.peers, path="spec.derived")
    return Policy(ref, (Rule(ref, rule.subject, (deny,)),))


@SETTINGS
@given(policy_sets(), policies("extra-deny", deny=True), st.data())
def test_adding_a_deny_never_allows_more(pols: list[Policy], deny: Policy, data: st.DataObject) -> None:
    if pols and data.draw(st.booleans()):
        deny = widened_deny(pols[data.draw(st.integers(0, len(pols) - 1))], data.draw(st.integers(0, 2)))
    engine = build(pols)
    before = allowed_set(engine)
    engine.upsert_policy(deny)
    assert allowed_set(engine) <= before


@SETTINGS
@given(policy_sets(deny=False), policies("extra-allow", deny=False))
def test_adding_an_allow_never_denies_more(pols: list[Policy], allow: Policy) -> None:
    # enforcement "always": an allow cannot switch a direction into default deny
    engine = build(pols, mode="always")
    before = allowed_set(engine)
    engine.upsert_policy(allow)
    assert before <= allowed_set(engine)


@SETTINGS
@given(policy_sets(), st.data())
def test_a_deny_denies_what_it_names(pols: list[Policy], data: st.DataObject) -> None:
    assume(pols)
    deny = widened_deny(pols[data.draw(st.integers(0, len(pols) - 1))], data.draw(st.integers(0, 2)))
    engine = build(pols)
    engine.upsert_policy(deny)
    rule = deny.rules[0]
    pr = rule.rules[0]
    cache = engine.selector_cache
    named: set[int] = set()
    for peer in pr.peers if pr.peers is not None else ():
        named |= cache.selected(peer.selector if isinstance(peer, EndpointPeer) else peer)
    for ep in engine.endpoints():
        if not rule.subject.matches(ep.labels):
            continue
        for ip in PEER_IPS:
            ident = engine.identity_of_ip(ip)
            if pr.peers is not None and ident not in named and 0 not in named:
                continue
            for proto, port in PROBES:
                assert not engine.explain(ep.id, pr.direction, ident, proto, port).allowed, (ep, ip, proto, port)



def staged(pol: Policy) -> Policy:
    """The same policy staged (policy.axoneme.io/mode: audit)."""
    return dataclasses.replace(pol, audit=True, rules=tuple(dataclasses.replace(r, audit=True) for r in pol.rules))


def decisions(engine: PolicyEngine) -> dict[tuple[object, ...], tuple[bool, bool]]:
    """Per probe: (allowed, audited)."""
    out = {}
    peers_ids = {ip: engine.identity_of_ip(ip) for ip in PEER_IPS} | {"host": 1}
    for ep in engine.endpoints():
        for peer, ident in peers_ids.items():
            for d in (Direction.INGRESS, Direction.EGRESS):
                for proto, port in PROBES:
                    dec = engine.explain(ep.id, d, ident, proto, port)
                    out[(ep.id, peer, d, proto, port)] = (dec.allowed, bool(dec.entry and dec.entry.audit))
    return out


def redirected(engine: PolicyEngine) -> set[tuple[object, ...]]:
    peers_ids = {ip: engine.identity_of_ip(ip) for ip in PEER_IPS} | {"host": 1}
    return {(ep.id, peer, d, proto, port) for ep in engine.endpoints() for peer, ident in peers_ids.items()
            for d in (Direction.INGRESS, Direction.EGRESS) for proto, port in PROBES
            if engine.explain(ep.id, d, ident, proto, port).verdict is Verdict.REDIRECTED}


@SETTINGS
@given(policy_sets(), st.data())
def test_staged_policies_change_no_verdict_and_audit_exactly_the_drops(pols: list[Policy],
                                                                     data: st.DataObject) -> None:
    """A staged policy forwards and drops nothing differently; a probe is
    audited iff the enforced set allows it and enforcing every policy would
    drop it (redirected probes are the proxy's to report)."""
    flags = [data.draw(st.booleans()) for _ in pols]
    enforced = build([p for p, f in zip(pols, flags, strict=True) if not f])
    with_staged = build([staged(p) if f else p for p, f in zip(pols, flags, strict=True)])
    all_enforced = build(pols)
    want = allowed_set(enforced)
    assert allowed_set(with_staged) == want
    assert redirected(with_staged) == redirected(enforced)
    proxied = redirected(enforced)
    full = allowed_set(all_enforced)
    for probe, (_, audited) in decisions(with_staged).items():
        assert audited == (probe in want and probe not in full and probe not in proxied), probe
    if not any(flags):  # nothing staged: the very same map
        for ep in enforced.endpoints():
            assert with_staged.resolve(ep.id) == enforced.resolve(ep.id)


@SETTINGS
@given(policy_sets(), st.data())
def test_audit_mode_forwards_everything_and_audits_the_drops(pols: list[Policy], data: st.DataObject) -> None:
    engine = build(pols)
    dropped = {p for p, (allowed, _) in decisions(engine).items() if not allowed}
    audit_ids = {ep.id for ep in engine.endpoints() if data.draw(st.booleans())}
    for eid in audit_ids:
        assert engine.set_audit_mode(eid, True)
    proxied = redirected(engine)  # a would-be drop that an L7 redirect takes is the proxy's to report
    for probe, (allowed, audited) in decisions(engine).items():
        if probe[0] in audit_ids:
            assert allowed and audited == (probe in dropped and probe not in proxied), probe
        else:
            assert allowed == (probe not in dropped) and not audited, probe
    for eid in audit_ids:
        engine.set_audit_mode(eid, False)
    assert {p for p, (allowed, _) in decisions(engine).items() if not allowed} == dropped


# -- incremental maintenance (issue 17): after any sequence of changes, every
# endpoint's incrementally kept MapState equals a full recompute, and the
# MapChanges handed out add up to it (what a datapath holds).

def _ops() -> st.SearchStrategy[list[tuple[object, ...]]]:
    op = st.one_of(
        st.tuples(st.just("upsert"), st.sampled_from(("p0", "p1", "p2")).flatmap(policies)),
        st.tuples(st.just("delete"), st.sampled_from(("p0", "p1", "p2"))),
        st.tuples(st.just("endpoint"), st.integers(1, 5), st.sampled_from((*APPS, "e")),
                  st.booleans()),
        st.tuples(st.just("remove"), st.integers(1, 5)),
        st.tuples(st.just("host"), st.booleans()),
    )
    return st.lists(op, max_size=12)


def _apply_op(engine: PolicyEngine, op: tuple[object, ...]) -> None:
    kind = op[0]
    if kind == "upsert":
        engine.upsert_policy(op[1])  # type: ignore[arg-type]
    elif kind == "delete":
        ref = PolicyRef(PolicyKind.CILIUM_CLUSTERWIDE_NETWORK_POLICY, "", str(op[1]))
        if engine.get_policy(ref) is not None:
            engine.delete_policy(ref)
    elif kind == "endpoint":
        n, app, named = int(op[1]), str(op[2]), bool(op[3])  # type: ignore[call-overload]
        ident = engine.allocator.allocate(Labels.from_strings([f"k8s:app={app}"]))
        ports = (NamedPort("web", 8000 + n),) if named else ()
        engine.upsert_endpoint(Endpoint(n, ident.id, ident.labels, ipv4=f"10.244.0.{n}",
                                        named_ports=ports))
    elif kind == "remove":
        engine.remove_endpoint(int(op[1]))  # type: ignore[call-overload]
    else:
        engine.set_host_addresses(["198.51.100.7"] if op[1] else [])


def _datapath_view(state: MapState) -> dict[object, tuple[object, ...]]:
    return {k: (e, e.l7) for k, e in state.items()}


@SETTINGS
@given(_ops(), st.sampled_from(("default", "always")))
def test_incremental_equals_full_recompute(ops: list[tuple[object, ...]], mode: str) -> None:
    engine = build([], mode=mode)
    held: dict[int, MapState] = {}  # what a datapath fed pending_changes() holds
    for op in ops:
        try:
            _apply_op(engine, op)
        except PolicyError:
            pass  # an L7 conflict is refused and leaves everything as it was
        for eid, changes in engine.pending_changes().items():
            held[eid] = held.get(eid, MapState()).apply(changes)
        live = {ep.id for ep in engine.endpoints()}
        held = {eid: st_ for eid, st_ in held.items() if eid in live}
        for eid in live:
            full = engine._compute(eid, strict=False)
            state = engine.resolve(eid)
            assert canonical(engine, state) == canonical(engine, full.state), op
            assert engine.enforcement(eid) == (full.ingress, full.egress)
            assert engine.selecting_rules(eid) == list(full.rules)
            assert _datapath_view(held.get(eid, MapState())) == _datapath_view(state), op
        assert engine.ipcache() == _full_ipcache(engine)


@SETTINGS
@given(_ops(), st.lists(st.booleans(), min_size=12, max_size=12))
def test_handed_out_changes_add_up_when_taken_now_and_then(ops: list[tuple[object, ...]],
                                                          take: list[bool]) -> None:
    """Several changes (endpoint rebuilds among them) between two hand-outs:
    the engine keeps no copy of what it handed out (_handout), the changes
    still turn what a datapath holds into each endpoint's state."""
    engine = build([])
    held: dict[int, MapState] = {}
    ipc: dict[object, int] = {}  # and the ipcache a datapath fed pending_ipcache_changes() holds

    def take_ipcache() -> None:
        changes = engine.pending_ipcache_changes()
        for net in changes.deletes:
            del ipc[net]
        ipc.update(changes.upserts)

    for op, now in zip(ops, take, strict=False):
        try:
            _apply_op(engine, op)
        except PolicyError:
            pass
        if op[0] == "remove":  # the datapath drops a removed endpoint's state
            held.pop(int(op[1]), None)  # type: ignore[call-overload]
        if now:
            take_ipcache()
            for eid, changes in engine.pending_changes().items():
                held[eid] = held.get(eid, MapState()).apply(changes)
            engine.ipcache()  # a read in between changes nothing handed out
    take_ipcache()
    again = engine.pending_ipcache_changes()
    assert ipc == engine.ipcache() and not again.upserts and not again.deletes
    for eid, changes in engine.pending_changes().items():
        held[eid] = held.get(eid, MapState()).apply(changes)
    for ep in engine.endpoints():
        assert _datapath_view(held.get(ep.id, MapState())) == _datapath_view(
            engine.resolve(ep.id)), ops


def _full_ipcache(engine: PolicyEngine) -> dict[object, int]:
    """The ipcache as the engine defines it, built from scratch."""
    out: dict[object, int] = {ipaddress.ip_network("0.0.0.0/0"): 2, ipaddress.ip_network("::/0"): 2}
    for ident in engine.identities():
        if ident.cidr is not None:
            out[ident.cidr] = ident.id
    for net in engine._host_nets:
        out[net] = 1
    for ep in engine.endpoints():
        out[ipaddress.ip_network(ep.ipv4)] = ep.identity
    return out
