"""Upstream NetworkPolicy semantics through address keys (issue 16):
ipBlock over pod addresses, per address; egress named ports per destination;
Cilium's CIDR fields under policy-cidr-match-mode."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from axoneme.core.cluster import Cluster
from axoneme.core.endpoint import Endpoint
from axoneme.core.errors import PolicyError
from axoneme.core.labels import Labels
from axoneme.core.mapstate import (
    ADDRESS_IDENTITY,
    Direction,
    Entry,
    Key,
    MapState,
    Protocol,
    Verdict,
)
from axoneme.core.policy.api import CIDRPeer, PeerRule, Policy, PolicyKind, PolicyRef, Rule
from axoneme.core.policy.engine import EngineOptions, PolicyEngine, parse_cidr_match_mode
from axoneme.core.policy.parse import parse_policy_obj
from axoneme.core.policy.trace import OfflineCluster, matrix, parse_port, resolve_peer, trace
from axoneme.core.selectors import LabelSelector
from hypothesis import given, settings
from hypothesis import strategies as st

EG, IN = Direction.EGRESS, Direction.INGRESS
TCP = Protocol.TCP


def pod(ns: str, name: str, ip: str, labels: dict[str, str], ports: dict[str, int] | None = None
        ) -> dict[str, Any]:
    spec = {"containers": [{"ports": [{"name": k, "containerPort": v} for k, v in (ports or {}).items()]}]}
    return {"kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": spec, "status": {"podIP": ip}}


# y/b and y/c share their labels: only addresses tell them apart.
CLUSTER = [
    {"kind": "Namespace", "metadata": {"name": "x"}},
    {"kind": "Namespace", "metadata": {"name": "y"}},
    pod("x", "a", "10.244.1.1", {"pod": "a"}),
    pod("y", "b", "10.244.2.2", {"pod": "same"}, {"web": 80}),
    pod("y", "c", "10.244.2.3", {"pod": "same"}, {"web": 81}),
    pod("y", "d", "10.244.2.4", {"pod": "d"}, {"web": 80}),
]


def np_egress(name: str, *rules: dict[str, Any], ns: str = "x", subject: str = "a") -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"podSelector": {"matchLabels": {"pod": subject}}, "policyTypes": ["Egress"],
                     "egress": list(rules)}}


def block(cidr: str, *excepts: str) -> dict[str, Any]:
    ip: dict[str, Any] = {"cidr": cidr}
    if excepts:
        ip["except"] = list(excepts)
    return {"ipBlock": ip}


def verdicts(policies: list[dict[str, Any]], port: str = "80", options: EngineOptions | None = None
             ) -> dict[tuple[str, str], str]:
    env = OfflineCluster.build(Cluster.from_objects(CLUSTER), [parse_policy_obj(p) for p in policies], options)
    return {(p.src, p.dst): p.verdict for p in matrix(env, [parse_port(port)])}


def test_ip_block_of_one_pod_admits_that_pod_only() -> None:
    got = verdicts([np_egress("p", {"to": [block("10.244.2.2/32")]})])
    assert got[("x/a", "y/b")] == "allowed"  # Cilium denies this (cilium#9209)
    assert got[("x/a", "y/c")] == "denied"  # same labels, other address
    assert got[("x/a", "y/d")] == "denied"
    assert got[("y/b", "y/c")] == "allowed"  # not selected


def test_ip_block_except_and_overlap() -> None:
    wide = np_egress("p", {"to": [block("10.244.0.0/16", "10.244.2.2/32")]})
    got = verdicts([wide])
    assert got[("x/a", "y/b")] == "denied"
    assert got[("x/a", "y/c")] == "allowed" and got[("x/a", "y/d")] == "allowed"
    # another peer of the same policy may allow what one peer excepts
    both = np_egress("p", {"to": [block("10.244.0.0/16", "10.244.2.2/32"), block("10.244.2.2/32")]})
    assert verdicts([both])[("x/a", "y/b")] == "allowed"
    # ... and another policy too (upstream's "IP overlapping both IPBlock.CIDR and IPBlock.Except")
    assert verdicts([wide, np_egress("q", {"to": [block("10.244.2.2/32")]})])[("x/a", "y/b")] == "allowed"


def test_ip_block_on_ingress_matches_the_source_address() -> None:
    pol = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": "p", "namespace": "y"},
           "spec": {"podSelector": {"matchLabels": {"pod": "d"}},
                    "ingress": [{"from": [block("10.244.1.0/24")]}]}}
    got = verdicts([pol])
    assert got[("x/a", "y/d")] == "allowed"
    assert got[("y/b", "y/d")] == "denied"


def test_ip_block_trace_names_the_rule() -> None:
    env = OfflineCluster.build(Cluster.from_objects(CLUSTER),
                               [parse_policy_obj(np_egress("p", {"to": [block("10.244.2.2/32")]}))])
    res = trace(env, resolve_peer(env, "x/a", "--from"), resolve_peer(env, "y/b", "--to"), TCP, 80)
    assert res.verdict == "allowed"
    assert res.egress.rules == ("NetworkPolicy x/p spec.egress[0]",)
    assert res.egress.key is not None and res.egress.key.address == "10.244.2.2"
    by_ip = trace(env, resolve_peer(env, "x/a", "--from"), resolve_peer(env, "10.244.2.3", "--to"), TCP, 80)
    assert by_ip.verdict == "denied"


def test_named_port_in_egress_resolves_per_destination() -> None:
    pol = np_egress("p", {"to": [{"namespaceSelector": {}}], "ports": [{"port": "web"}]})
    for port, allowed in (("80", {"y/b", "y/d"}), ("81", {"y/c"})):
        got = verdicts([pol], port)
        assert {d for (s, d), v in got.items() if s == "x/a" and v == "allowed" and d != "x/a"} == allowed
    env = OfflineCluster.build(Cluster.from_objects(CLUSTER), [parse_policy_obj(pol)])
    state = env.engine.resolve(env.endpoints["x/a"].id)
    # y/b and y/c share an identity and differ: address keys; y/d alone: an identity key
    assert Key.for_address("10.244.2.2", EG, TCP, 80, 16) in state
    assert Key.for_address("10.244.2.3", EG, TCP, 81, 16) in state
    assert Key(env.endpoints["y/d"].identity, EG, TCP, 80, 16) in state
    assert not any(k.identity == env.endpoints["y/b"].identity for k in state)


def test_named_port_any_peer_skips_non_pods() -> None:
    pol = np_egress("p", {"ports": [{"port": "web"}]})
    env = OfflineCluster.build(Cluster.from_objects(CLUSTER), [parse_policy_obj(pol)])
    a = env.endpoints["x/a"].id
    assert env.engine.explain(a, EG, 2, TCP, 80).verdict is Verdict.DENIED  # world names nothing
    assert env.engine.explain(a, EG, env.endpoints["y/d"].identity, TCP, 80).verdict is Verdict.ALLOWED


def test_named_port_with_ip_block_uses_each_pods_number() -> None:
    got = verdicts([np_egress("p", {"to": [block("10.244.2.0/24")], "ports": [{"port": "web"}]})], "81")
    assert got[("x/a", "y/c")] == "allowed"
    assert got[("x/a", "y/b")] == "denied"  # y/b's web is 80
    assert verdicts([np_egress("p", {"to": [block("10.244.2.3/32")], "ports": [{"port": "web"}]})],
                    "80")[("x/a", "y/b")] == "denied"


def cnp_to_cidr(cidr: str) -> dict[str, Any]:
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": "c", "namespace": "x"},
            "spec": {"endpointSelector": {"matchLabels": {"pod": "a"}}, "egress": [{"toCIDR": [cidr]}]}}


@pytest.mark.parametrize(("mode", "want"), [("", "denied"), ("nodes", "denied"), ("pods", "allowed"),
                                            ("nodes,pods", "allowed")])
def test_cilium_cidr_match_mode(mode: str, want: str) -> None:
    got = verdicts([cnp_to_cidr("10.244.2.2/32")], options=EngineOptions(cidr_match_mode=mode))
    assert got[("x/a", "y/b")] == want
    assert got[("x/a", "y/c")] == "denied"


def test_cidr_match_mode_values() -> None:
    assert parse_cidr_match_mode("") == frozenset()
    assert parse_cidr_match_mode("nodes, pods") == {"nodes", "pods"}
    with pytest.raises(PolicyError, match="policy-cidr-match-mode"):
        EngineOptions(cidr_match_mode="services")


def test_cidr_match_nodes_selects_host_addresses() -> None:
    engine = PolicyEngine(options=EngineOptions(cidr_match_mode="nodes"))
    ident = engine.allocator.allocate(Labels.from_strings(["k8s:pod=a"]))
    engine.upsert_endpoint(Endpoint(1, ident.id, ident.labels, ipv4="10.244.0.1"))
    sub = LabelSelector.build({"k8s:pod": "a"})
    ref = PolicyRef(PolicyKind.CILIUM_NETWORK_POLICY, "default", "n")
    peer = CIDRPeer(ipaddress.ip_network("192.0.2.0/24"))
    engine.upsert_policy(Policy(ref, (Rule(ref, sub, (PeerRule(EG, peers=(peer,)),), enforce_egress=True),)))
    assert engine.explain(1, EG, 1, TCP, 22, "192.0.2.7").verdict is Verdict.DENIED
    engine.set_host_addresses(["192.0.2.7"])  # the engine recomputes the policy's users
    assert engine.explain(1, EG, 1, TCP, 22, "192.0.2.7").verdict is Verdict.ALLOWED
    assert engine.explain(1, EG, 1, TCP, 22, "192.0.2.8").verdict is Verdict.DENIED


def test_address_keys_follow_pods() -> None:
    engine = PolicyEngine()
    pol = parse_policy_obj(np_egress("p", {"to": [block("10.244.2.0/24", "10.244.2.9/32")]}, ns="default"))
    ia = engine.allocator.allocate(Labels.from_strings(["k8s:pod=a", "k8s:io.kubernetes.pod.namespace=default"]))
    ib = engine.allocator.allocate(Labels.from_strings(["k8s:pod=b"]))
    engine.upsert_endpoint(Endpoint(1, ia.id, ia.labels, ipv4="10.244.1.1"))
    engine.upsert_policy(pol)
    engine.pending_changes()
    engine.upsert_endpoint(Endpoint(2, ib.id, ib.labels, ipv4="10.244.2.5"))
    changes = engine.pending_changes()[1]
    assert set(changes.adds) == {Key.for_address("10.244.2.5", EG)}
    engine.upsert_endpoint(Endpoint(2, ib.id, ib.labels, ipv4="10.244.2.9"))  # moved into the except
    changes = engine.pending_changes()[1]
    assert changes.deletes == {Key.for_address("10.244.2.5", EG)} and not changes.adds
    engine.upsert_endpoint(Endpoint(2, ib.id, ib.labels, ipv4="10.244.2.6"))
    engine.remove_endpoint(2)
    assert not any(k.is_address for k in engine.resolve(1))


def test_key_address_invariants_and_lookup() -> None:
    with pytest.raises(ValueError):
        Key(5, EG, address="10.0.0.1")
    with pytest.raises(ValueError):
        Key(ADDRESS_IDENTITY, EG)
    allow, deny = Entry(), Entry(deny=True)
    state = MapState({Key.for_address("10.0.0.1", EG, TCP, 80, 16): allow, Key(7, EG): allow})
    assert state.lookup(9, EG, TCP, 80, "10.0.0.1").verdict is Verdict.ALLOWED
    assert state.lookup(9, EG, TCP, 80).verdict is Verdict.DENIED  # no address given
    assert state.lookup(9, EG, TCP, 81, "10.0.0.1").verdict is Verdict.DENIED
    denied = MapState({**state, Key(0, EG, TCP, 80, 16): deny})
    assert denied.lookup(7, EG, TCP, 80, "10.0.0.1").verdict is Verdict.DENIED_BY_RULE
    assert str(Key.for_address("10.0.0.1", EG, TCP, 80, 16)) == "EGRESS addr=10.0.0.1 80/TCP"


HOSTS = [f"10.244.3.{n}" for n in range(1, 9)]
nets = st.builds(lambda base, plen: ipaddress.ip_network(f"10.244.3.{base}/{plen}", strict=False),
                 st.integers(0, 15), st.integers(28, 32))


@st.composite
def blocks(draw: st.DrawFn) -> CIDRPeer:
    cidr = draw(nets)
    subs = [n for n in (ipaddress.ip_network(f"{h}/32") for h in HOSTS) if n.subnet_of(cidr)]
    excepts = draw(st.lists(st.sampled_from(subs), max_size=2, unique=True)) if subs else []
    return CIDRPeer(cidr, tuple(excepts), frozenset({"pods", "nodes"}))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(blocks(), min_size=1, max_size=3), min_size=1, max_size=3))
def test_ip_blocks_match_exactly_the_union_of_their_addresses(rules: list[list[CIDRPeer]]) -> None:
    """Property: an egress from pod 0 to pod n is allowed iff some peer of
    some rule has n's address in its CIDR and not in its own excepts; pods
    sharing one identity never leak into each other."""
    engine = PolicyEngine()
    same = engine.allocator.allocate(Labels.from_strings(["k8s:pod=same"]))
    src = engine.allocator.allocate(Labels.from_strings(["k8s:pod=src"]))
    engine.upsert_endpoint(Endpoint(100, src.id, src.labels, ipv4="10.244.9.9"))
    for n, ip in enumerate(HOSTS, 1):
        engine.upsert_endpoint(Endpoint(n, same.id, same.labels, ipv4=ip))
    ref = PolicyRef(PolicyKind.NETWORK_POLICY, "default", "p")
    peer_rules = tuple(PeerRule(EG, peers=tuple(r)) for r in rules)
    engine.upsert_policy(Policy(ref, (Rule(ref, LabelSelector.build({"k8s:pod": "src"}), peer_rules,
                                           enforce_egress=True),)))
    for ip in HOSTS:
        want = any(p.contains(ipaddress.ip_address(ip)) for r in rules for p in r)
        got = engine.explain(100, EG, same.id, TCP, 80, ip).allowed
        assert got == want, ip
