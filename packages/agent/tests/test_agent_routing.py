"""Node routing's desired state, from Node objects to routes/neighbours/FDB
(no kernel: the kernel side is test_agent_routing_kernel.py)."""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any

import pytest
from axoneme.agent._noderoutes import RoutingService
from axoneme.agent._routing import (
    VXLAN_DEVICE,
    Desired,
    FdbEntry,
    Neighbour,
    NodeInfo,
    Route,
    RoutingError,
    desired_state,
    node_info,
    vtep_mac,
)

IP = ipaddress.IPv4Address
NET = ipaddress.IPv4Network


def node(name: str, ip: str | None, cidr: str | None) -> NodeInfo:
    return NodeInfo(name, IP(ip) if ip else None, NET(cidr) if cidr else None)


def node_obj(name: str, ip: str | None = None, cidr: str | None = None,
             **extra: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {"kind": "Node", "metadata": {"name": name}, "spec": {}, "status": {}}
    if cidr:
        obj["spec"]["podCIDR"] = cidr
        obj["spec"]["podCIDRs"] = [cidr]
    if ip:
        obj["status"]["addresses"] = [{"type": "Hostname", "address": name},
                                      {"type": "InternalIP", "address": ip}]
    obj["spec"].update(extra)
    return obj


A = node("a", "10.255.252.1", "10.244.0.0/24")
B = node("b", "10.255.252.2", "10.244.1.0/24")
C = node("c", "10.255.252.3", "10.244.2.0/24")


def test_node_info_reads_pod_cidr_and_internal_ip() -> None:
    assert node_info(node_obj("b", "10.255.252.2", "10.244.1.0/24")) == B
    dual = node_obj("d", "10.255.252.4")
    dual["spec"]["podCIDRs"] = ["fd00:10:244::/64", "10.244.4.0/24"]
    dual["status"]["addresses"] = [{"type": "InternalIP", "address": "fd00::4"},
                                   {"type": "ExternalIP", "address": "10.0.0.4"},
                                   {"type": "InternalIP", "address": "10.255.252.4"}]
    assert node_info(dual) == node("d", "10.255.252.4", "10.244.4.0/24")
    ext = node_obj("e")
    ext["status"]["addresses"] = [{"type": "ExternalIP", "address": "10.0.0.5"}]
    assert node_info(ext).ip == IP("10.0.0.5")  # no InternalIP: ExternalIP, as Cilium
    bad = node_obj("f", "not-an-ip", "10.244.6.0/24")
    bad["spec"]["podCIDRs"] = ["nonsense"]
    assert node_info(bad) == node("f", None, "10.244.6.0/24")  # podCIDR still read
    assert node_info({"metadata": {"name": "g"}}) == node("g", None, None)


def test_native_one_route_per_remote_node_via_its_ip() -> None:
    want = desired_state("native", A, [A, B, C])
    assert want.routes == {Route(B.pod_cidr, B.ip), Route(C.pod_cidr, C.ip)}  # type: ignore[arg-type]
    assert not want.neighbours and not want.fdb and want.device_local is None
    assert want.problems == {} and want.owners == {B.pod_cidr: "b", C.pod_cidr: "c"}


def test_tunnel_route_neighbour_and_fdb_per_remote_node() -> None:
    want = desired_state("tunnel", A, [A, B])
    assert want.device_local == A.ip
    assert want.routes == {Route(NET("10.244.1.0/24"), IP("10.255.252.2"), VXLAN_DEVICE)}
    assert want.neighbours == {Neighbour(IP("10.255.252.2"), "0e:ae:0a:ff:fc:02")}
    assert want.fdb == {FdbEntry("0e:ae:0a:ff:fc:02", IP("10.255.252.2"))}
    assert vtep_mac(IP("10.255.252.1")) == "0e:ae:0a:ff:fc:01"


def test_tunnel_needs_this_nodes_address() -> None:
    want = desired_state("tunnel", node("a", None, "10.244.0.0/24"), [B])
    assert want == Desired("tunnel", problems={"b": want.problems["b"]})
    assert "this node has no IPv4 address" in want.problems["b"]
    assert desired_state("tunnel", None, [B]).routes == frozenset()
    # native mode routes without knowing this node
    assert desired_state("native", None, [B]).routes == {Route(B.pod_cidr, B.ip)}  # type: ignore[arg-type]


@pytest.mark.parametrize("bad,why", [
    (node("x", None, "10.244.9.0/24"), "no IPv4 address"),
    (node("x", "10.255.252.9", None), "no IPv4 pod CIDR"),
    (node("x", "10.255.252.9", "0.0.0.0/0"), "shorter than /8"),
    (node("x", "10.255.252.9", "10.0.0.0/7"), "shorter than /8"),
    (node("x", "10.255.252.9", "10.255.252.0/24"), "contains node address 10.255.252.1"),
    (node("x", "10.255.252.9", "10.244.0.0/16"), "overlaps this node's pod CIDR (a)"),
    (node("x", "10.255.252.9", "10.244.1.128/25"), "overlaps node b's pod CIDR"),
    (node("x", "10.255.252.1", "10.244.9.0/24"), "address 10.255.252.1 is also this node (a)"),
    (node("x", "10.255.252.2", "10.244.9.0/24"), "address 10.255.252.2 is also node b"),
])
def test_remote_nodes_that_would_take_others_traffic_are_skipped(bad: NodeInfo, why: str) -> None:
    want = desired_state("native", A, [A, B, bad])
    assert want.routes == {Route(B.pod_cidr, B.ip)}  # type: ignore[arg-type]
    assert why in want.problems["x"], want.problems


def test_overlap_goes_to_the_first_name_whatever_the_order() -> None:
    late = node("z", "10.255.252.26", "10.244.1.0/24")
    for order in ([late, B], [B, late]):
        want = desired_state("native", A, order)
        assert want.routes == {Route(B.pod_cidr, B.ip)}  # type: ignore[arg-type]
        assert set(want.problems) == {"z"}


def test_pods_get_the_tunnel_overhead_off_their_mtu() -> None:
    from axoneme.agent._config import AgentConfig

    k8s = {"k8s_kubeconfig": "kubeconfig"}
    assert AgentConfig(**k8s, routing_mode="tunnel").pod_mtu == 1450  # type: ignore[arg-type]
    assert AgentConfig(**k8s, routing_mode="tunnel", mtu=9000).pod_mtu == 8950  # type: ignore[arg-type]
    assert AgentConfig(**k8s).pod_mtu == 1500  # type: ignore[arg-type]
    assert AgentConfig(routing_mode="tunnel").pod_mtu == 1500  # standalone: no routing


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown routing mode 'vxlan'"):
        desired_state("vxlan", A, [B])
    with pytest.raises(ValueError, match="unknown routing mode"):
        RoutingService("geneve", "a")


class FakeKernel:
    """Records what RoutingService asks of the kernel."""

    def __init__(self) -> None:
        self.applied: list[Desired] = []
        self.cleaned = 0
        self.problems: dict[str, str] = {}

    def apply(self, desired: Desired) -> dict[str, str]:
        self.applied.append(desired)
        self.problems = dict(desired.problems)
        return self.problems

    def cleanup(self) -> int:
        self.cleaned += 1
        return 0

    def view(self) -> dict[str, Any]:
        return {}


def test_service_follows_node_events() -> None:
    kernel = FakeKernel()
    svc = RoutingService("native", "a", kernel)  # type: ignore[arg-type]
    a, b, c = (node_obj(n.name, str(n.ip), str(n.pod_cidr)) for n in (A, B, C))

    async def run() -> None:
        await svc.on_node_events([("ADDED", a), ("ADDED", b)], True)
        assert kernel.applied[-1].routes == {Route(B.pod_cidr, B.ip)}  # type: ignore[arg-type]
        await svc.on_node_events([("ADDED", c)], False)
        assert {r.dst for r in kernel.applied[-1].routes} == {B.pod_cidr, C.pod_cidr}
        n = len(kernel.applied)
        await svc.on_node_events([("MODIFIED", c)], False)  # nothing new: no kernel work
        assert len(kernel.applied) == n
        moved = node_obj("c", "10.255.252.33", "10.244.2.0/24")
        await svc.on_node_events([("MODIFIED", moved)], False)
        assert Route(C.pod_cidr, IP("10.255.252.33")) in kernel.applied[-1].routes  # type: ignore[arg-type]
        await svc.on_node_events([("DELETED", b)], False)
        assert {r.dst for r in kernel.applied[-1].routes} == {C.pod_cidr}
        await svc.on_node_events([("DELETED", a)], False)  # this node gone: still routes c
        assert {r.dst for r in kernel.applied[-1].routes} == {C.pod_cidr}
        assert svc.faults() == []
        await svc.on_node_events([("ADDED", node_obj("d", "10.255.252.4"))], False)
        assert svc.faults() == ["routing: node d not routed: no IPv4 pod CIDR (spec.podCIDR)"]

    asyncio.run(run())
    assert svc.view()["nodes"] == 2 and svc.view()["mode"] == "native"


def test_a_kernel_failure_is_reported_not_raised() -> None:
    class Broken(FakeKernel):
        def apply(self, desired: Desired) -> dict[str, str]:
            raise RoutingError("ip link add axon_vxlan ...: RTNETLINK answers: Address in use")

    kernel = Broken()
    svc = RoutingService("tunnel", "a", kernel)  # type: ignore[arg-type]
    objs = [("ADDED", node_obj(n.name, str(n.ip), str(n.pod_cidr))) for n in (A, B)]
    asyncio.run(svc.on_node_events(objs, True))  # the informer goes on
    assert svc.faults() == ["routing: node b not routed: routing failed: ip link add "
                            "axon_vxlan ...: RTNETLINK answers: Address in use"]
