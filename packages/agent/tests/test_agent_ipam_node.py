"""Kubernetes IPAM: each node's agent hands out pod addresses from its own
Node's ``spec.podCIDR`` (no kernel, no API server: the Node objects are what
the informer's cache holds; the multi-node cluster test shows it with pods,
tests/k8s/test_k8s_multinode.py)."""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from axoneme.agent._agent import Agent
from axoneme.agent._config import AgentConfig
from axoneme.agent._routing import node_pod_cidr


def node_obj(name: str, cidr: str | None) -> dict[str, Any]:
    spec: dict[str, Any] = {"podCIDR": cidr, "podCIDRs": [cidr]} if cidr else {}
    return {"kind": "Node", "metadata": {"name": name}, "spec": spec,
            "status": {"addresses": [{"type": "InternalIP", "address": "10.255.254.2"}]}}


NODES = [node_obj("n1", "10.244.0.0/24"), node_obj("n2", "10.244.1.0/24"), node_obj("bare", None),
         node_obj("v6", "fd00:10::/64"), node_obj("far", "10.250.3.0/24")]


def test_node_pod_cidr_is_the_nodes_own() -> None:
    assert node_pod_cidr(NODES, "n2", "10.244.0.0/16") == ("10.244.1.0/24", "")
    assert node_pod_cidr(NODES, "n1", "10.244.0.0/16") == ("10.244.0.0/24", "")
    # several cluster CIDRs (comma-separated, as the iptables datapath reads pod_cidr)
    assert node_pod_cidr(NODES, "far", "10.244.0.0/16, 10.250.0.0/16") == ("10.250.3.0/24", "")


def test_node_pod_cidr_falls_back_and_says_why() -> None:
    assert node_pod_cidr(NODES, "ghost", "10.244.0.0/16") == (None, "no Node 'ghost' in the API")
    assert node_pod_cidr(NODES, "bare", "10.244.0.0/16")[1] == "Node 'bare' has no IPv4 spec.podCIDR"
    assert node_pod_cidr(NODES, "v6", "10.244.0.0/16")[0] is None
    cidr, why = node_pod_cidr(NODES, "far", "10.244.0.0/16")
    assert cidr is None and "10.250.3.0/24 is outside pod_cidr 10.244.0.0/16" in why
    # pod_cidr a node's own /24 (the single-node default of old): inside, so taken
    assert node_pod_cidr(NODES, "n1", "10.244.0.0/24") == ("10.244.0.0/24", "")
    assert node_pod_cidr(NODES, "n2", "10.244.0.0/24")[0] is None


def _agent(tmp_path: Path, node: str) -> Agent:
    state = tmp_path / node
    state.mkdir()
    agent = Agent(AgentConfig(datapath="noop", state_dir=str(state), guard=False,
                              pod_cidr="10.244.0.0/16", l7_proxies=False))
    # what KubernetesSource.start leaves: the nodes informer's first list, this node's name
    agent.k8s = SimpleNamespace(node=node, informers={  # type: ignore[assignment]
        "nodes": SimpleNamespace(cache={f"/{n['metadata']['name']}": n for n in NODES})})
    return agent


def test_each_nodes_agent_allocates_from_its_node(tmp_path: Path) -> None:
    """Two agents of one cluster never hand out one address: node n2's pods
    are in 10.244.1.0/24, n1's in 10.244.0.0/24; an address allocated before
    the switch (an adopted endpoint) stays its owner's."""
    a1, a2 = _agent(tmp_path, "n1"), _agent(tmp_path, "n2")
    kept = a2.endpoints.ipam.allocate("adopted")  # from pod_cidr, before the Node is known
    a1._use_node_pod_cidr()
    a2._use_node_pod_cidr()
    ips1 = [a1.endpoints.ipam.allocate(f"c{i}") for i in range(5)]
    ips2 = [a2.endpoints.ipam.allocate(f"c{i}") for i in range(5)]
    assert all(ipaddress.ip_address(ip) in ipaddress.ip_network("10.244.0.0/24") for ip in ips1)
    assert all(ipaddress.ip_address(ip) in ipaddress.ip_network("10.244.1.0/24") for ip in ips2)
    assert not set(ips1) & set(ips2)
    assert a2.endpoints.ipam.owner(kept) == "adopted"
    assert a2.endpoints.ipam_view() == {"pod_cidr": "10.244.1.0/24", "source": "node",
                                        "allocated": 6, "note": ""}
    assert asyncio.run(_status_ipam(a2)) == a2.endpoints.ipam_view()


def test_a_node_without_pod_cidr_uses_pod_cidr(tmp_path: Path) -> None:
    a = _agent(tmp_path, "bare")
    a._use_node_pod_cidr()
    view = a.endpoints.ipam_view()
    assert (view["pod_cidr"], view["source"]) == ("10.244.0.0/16", "config")
    assert view["note"] == "Node 'bare' has no IPv4 spec.podCIDR"


async def _status_ipam(agent: Agent) -> Any:
    return agent.views.status()["components"]["ipam"]
