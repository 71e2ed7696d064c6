"""Kubernetes mode's entities from the API server (agent/_entities.py): real Node
and EndpointSlice JSON objects into ``ClusterEntities``, a real PolicyEngine."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from axoneme.agent._entities import ClusterEntities, apiserver_addresses, node_addresses
from axoneme.core.identity import ReservedIdentity as R
from axoneme.core.policy.engine import PolicyEngine


def node(name: str, *addresses: tuple[str, str]) -> dict[str, Any]:
    return {"kind": "Node", "metadata": {"name": name, "resourceVersion": "1"},
            "status": {"addresses": [{"type": t, "address": a} for t, a in addresses]}}


def api_slice(name: str, *endpoints: tuple[str, bool | None], ns: str = "default",
              service: str = "kubernetes") -> dict[str, Any]:
    eps = []
    for addr, ready in endpoints:
        ep: dict[str, Any] = {"addresses": [addr]}
        if ready is not None:
            ep["conditions"] = {"ready": ready}
        eps.append(ep)
    return {"kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": name, "namespace": ns,
                         "labels": {"kubernetes.io/service-name": service}},
            "endpoints": eps, "ports": [{"name": "https", "port": 6443, "protocol": "TCP"}]}


class Regen:
    def __init__(self) -> None:
        self.calls = 0

    async def regenerate(self) -> dict[int, str]:
        self.calls += 1
        return {}


def entities(server: str = "https://kube.example:6443") -> tuple[ClusterEntities, PolicyEngine,
                                                                  Regen]:
    engine, regen = PolicyEngine(), Regen()
    ents = ClusterEntities("node-1", engine, regen, SimpleNamespace(lock=asyncio.Lock()),
                           lambda: server)
    return ents, engine, regen


def test_objects_give_their_addresses():
    n = node("n2", ("InternalIP", "192.0.2.2"), ("ExternalIP", "203.0.113.2"),
             ("Hostname", "n2"), ("InternalIP", "fd00::2"), ("InternalIP", "bogus"))
    assert node_addresses(n) == {"192.0.2.2", "203.0.113.2", "fd00::2"}
    s = api_slice("kubernetes", ("192.0.2.1", None), ("192.0.2.5", True), ("192.0.2.9", False))
    assert apiserver_addresses(s) == {"192.0.2.1", "192.0.2.5"}  # not-ready left out
    assert apiserver_addresses(api_slice("web-x", ("10.0.0.1", True), service="web")) is None
    assert apiserver_addresses(api_slice("k", ("10.0.0.1", True), ns="other")) is None


def test_other_nodes_are_remote_node_and_the_api_server_kube_apiserver():
    ents, engine, regen = entities()

    async def run() -> None:
        await ents.on_nodes([("ADDED", node("node-1", ("InternalIP", "192.0.2.1"))),
                             ("ADDED", node("node-2", ("InternalIP", "192.0.2.2"))),
                             ("ADDED", node("node-3", ("InternalIP", "192.0.2.3")))], True)
        await ents.on_slices([("ADDED", api_slice("kubernetes", ("192.0.2.3", True))),
                              ("ADDED", api_slice("web-abc", ("10.244.0.9", True),
                                                  service="web"))], True)

    asyncio.run(run())
    assert engine.identity_of_ip("192.0.2.2") == R.REMOTE_NODE
    assert engine.identity_of_ip("192.0.2.3") == R.KUBE_APISERVER
    assert engine.identity_of_ip("192.0.2.1") == R.WORLD  # this node: host comes from the kernel
    assert ents.view() == {"remote_node": ["192.0.2.2", "192.0.2.3"],
                           "kube_apiserver": ["192.0.2.3"]}
    calls = regen.calls
    # a node deleted: gone from the ipcache at once; an unrelated slice changes nothing
    asyncio.run(ents.on_nodes([("DELETED", node("node-2"))], False))
    assert engine.identity_of_ip("192.0.2.2") == R.WORLD and regen.calls == calls + 1
    asyncio.run(ents.on_slices([("MODIFIED", api_slice("web-abc", ("10.244.0.8", True),
                                                       service="web"))], False))
    assert regen.calls == calls + 1


def test_without_endpoint_slices_the_configured_server_address_is_the_api_server():
    ents, engine, _ = entities("https://192.0.2.7:6443")
    asyncio.run(ents.on_slices([], True))
    assert engine.identity_of_ip("192.0.2.7") == R.KUBE_APISERVER
    ents, engine, _ = entities("https://kube.example:6443")  # a name: nothing to map
    asyncio.run(ents.on_slices([], True))
    assert ents.apiserver() == []


def test_agent_follows_nodes_and_slices_in_kubernetes_mode(tmp_path):
    from axoneme.agent._agent import Agent
    from axoneme.agent._config import AgentConfig

    agent = Agent(AgentConfig(datapath="noop", state_dir=str(tmp_path / "s"), guard=False,
                              k8s_kubeconfig="/nonexistent", k8s_node_name="node-1"))
    assert agent.k8s is not None and agent.entities is not None
    assert agent.entities.on_nodes in agent.k8s.listeners["nodes"]
    assert agent.entities.on_slices in agent.k8s.listeners["endpointslices"]
    assert agent.k8s.view()["entities"] == {"remote_node": [], "kube_apiserver": []}
    standalone = Agent(AgentConfig(datapath="noop", state_dir=str(tmp_path / "t"), guard=False))
    assert standalone.entities is None
