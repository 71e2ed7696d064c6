"""Pods of other nodes in the engine (``upsert_remote_endpoint``): the ipcache maps
their addresses to their identity, selectors see the identity, ipBlock and
egress named ports see the address; no policy is computed for them."""

from __future__ import annotations

import ipaddress

from axoneme.core.endpoint import Endpoint, NamedPort
from axoneme.core.identity import ReservedIdentity
from axoneme.core.labels import Labels
from axoneme.core.mapstate import Direction, Protocol, Verdict
from axoneme.core.policy.api import (
    CIDRPeer,
    EndpointPeer,
    PeerRule,
    Policy,
    PolicyKind,
    PolicyRef,
    PortProtocol,
    PortRule,
    Rule,
)
from axoneme.core.policy.engine import PolicyEngine
from axoneme.core.selectors import LabelSelector

IN, EG, TCP = Direction.INGRESS, Direction.EGRESS, Protocol.TCP
NET = ipaddress.ip_network


def sel(**labels: str) -> LabelSelector:
    return LabelSelector.build({f"k8s:{k}": v for k, v in labels.items()})


def policy(name: str, subject: LabelSelector, *rules: PeerRule,
           kind: PolicyKind = PolicyKind.CILIUM_NETWORK_POLICY) -> Policy:
    r = PolicyRef(kind, "default", name)
    return Policy(r, (Rule(r, subject, tuple(rules),
                           enforce_ingress=any(p.direction is IN for p in rules),
                           enforce_egress=any(p.direction is EG for p in rules)),))


def tcp(port: int = 0, name: str = "") -> tuple[PortRule, ...]:
    return (PortRule((PortProtocol(port, protocol="TCP", name=name),)),)


def setup() -> tuple[PolicyEngine, int]:
    engine = PolicyEngine()
    server = engine.allocator.allocate(Labels.from_strings(["k8s:app=server"]))
    engine.upsert_endpoint(Endpoint(1, server.id, server.labels, ipv4="10.244.0.10",
                                    namespace="default", pod_name="server"))
    engine.upsert_policy(policy("from-client", sel(app="server"),
                                PeerRule(IN, peers=(EndpointPeer(sel(app="client")),),
                                         ports=tcp(80))))
    engine.pending_ipcache_changes()  # what the datapath already has
    return engine, server.id


def verdict(engine: PolicyEngine, d: Direction, peer: int, port: int = 80) -> Verdict:
    return engine.explain(1, d, peer, TCP, port).verdict


def test_remote_pod_enters_ipcache_and_is_judged_by_identity() -> None:
    engine, _ = setup()
    client = engine.allocator.allocate(Labels.from_strings(["k8s:app=client"]))
    other = engine.allocator.allocate(Labels.from_strings(["k8s:app=other"]))
    assert engine.identity_of_ip("10.244.1.5") == ReservedIdentity.WORLD
    assert verdict(engine, IN, client.id) is Verdict.DENIED  # no pod carries it yet
    engine.upsert_remote_endpoint("default/client", client, ipv4="10.244.1.5")
    engine.upsert_remote_endpoint("default/other", other, ipv4="10.244.2.6")
    assert engine.identity_of_ip("10.244.1.5") == client.id
    assert engine.ipcache()[NET("10.244.2.6/32")] == other.id
    changes = engine.pending_ipcache_changes()
    assert changes.upserts == {NET("10.244.1.5/32"): client.id, NET("10.244.2.6/32"): other.id}
    assert verdict(engine, IN, client.id) is Verdict.ALLOWED
    assert verdict(engine, IN, other.id) is Verdict.DENIED
    assert [e.id for e in engine.endpoints()] == [1]  # no policy of its own here
    # relabelled on its node: the same address, another identity
    engine.upsert_remote_endpoint("default/client", other, ipv4="10.244.1.5")
    assert engine.pending_ipcache_changes().upserts == {NET("10.244.1.5/32"): other.id}
    assert verdict(engine, IN, client.id) is Verdict.DENIED
    engine.upsert_remote_endpoint("default/client", client, ipv4="10.244.1.5")
    # deleted: its address leaves the ipcache, its identity the selectors
    engine.remove_remote_endpoint("default/client")
    engine.remove_remote_endpoint("default/client")  # idempotent
    assert engine.pending_ipcache_changes().deletes == {NET("10.244.1.5/32")}
    assert engine.identity_of_ip("10.244.1.5") == ReservedIdentity.WORLD
    assert verdict(engine, IN, client.id) is Verdict.DENIED
    assert set(engine.remote_endpoints()) == {"default/other"}


def test_local_endpoint_wins_an_address_and_host_loses_it() -> None:
    engine, server = setup()
    client = engine.allocator.allocate(Labels.from_strings(["k8s:app=client"]))
    engine.upsert_remote_endpoint("default/stale", client, ipv4="10.244.0.10")
    assert engine.identity_of_ip("10.244.0.10") == server  # this node's pod owns it
    engine.set_host_addresses(["10.244.3.7"])
    engine.upsert_remote_endpoint("default/c", client, ipv4="10.244.3.7")
    assert engine.identity_of_ip("10.244.3.7") == client.id
    engine.remove_remote_endpoint("default/c")
    assert engine.identity_of_ip("10.244.3.7") == ReservedIdentity.HOST


def test_ipblock_and_named_ports_see_remote_pods() -> None:
    engine, _ = setup()
    web = engine.allocator.allocate(Labels.from_strings(["k8s:app=web"]))
    engine.upsert_policy(policy(
        "egress", sel(app="server"),
        PeerRule(EG, peers=None, ports=tcp(name="http")),
        PeerRule(EG, peers=(CIDRPeer(NET("10.244.9.0/24"), match=frozenset({"pods", "nodes"})),),
                 ports=tcp(53)), kind=PolicyKind.NETWORK_POLICY))
    assert verdict(engine, EG, web.id, 8080) is Verdict.DENIED
    assert engine.explain(1, EG, web.id, TCP, 53, peer_address="10.244.9.4").verdict \
        is Verdict.DENIED
    engine.upsert_remote_endpoint("default/web", web, ipv4="10.244.9.4",
                                  named_ports=(NamedPort("http", 8080),))
    assert verdict(engine, EG, web.id, 8080) is Verdict.ALLOWED  # its named port, per destination
    d = engine.explain(1, EG, web.id, TCP, 53, peer_address="10.244.9.4")
    assert d.verdict is Verdict.ALLOWED  # the ipBlock matches the remote pod's address
    engine.remove_remote_endpoint("default/web")
    assert verdict(engine, EG, web.id, 8080) is Verdict.DENIED
