"""toServices through the agent in Kubernetes mode, without a cluster: the
informers' handlers get real Service / EndpointSlice / CNP objects (as the API
server serves them) and the datapath (NoopDatapath: what it was told) must hold
what the engine computed; the standalone agent and offline commands without
Services refuse toServices with the file and field."""

from __future__ import annotations

import asyncio
import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest
from axoneme.agent import _netlink as nl
from axoneme.agent._agent import Agent
from axoneme.agent._config import AgentConfig
from axoneme.agent._k8s import KubernetesSource
from axoneme.agent._netlink import EndpointLink
from axoneme.agent._records import PodRecord
from axoneme.agent.cli import main
from axoneme.core.datapath import NoopDatapath
from axoneme.core.errors import InvalidRule
from axoneme.core.mapstate import Direction

EXTERNAL, MOVED = "198.51.100.10", "198.51.100.20"


class Links:
    """The kernel side of endpoints, in memory (no netns, no veth)."""

    GATEWAY_IP = nl.GATEWAY_IP

    def __init__(self) -> None:
        self.links: dict[str, int] = {}

    def host_ifname(self, container_id: str) -> str:
        return nl.host_ifname(container_id)

    def link_index(self, name: str) -> int:
        return self.links.get(name, 0)

    def setup_endpoint(self, container_id: str, netns_path: str, ifname: str, ip: str,
                       mtu: int = 1500) -> EndpointLink:
        host = self.host_ifname(container_id)
        self.links[host] = 100 + len(self.links)
        return EndpointLink(host, self.links[host], "02:00:00:00:00:01", ifname,
                            "02:00:00:00:00:02", mtu)

    def teardown_endpoint(self, host: str) -> bool:
        return self.links.pop(host, None) is not None


class K8sNode:
    """An agent on NoopDatapath with a KubernetesSource whose handlers the test calls."""

    def __init__(self, tmp_path: Path, **cfg: Any) -> None:
        state = tmp_path / "state"
        state.mkdir(exist_ok=True)
        self.dp = NoopDatapath()
        self.agent = Agent(AgentConfig(datapath="noop", state_dir=str(state), guard=False,
                                       pod_cidr="10.244.9.0/24", l7_proxies=False, **cfg),
                           netlink=Links())
        self.agent.datapath = self.dp
        k8s = AgentConfig(k8s_kubeconfig="unused", k8s_node_name="n1", kube_proxy_replacement=False)
        self.src = KubernetesSource(k8s, self.agent.store, self.agent.endpoints, self.agent.policies)

    async def pod(self, ns: str, name: str, labels: dict[str, str]) -> Any:
        self.agent.store.pods[f"{ns}/{name}"] = PodRecord(name=name, namespace=ns, labels=labels)
        await self.agent.endpoints.cni_add({
            "container_id": f"c-{ns}-{name}", "netns": f"/run/netns/{name}", "ifname": "eth0",
            "namespace": ns, "pod_name": name, "network": "axoneme"})
        rec = self.agent.store.endpoints[f"c-{ns}-{name}"]
        return self.agent.store.endpoint_objs[rec.id]

    def egress_peers(self, ep: Any) -> set[int]:
        """Identities the datapath allows ``ep`` to reach (and it matches the engine)."""
        got = self.dp.dump(ep)
        assert got == self.agent.engine.resolve(ep.id)
        return {k.identity for k, e in got.items() if k.direction is Direction.EGRESS and not e.deny}

    def cidr_identity(self, ip: str) -> int | None:
        return self.dp.dump_ipcache().get(ipaddress.ip_network(f"{ip}/32"))


@pytest.fixture(autouse=True)
def _no_state_left(tmp_path: Path) -> Any:
    yield
    for f in tmp_path.glob("state/state.json*"):
        f.unlink()


def service(name: str, ns: str = "y", selector: dict[str, str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"clusterIP": "10.96.0.30", "ports": [{"port": 80, "protocol": "TCP"}]}
    if selector:
        spec["selector"] = selector
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns, "resourceVersion": "1"}, "spec": spec}


def endpoint_slice(name: str, svc: str, *addrs: str, ns: str = "y") -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": ns, "resourceVersion": "1",
                         "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [a], "conditions": {"ready": True}} for a in addrs],
            "ports": [{"port": 80, "protocol": "TCP"}]}


CNP = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
       "metadata": {"name": "to-svc", "namespace": "x", "resourceVersion": "1", "generation": 1},
       "spec": {"endpointSelector": {"matchLabels": {"app": "client"}},
                "egress": [{"toServices": [{"k8sService": {"serviceName": "db", "namespace": "y"}},
                                           {"k8sService": {"serviceName": "ext"}}]}]}}


