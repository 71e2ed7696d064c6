"""The offline trace/matrix API (axoneme.core.policy.trace) without the CLI."""

from __future__ import annotations

import pytest
from axoneme.core.cluster import Cluster
from axoneme.core.identity import ReservedIdentity
from axoneme.core.mapstate import Protocol
from axoneme.core.policy.parse import parse_policy_obj
from axoneme.core.policy.trace import (
    OfflineCluster,
    PortSpec,
    TraceInputError,
    matrix,
    parse_icmp_type,
    parse_port,
    resolve_peer,
    trace,
)

CLUSTER = [
    {"kind": "Namespace", "metadata": {"name": "x"}},
    {"kind": "Pod", "metadata": {"name": "a", "namespace": "x", "labels": {"app": "a"}},
     "spec": {"containers": [{"ports": [{"name": "web", "containerPort": 8080}]}]},
     "status": {"podIP": "10.244.9.1"}},
    {"kind": "Pod", "metadata": {"name": "b", "namespace": "x", "labels": {"app": "b"}},
     "status": {"podIP": "10.244.9.2"}},
]
POLICY = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": {"name": "p", "namespace": "x"},
          "spec": {"endpointSelector": {"matchLabels": {"app": "a"}},
                   "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "b"}}],
                                "toPorts": [{"ports": [{"port": "web"}]}]}]}}


@pytest.fixture
def env() -> OfflineCluster:
    return OfflineCluster.build(Cluster.from_objects(CLUSTER), [parse_policy_obj(POLICY)])


def test_parse_port() -> None:
    assert parse_port("80") == PortSpec(80, Protocol.TCP)
    assert parse_port("53/udp") == PortSpec(53, Protocol.UDP, None, True)
    assert parse_port("web") == PortSpec(0, Protocol.TCP, "web")
    for bad in ("0", "65536", "80/ICMP", "", "-x", "a" * 16):
        with pytest.raises(TraceInputError):
            parse_port(bad)


def test_parse_icmp_type() -> None:
    assert parse_icmp_type("EchoRequest", "IPv4") == 8
    assert parse_icmp_type("EchoRequest", "ipv6") == 128
    assert parse_icmp_type("3", "IPv4") == 3
    with pytest.raises(TraceInputError):
        parse_icmp_type("256", "IPv4")
    with pytest.raises(TraceInputError):
        parse_icmp_type("8", "IPX")


def test_resolve_peer(env: OfflineCluster) -> None:
    assert resolve_peer(env, "x/a", "--from").endpoint is env.endpoints["x/a"]
    assert resolve_peer(env, "10.244.9.2", "--from").name == "x/b"
    assert resolve_peer(env, "203.0.113.1", "--to").identity == ReservedIdentity.WORLD
    assert resolve_peer(env, "entity:host", "--to").identity == ReservedIdentity.HOST
    with pytest.raises(TraceInputError, match="unknown pod"):
        resolve_peer(env, "a", "--to")  # namespace default has no pod a


def test_trace_and_matrix(env: OfflineCluster) -> None:
    a, b = resolve_peer(env, "x/a", "-"), resolve_peer(env, "x/b", "-")
    res = trace(env, b, a, Protocol.TCP, 8080)
    assert res.verdict == "allowed" and res.ingress.rules == ("CiliumNetworkPolicy x/p spec.ingress[0]",)
    assert trace(env, b, a, Protocol.TCP, 80).verdict == "denied"
    assert trace(env, a, a, Protocol.TCP, 80).verdict == "allowed"
    probes = {(p.src, p.dst): p for p in matrix(env, [parse_port("web")])}
    assert set(probes) == {("x/a", "x/a"), ("x/b", "x/a")}  # only a has a port named web
    assert probes[("x/b", "x/a")].verdict == "allowed" and probes[("x/b", "x/a")].port == 8080
    probes = {(p.src, p.dst): p.verdict for p in matrix(env, [parse_port("80")])}
    assert probes == {("x/a", "x/a"): "allowed", ("x/a", "x/b"): "allowed",
                      ("x/b", "x/a"): "denied", ("x/b", "x/b"): "allowed"}
