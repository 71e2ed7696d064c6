"""Entities from the cluster (``PolicyEngine.set_cluster_addresses``): other
nodes' addresses are remote-node (6), the API server's kube-apiserver (7), this
node's host (1, which also carries kube-apiserver while the API server runs
here), as Cilium's ipcache has them; entities select by their reserved label."""

from __future__ import annotations

import ipaddress

from axoneme.core.endpoint import Endpoint
from axoneme.core.identity import ReservedIdentity
from axoneme.core.labels import Labels
from axoneme.core.mapstate import Direction, Protocol, Verdict
from axoneme.core.policy.api import (
    CIDRPeer,
    EntityPeer,
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

EG, TCP = Direction.EGRESS, Protocol.TCP
R = ReservedIdentity
NET = ipaddress.ip_network


def egress_to(name: str, *peers: object, kind: PolicyKind = PolicyKind.CILIUM_NETWORK_POLICY
              ) -> Policy:
    r = PolicyRef(kind, "default", name)
    rule = PeerRule(EG, peers=tuple(peers),  # type: ignore[arg-type]
                    ports=(PortRule((PortProtocol(443, protocol="TCP"),)),))
    return Policy(r, (Rule(r, LabelSelector.build({"k8s:app": "client"}), (rule,),
                           enforce_ingress=False, enforce_egress=True),))


def engine_with(*peers: object, kind: PolicyKind = PolicyKind.CILIUM_NETWORK_POLICY
                ) -> PolicyEngine:
    engine = PolicyEngine()
    client = engine.allocator.allocate(Labels.from_strings(["k8s:app=client"]))
    engine.upsert_endpoint(Endpoint(1, client.id, client.labels, ipv4="10.244.0.10",
                                    namespace="default", pod_name="client"))
    engine.upsert_policy(egress_to("p", *peers, kind=kind))
    return engine


def allowed(engine: PolicyEngine, peer: int, address: str | None = None) -> bool:
    return engine.explain(1, EG, peer, TCP, 443, peer_address=address).verdict \
        is Verdict.ALLOWED


def test_ipcache_maps_other_nodes_and_the_api_server_below_endpoints_and_host():
    engine = engine_with(EntityPeer("remote-node"))
    engine.set_host_addresses(["192.0.2.1"])
    assert engine.identity_of_ip("192.0.2.2") == R.WORLD
    assert engine.set_cluster_addresses(["192.0.2.2", "192.0.2.3"], ["192.0.2.3"])
    assert not engine.set_cluster_addresses(["192.0.2.2", "192.0.2.3"], ["192.0.2.3"])
    assert engine.identity_of_ip("192.0.2.2") == R.REMOTE_NODE
    assert engine.identity_of_ip("192.0.2.3") == R.KUBE_APISERVER  # API server on node 3
    assert engine.identity_of_ip("192.0.2.1") == R.HOST
    changes = engine.pending_ipcache_changes()
    assert changes.upserts[NET("192.0.2.2/32")] == R.REMOTE_NODE
    # a node gone: its address is world again, and the datapath is told
    engine.set_cluster_addresses(["192.0.2.3"], ["192.0.2.3"])
    assert engine.identity_of_ip("192.0.2.2") == R.WORLD
    assert NET("192.0.2.2/32") in engine.pending_ipcache_changes().deletes


def test_remote_node_selects_other_nodes_and_an_api_server_on_one():
    engine = engine_with(EntityPeer("remote-node"))
    assert allowed(engine, R.REMOTE_NODE)
    assert allowed(engine, R.KUBE_APISERVER)  # 7 carries reserved:remote-node (Cilium)
    assert not allowed(engine, R.HOST) and not allowed(engine, R.WORLD)


def test_kube_apiserver_selects_7_and_the_host_while_the_api_server_runs_here():
    engine = engine_with(EntityPeer("kube-apiserver"))
    engine.set_host_addresses(["192.0.2.1"])
    assert allowed(engine, R.KUBE_APISERVER)
    assert not allowed(engine, R.HOST) and not allowed(engine, R.REMOTE_NODE)
    engine.set_cluster_addresses([], ["192.0.2.1"])  # the API server is this node
    assert engine.identity_of_ip("192.0.2.1") == R.HOST  # host stays host
    assert allowed(engine, R.HOST)
    host = engine.selector_cache.identity(int(R.HOST))
    assert host is not None and host.labels.lookup("reserved", "kube-apiserver") is not None
    assert host.labels.lookup("reserved", "host") is not None
    engine.set_cluster_addresses([], ["192.0.2.9"])  # it moved elsewhere
    assert not allowed(engine, R.HOST)
    assert allowed(engine, R.KUBE_APISERVER)
    # the node's addresses changing has the same effect
    engine.set_host_addresses(["192.0.2.1", "192.0.2.9"])
    assert allowed(engine, R.HOST)


def test_host_entity_and_cluster_entity():
    engine = engine_with(EntityPeer("host"))
    engine.set_host_addresses(["192.0.2.1"])
    engine.set_cluster_addresses(["192.0.2.2"], ["192.0.2.1"])
    assert allowed(engine, R.HOST) and not allowed(engine, R.REMOTE_NODE)
    engine = engine_with(EntityPeer("cluster"))
    assert allowed(engine, R.REMOTE_NODE) and allowed(engine, R.KUBE_APISERVER)
    assert allowed(engine, R.HOST) and not allowed(engine, R.WORLD)


def test_ipblock_matches_other_nodes_and_the_api_server_by_address():
    """Upstream: an ipBlock matches every address in it, nodes' included."""
    engine = engine_with(CIDRPeer(NET("192.0.2.0/24"), match=frozenset({"pods", "nodes"})),
                         kind=PolicyKind.NETWORK_POLICY)
    assert not allowed(engine, R.REMOTE_NODE, "192.0.2.2")
    engine.set_cluster_addresses(["192.0.2.2", "198.51.100.7"], ["192.0.2.3"])
    assert allowed(engine, R.REMOTE_NODE, "192.0.2.2")
    assert allowed(engine, R.KUBE_APISERVER, "192.0.2.3")
    assert not allowed(engine, R.REMOTE_NODE, "198.51.100.7")  # outside the block