def test_services_and_endpoint_slices_reach_the_datapath(tmp_path: Path) -> None:
    node = K8sNode(tmp_path)

    async def go() -> None:
        client = await node.pod("x", "client", {"app": "client"})
        db = await node.pod("y", "db", {"app": "db"})
        other = await node.pod("z", "db", {"app": "db"})
        await node.src._on_policies("cnps", [("ADDED", CNP)], True)
        assert node.src.refused == {}
        # no Service known yet: egress enforced, nothing allowed
        assert node.agent.engine.enforcement(client.id)[1]
        assert db.identity not in node.egress_peers(client)
        await node.src._on_services("services", [("ADDED", service("db", selector={"app": "db"})),
                                                 ("ADDED", service("ext"))], True)
        peers = node.egress_peers(client)
        assert db.identity in peers and other.identity not in peers  # the Service's namespace
        assert node.cidr_identity(EXTERNAL) is None  # no EndpointSlice yet
        await node.src._on_services("endpointslices",
                                    [("ADDED", endpoint_slice("ext-1", "ext", EXTERNAL))], True)
        ext_id = node.cidr_identity(EXTERNAL)
        assert ext_id is not None and ext_id in node.egress_peers(client)
        # the EndpointSlice changes: the new address in, the old one out (ipcache too)
        await node.src._on_services("endpointslices",
                                    [("MODIFIED", endpoint_slice("ext-1", "ext", MOVED))], False)
        moved_id = node.cidr_identity(MOVED)
        assert moved_id is not None and moved_id in node.egress_peers(client)
        assert node.cidr_identity(EXTERNAL) is None and ext_id not in node.egress_peers(client)
        # the Service loses its selector: it is a selector-less Service now (its slice's address)
        await node.src._on_services("services", [("MODIFIED", service("db")),
                                                 ("DELETED", service("ext"))], False)
        await node.src._on_services("endpointslices",
                                    [("ADDED", endpoint_slice("db-1", "db", EXTERNAL))], False)
        peers = node.egress_peers(client)
        assert db.identity not in peers and moved_id not in peers
        assert node.cidr_identity(EXTERNAL) in peers
        assert node.src.view()["to_services"] == {"services": 1, "translations": 5}
        # the policy as written stays listed (toServices is not shown translated)
        [listed] = node.agent.policies.listing(documents=True)
        assert listed["document"]["spec"]["egress"][0]["toServices"]

    asyncio.run(go())


def test_pods_match_mode_allows_a_pod_behind_a_selector_less_service(tmp_path: Path) -> None:
    node = K8sNode(tmp_path, policy_cidr_match_mode="pods")

    async def go() -> None:
        client = await node.pod("x", "client", {"app": "client"})
        target = await node.pod("y", "target", {"app": "t"})
        await node.src._on_policies("cnps", [("ADDED", CNP)], True)
        await node.src._on_services("services", [("ADDED", service("ext"))], True)
        await node.src._on_services("endpointslices",
                                    [("ADDED", endpoint_slice("e", "ext", target.ipv4))], True)
        keys = node.dp.dump(client)
        assert keys == node.agent.engine.resolve(client.id)
        assert any(k.address == target.ipv4 and k.direction is Direction.EGRESS for k in keys)

    asyncio.run(go())


def test_standalone_agent_refuses_to_services_with_the_field(tmp_path: Path) -> None:
    node = K8sNode(tmp_path)

    async def go() -> None:
        with pytest.raises(InvalidRule) as e:
            await node.agent.policies.apply([{"file": "p.yaml", "index": 0, "obj": CNP}])
        assert [(p.file, p.field) for p in e.value.problems] == [
            ("p.yaml", "spec.egress[0].toServices[0]"), ("p.yaml", "spec.egress[0].toServices[1]")]
        assert "no Service source" in str(e.value)

    asyncio.run(go())


def test_offline_matrix_resolves_to_services_from_the_cluster_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    objs = [{"kind": "Namespace", "metadata": {"name": n}} for n in ("x", "y")] + [
        {"kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": labels},
         "spec": {"containers": [{}]}, "status": {"podIP": ip}}
        for ns, name, labels, ip in (("x", "client", {"app": "client"}, "10.244.1.1"),
                                     ("y", "db", {"app": "db"}, "10.244.2.1"),
                                     ("y", "web", {"app": "web"}, "10.244.2.2"))]
    pods = tmp_path / "pods.json"
    pods.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": objs}))
    with_svcs = tmp_path / "cluster.json"
    with_svcs.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": [
        *objs, service("db", selector={"app": "db"}), service("ext"),
        endpoint_slice("ext-1", "ext", EXTERNAL)]}))
    pol = tmp_path / "cnp.json"
    pol.write_text(json.dumps(CNP))
    capsys.readouterr()
    code = main(["policy", "matrix", "--cluster", str(with_svcs), "-f", str(pol), "--port", "80",
                 "-o", "json"])
    out = capsys.readouterr().out
    assert code == 0
    got = {(p["from"], p["to"]): p["verdict"] for p in json.loads(out)["probes"]}
    assert got[("x/client", "y/db")] == "allowed" and got[("x/client", "y/web")] == "denied"
    code = main(["policy", "trace", "--cluster", str(with_svcs), "-f", str(pol),
                 "--from", "x/client", "--to", EXTERNAL, "--port", "443", "-o", "json"])
    assert code == 0 and json.loads(capsys.readouterr().out)["verdict"] == "allowed"
    # no Service objects: no Service source; refused with the file and field, exit 2
    for cmd in (["policy", "matrix", "--cluster", str(pods), "-f", str(pol), "--port", "80"],
                ["policy", "validate", "-f", str(pol)]):
        code = main(cmd)
        err = capsys.readouterr()
        assert code == 2, cmd
        text = err.err + err.out
        assert str(pol) in text and "spec.egress[0].toServices[0]" in text and "no Service source" in text
