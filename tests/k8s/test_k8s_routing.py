"""Node routing and other nodes' pods, on the real single-node cluster (issue 20).

One cluster node runs here, so "another node" is a Node object made with
kubectl (no kubelet behind it) and "a pod of another node" a Pod bound to it
whose status gets an address by a status patch. Through the agent pod's CLI:

- the agent follows Node objects: status ``components.routing`` counts the
  extra node and names it among the nodes not routed (its address is on no
  network this node is connected to: reached only by the default route, so
  neither a route nor tunnel packets go there; the host's routing is left as
  it was), and a fault says so; the Node deleted, the fault and the count go;
- the Pod on that node enters this node's ipcache: ``routing.remote_pods``
  counts it and ``identity list`` holds the identity of its labels; the Pod
  deleted, it leaves.

The DaemonSet also makes an agent pod for the extra node (it tolerates every
taint); it never runs and is removed with the node. Not run here: the
coordinator runs it on a cluster (``cluster_up`` as the other files).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml

from .conftest import Cluster, cluster_up

NODE = "axoneme-e2e-routing-node"
NODE_IP = "203.0.113.250"  # TEST-NET-3: on no network of the cluster's node
POD_CIDR = "10.244.250.0/24"
POD_IP = "10.244.250.7"
NS = "routing-e2e"


def _wait(pred: Callable[[], Any], timeout: float = 30, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got or time.monotonic() >= deadline:
            return got
        time.sleep(interval)


def _routing(cl: Cluster) -> dict[str, Any]:
    res = cl.agent("status", "-o", "json")
    assert res.returncode == 0, res.stderr
    status = json.loads(res.stdout)
    return {**status["components"].get("routing", {}), "faults": status.get("faults", [])}


def _identity_labels(cl: Cluster) -> list[set[str]]:
    res = cl.agent("identity", "list", "-o", "json")
    assert res.returncode == 0, res.stderr
    return [set(i["labels"]) for i in json.loads(res.stdout)]


def _remove_node(cl: Cluster) -> None:
    cl.kubectl("delete", "node", NODE, "--ignore-not-found", "--wait=false", check=False)
    # the DaemonSet's pod for it never ran (no kubelet): nothing to wait for
    pods = json.loads(cl.kubectl("-n", "kube-system", "get", "pods", "-o", "json",
                                 "--field-selector", f"spec.nodeName={NODE}").stdout)["items"]
    for p in pods:
        cl.kubectl("-n", "kube-system", "delete", "pod", p["metadata"]["name"], "--force",
                   "--grace-period=0", check=False)


@pytest.fixture(scope="module")
def cluster(cluster_session: None) -> Iterator[Cluster]:
    cl = cluster_up("ebpf")
    try:
        yield cl
    finally:
        cl.kubectl("delete", "ns", NS, "--wait=false", "--ignore-not-found", check=False)
        _remove_node(cl)


def _node() -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": NODE, "labels": {"axoneme.io/e2e": "routing"}},
            "spec": {"podCIDR": POD_CIDR, "podCIDRs": [POD_CIDR]}}


def test_another_node_is_followed_and_a_route_the_kernel_refuses_is_reported(
        cluster: Cluster) -> None:
    cl = cluster
    before = _routing(cl)
    assert before["mode"] in ("native", "tunnel") and NODE not in before["problems"]
    nodes = before["nodes"]
    cl.apply(yaml.safe_dump(_node()))
    # a Node's status is the kubelet's: its address comes by a status patch
    cl.kubectl("patch", "node", NODE, "--subresource=status", "--type=merge", "-p", json.dumps(
        {"status": {"addresses": [{"type": "InternalIP", "address": NODE_IP},
                                  {"type": "Hostname", "address": NODE}]}}))
    try:
        got = _wait(lambda: (r := _routing(cl)) and NODE in r["problems"] and r)
        assert got, f"the agent never reported {NODE}: {_routing(cl)}"
        assert got["nodes"] == nodes + 1
        # its address is reached only through the host's default route: not routed, in
        # either mode (no route, no tunnel packets out of the uplink)
        assert f"node address {NODE_IP}" in got["problems"][NODE], got
        assert not any(POD_CIDR in r for r in got["routes"]), got
        assert any(f"routing: node {NODE} not routed" in f for f in got["faults"]), got["faults"]
    finally:
        _remove_node(cl)
    gone = _wait(lambda: (r := _routing(cl)) and NODE not in r["problems"]
                 and r["nodes"] == nodes and r)
    assert gone, f"{NODE} deleted, still followed: {_routing(cl)}"
    assert not any(NODE in f for f in gone["faults"])


def test_a_pod_of_another_node_enters_the_ipcache_with_its_identity(cluster: Cluster) -> None:
    cl = cluster
    app = f"remote-{secrets.token_hex(3)}"
    cl.apply(yaml.safe_dump(_node()))
    remote_before = _routing(cl).get("remote_pods", 0)
    try:
        cl.apply(yaml.safe_dump_all([
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}},
            {"apiVersion": "v1", "kind": "Pod",
             "metadata": {"name": "remote", "namespace": NS, "labels": {"app": app}},
             "spec": {"nodeName": NODE, "containers": [{"name": "c", "image": "none"}]}}]))
        cl.kubectl("-n", NS, "patch", "pod", "remote", "--subresource=status", "--type=merge",
                   "-p", json.dumps({"status": {"podIP": POD_IP, "podIPs": [{"ip": POD_IP}]}}))
        want = {f"k8s:app={app}", f"k8s:io.kubernetes.pod.namespace={NS}"}
        assert _wait(lambda: any(want <= ls for ls in _identity_labels(cl))), \
            f"no identity with {want}"
        assert _wait(lambda: _routing(cl).get("remote_pods") == remote_before + 1), _routing(cl)
        cl.kubectl("-n", NS, "delete", "pod", "remote", "--force", "--grace-period=0")
        assert _wait(lambda: _routing(cl).get("remote_pods") == remote_before), _routing(cl)
    finally:
        _remove_node(cl)
