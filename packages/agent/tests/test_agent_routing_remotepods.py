"""Other nodes' pods in this node's ipcache: Pod and Namespace events, through
the informer's delivery path (``KubernetesSource._deliverer`` -> handler ->
``listen``ers), reach the engine as remote endpoints with the identity their
labels give (no API server: events are handed in as the informer would)."""

from __future__ import annotations

import asyncio
import ipaddress
from types import SimpleNamespace
from typing import Any

from axoneme.agent._config import AgentConfig
from axoneme.agent._k8s import KubernetesSource
from axoneme.agent._remotepods import RemotePods
from axoneme.core.cluster import NAMESPACE_LABELS_PREFIX
from axoneme.core.identity import ReservedIdentity
from axoneme.core.policy.engine import PolicyEngine

NET = ipaddress.ip_network


def pod(name: str, node: str, ip: str | None, host_network: bool = False,
        **labels: str) -> dict[str, Any]:
    o: dict[str, Any] = {"metadata": {"name": name, "namespace": "n", "labels": labels},
                         "spec": {"nodeName": node, "hostNetwork": host_network,
                                  "containers": [{"name": "c", "ports": [
                                      {"name": "http", "containerPort": 8080}]}]},
                         "status": {}}
    if ip:
        o["status"] = {"podIP": ip, "podIPs": [{"ip": ip}]}
    return o


def node(name: str) -> dict[str, Any]:
    return {"metadata": {"name": name}}


def namespace(**labels: str) -> dict[str, Any]:
    return {"metadata": {"name": "n", "labels": labels}}


class Regen:
    def __init__(self) -> None:
        self.calls = 0

    async def regenerate(self) -> dict[int, str]:
        self.calls += 1
        return {}


def test_remote_pods_follow_pod_and_namespace_events() -> None:
    async def nothing(*_: Any, **__: Any) -> None:
        return None

    store = SimpleNamespace(endpoints={}, lock=asyncio.Lock(), persist=nothing)
    endpoints = SimpleNamespace(relabel=nothing)  # no endpoints on this node
    src = KubernetesSource(AgentConfig(k8s_kubeconfig="x", k8s_node_name="n1"), store,
                           endpoints, None)  # type: ignore[arg-type]
    engine = PolicyEngine()
    regen = Regen()
    remote = RemotePods(src, engine, engine.allocator, regen, store.lock, "c1")
    src.listen("pods", remote.on_pods)
    src.listen("namespaces", remote.on_namespaces)
    src.listen("nodes", remote.on_nodes)
    deliver_pods = src._deliverer("pods", src._on_pods)
    deliver_ns = src._deliverer("namespaces", src._on_namespaces)
    deliver_nodes = src._deliverer("nodes", src._on_nodes)

    def labels_of(ip: str) -> set[str]:
        ident = engine.allocator.get(engine.identity_of_ip(ip))
        assert ident is not None
        return set(ident.label_strings())

    async def go() -> None:
        src._loop = asyncio.get_running_loop()
        src._changed = asyncio.Condition()
        # the informer threads deliver; the loop applies (as in the agent)
        await asyncio.to_thread(deliver_ns, [("ADDED", namespace(team="a"))], True)
        await asyncio.to_thread(deliver_nodes, [("ADDED", node("n1")), ("ADDED", node("n2")),
                                                ("ADDED", node("n3"))], True)
        await asyncio.to_thread(deliver_pods, [
            ("ADDED", pod("local", "n1", "10.244.0.5", app="server")),
            ("ADDED", pod("client", "n2", "10.244.1.5", app="client")),
            ("ADDED", pod("hostnet", "n2", "10.255.252.2", True, app="agent")),
            ("ADDED", pod("pending", "", None, app="client")),
            ("ADDED", pod("nowhere", "n9", "10.244.9.9", app="client"))], True)
        assert regen.calls == 0  # the first list: the endpoints' full sync follows
        assert set(engine.remote_endpoints()) == {"n/client"}
        assert {"k8s:app=client", "k8s:io.kubernetes.pod.namespace=n",
                f"k8s:{NAMESPACE_LABELS_PREFIX}team=a",
                "k8s:io.cilium.k8s.policy.cluster=c1"} <= labels_of("10.244.1.5")
        assert engine.identity_of_ip("10.244.0.5") == ReservedIdentity.WORLD  # local: an endpoint's
        assert engine.identity_of_ip("10.255.252.2") == ReservedIdentity.WORLD
        assert engine.identity_of_ip("10.244.9.9") == ReservedIdentity.WORLD  # no such node
        first = engine.identity_of_ip("10.244.1.5")
        # relabelled on its node -> another identity on this one
        await asyncio.to_thread(deliver_pods, [("MODIFIED", pod("client", "n2", "10.244.1.5",
                                                                app="other"))], False)
        assert "k8s:app=other" in labels_of("10.244.1.5") and regen.calls == 1
        assert engine.identity_of_ip("10.244.1.5") != first
        # its namespace relabelled -> its identity follows
        await asyncio.to_thread(deliver_ns, [("MODIFIED", namespace(team="b"))], False)
        assert f"k8s:{NAMESPACE_LABELS_PREFIX}team=b" in labels_of("10.244.1.5")
        assert regen.calls == 2
        # the same again: nothing changes, nothing is regenerated
        await asyncio.to_thread(deliver_ns, [("MODIFIED", namespace(team="b"))], False)
        assert regen.calls == 2
        # a pending pod gets scheduled and an address
        await asyncio.to_thread(deliver_pods, [("MODIFIED", pod("pending", "n3", "10.244.2.7",
                                                                app="client"))], False)
        assert "k8s:app=client" in labels_of("10.244.2.7")
        assert engine.remote_endpoints()["n/pending"].named_ports[0].port == 8080
        # deleted -> out of the ipcache
        assert NET("10.244.1.5/32") in engine.pending_ipcache_changes().upserts  # reported
        await asyncio.to_thread(deliver_pods, [("DELETED", pod("client", "n2", "10.244.1.5"))],
                                False)
        assert NET("10.244.1.5/32") in engine.pending_ipcache_changes().deletes
        assert engine.identity_of_ip("10.244.1.5") == ReservedIdentity.WORLD
        assert set(engine.remote_endpoints()) == {"n/pending"}
        # its node deleted: its pods leave the ipcache before the pod collector comes
        await asyncio.to_thread(deliver_nodes, [("DELETED", node("n3"))], False)
        assert engine.remote_endpoints() == {} and regen.calls == 5
        # a node of that name again: they are back
        await asyncio.to_thread(deliver_nodes, [("ADDED", node("n3"))], False)
        assert set(engine.remote_endpoints()) == {"n/pending"}

    asyncio.run(go())
    assert remote.view() == {"remote_pods": 1}
