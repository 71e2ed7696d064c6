"""Several nodes on one machine (``scripts/cluster up --nodes 2 --routing-mode R``, issue 20).

Node 1 is this machine's network namespace, node 2 the namespaces ``axon-node2`` (network and
mount) with its own containerd, kubelet and the DaemonSet's agent pod (docs/kubernetes.md,
"Several nodes"). Two namespaces ``mnx``/``mny`` with pods a (node 1), b and c (node 2), pinned
with ``nodeSelector: kubernetes.io/hostname`` in mnx and ``nodeName`` in mny. Per routing mode
(native, then tunnel):

- every pod's address is in its Node's ``spec.podCIDR`` and each agent says it allocates from
  it (``status -o json`` components.ipam); each agent has only its own node's endpoints;
- the kernel routes the other node's pod CIDR as the mode says (a proto 164 route via the
  node's address, or through ``axon_vxlan``, whose counters prove the tunnel carried it);
- every pod reaches every pod across nodes with no policy; with a NetworkPolicy allowing
  mnx/b only from mnx's pod a, the 36 probes equal ``axoneme policy matrix --cluster`` fed
  with ``kubectl get -o json`` of the same objects; the cross-node deny (mny/a on node 1 to
  mnx/b on node 2) is decided on node 2 by the sender's identity from node 2's ipcache, and
  node 2's flows show the drop with that identity;
- the same labels have the same identity number on both nodes (``identity list -o json`` in
  each node's agent pod), and no number names two label sets.

Time (2026-12-05, 2 cores): `up --nodes 2` 41 s; the module 106 s with the native cluster
already up (the tunnel cluster's down + up 65 s of it), so CI runs both modes (under 4 min);
``AXONEME_K8S_MULTINODE_ROUTING=native`` (or ``tunnel``) runs one mode only.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

from ._truth import matrix, pods_of, porter_pod, settled
from .conftest import Cluster, cluster_up

pytestmark = [pytest.mark.privileged, pytest.mark.e2e]

NAMESPACES = ("mnx", "mny")
PODS = ("a", "b", "c")
PORT = 80
NODE1, NODE2 = "axoneme-node", "axoneme-node2"
PLACEMENT = {"a": NODE1, "b": NODE2, "c": NODE2}
ROUTING = [m for m in ("native", "tunnel")
           if os.environ.get("AXONEME_K8S_MULTINODE_ROUTING", m) == m]

POLICY = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
          "metadata": {"name": "b-from-a", "namespace": "mnx"},
          "spec": {"podSelector": {"matchLabels": {"pod": "b"}},
                   "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "a"}}}]}]}}


def _placement(ns: str, name: str) -> dict[str, Any]:
    if ns == "mnx":  # the scheduler places it
        return {"nodeSelector": {"kubernetes.io/hostname": PLACEMENT[name]}}
    return {"nodeName": PLACEMENT[name]}  # bound directly


@pytest.fixture(scope="module", params=ROUTING)
def mn(request: pytest.FixtureRequest, cluster_session: None) -> Any:
    cl = cluster_up("ebpf", nodes=2, routing=request.param)
    objs: list[dict[str, Any]] = [{"apiVersion": "v1", "kind": "Namespace",
                                   "metadata": {"name": ns, "labels": {"ns": ns}}} for ns in NAMESPACES]
    objs += [porter_pod(ns, p, PORT, _placement(ns, p)) for ns in NAMESPACES for p in PODS]
    with cl.objects(objs, NAMESPACES):
        yield cl


def _node_cidrs(cl: Cluster) -> dict[str, str]:
    items = json.loads(cl.kubectl("get", "nodes", "-o", "json").stdout)["items"]
    return {n["metadata"]["name"]: n["spec"]["podCIDR"] for n in items}


def _agent_json(cl: Cluster, node: str, *cmd: str) -> Any:
    res = cl.agent_on(node, *cmd, "-o", "json")
    assert res.returncode == 0, f"{node}: axoneme {' '.join(cmd)}: {res.stderr}"
    return json.loads(res.stdout)


def _ns(node: str) -> list[str]:
    """`ip` in that node's network namespace (node 1: this machine's)."""
    return ["ip"] if node == NODE1 else ["ip", "-n", "axon-node" + node.removeprefix("axoneme-node")]


def test_each_node_allocates_from_its_own_pod_cidr(mn: Cluster) -> None:
    cidrs = _node_cidrs(mn)
    # node 1 first gets 10.244.0.0/24; node 2 another /24 of the cluster CIDR (usually
    # 10.244.1.0/24: scripts/_cluster.py wait_node says when not)
    assert cidrs[NODE1] == "10.244.0.0/24" and cidrs[NODE2] != cidrs[NODE1], cidrs
    assert ipaddress.ip_network(cidrs[NODE2]).subnet_of(ipaddress.ip_network("10.244.0.0/16"))
    for key, pod in pods_of(mn, NAMESPACES).items():
        node = pod["spec"]["nodeName"]
        assert node == PLACEMENT[key.split("/")[1]], (key, node)
        ip = ipaddress.ip_address(pod["status"]["podIP"])
        assert ip in ipaddress.ip_network(cidrs[node]), f"{key} on {node}: {ip} not in {cidrs[node]}"
    for node in (NODE1, NODE2):
        status = _agent_json(mn, node, "status")
        ipam = status["components"]["ipam"]
        assert (ipam["pod_cidr"], ipam["source"]) == (cidrs[node], "node"), (node, ipam)
        assert status["components"]["routing"]["mode"] == mn.routing
        assert not status["faults"], (node, status["faults"])
        # each agent has its own node's endpoints only (its own state, pins and CNI)
        mine = {e["pod"] for e in _agent_json(mn, node, "endpoint", "list")
                if e["pod"].split("/")[0] in NAMESPACES}
        want = {f"{ns}/{p}" for ns in NAMESPACES for p in PODS if PLACEMENT[p] == node}
        assert mine == want, (node, mine)


def test_the_other_nodes_pod_cidr_is_routed_as_the_mode_says(mn: Cluster) -> None:
    cidrs = _node_cidrs(mn)
    for node, other, via in ((NODE1, cidrs[NODE2], "10.255.254.2"),
                             (NODE2, cidrs[NODE1], "10.255.254.1")):
        routes = subprocess.run([*_ns(node), "-j", "route", "show", "proto", "164"],
                                capture_output=True, text=True, check=True).stdout
        got = {r["dst"]: r for r in json.loads(routes)}
        assert other in got, (node, routes)
        assert got[other]["gateway"] == via, got[other]
        want_dev = "axon_vxlan" if mn.routing == "tunnel" else ("axon-n1" if node == NODE1 else "eth0")
        assert got[other]["dev"] == want_dev, (node, got[other])


def _vxlan_rx(node: str) -> int:
    out = subprocess.run([*_ns(node), "-s", "-j", "link", "show", "axon_vxlan"],
                         capture_output=True, text=True, check=True).stdout
    return int(json.loads(out)[0]["stats64"]["rx"]["packets"])


def test_cross_node_truth_table_equals_the_matrix(mn: Cluster) -> None:
    pods = pods_of(mn, NAMESPACES)
    with tempfile.TemporaryDirectory(prefix="ax-mn-") as tmp:
        work = Path(tmp)
        # no policy: every pod reaches every pod, across the nodes too
        open_table = matrix(mn, NAMESPACES, [], PORT, work)
        assert all(open_table.values()) and len(open_table) == 36, open_table
        rx = {n: _vxlan_rx(n) for n in (NODE1, NODE2)} if mn.routing == "tunnel" else {}
        diff = settled(mn, pods, open_table, PORT)
        assert not diff, f"{mn.routing}, no policy:\n" + "\n".join(diff)
        if mn.routing == "tunnel":  # cross-node probes came through the tunnel, both ways
            for node in (NODE1, NODE2):
                assert _vxlan_rx(node) > rx[node], f"{node}: axon_vxlan received nothing"

        want = matrix(mn, NAMESPACES, [POLICY], PORT, work)
        # what the case is about: one cross-node pair allowed, one denied, by identity on node 2
        assert want[("mnx/a", "mnx/b")] and not want[("mny/a", "mnx/b")], want
        mn.kubectl("apply", "-f", str(work / "policies.json"))
        try:
            diff = settled(mn, pods, want, PORT)
            assert not diff, f"{mn.routing}, policy b-from-a:\n" + "\n".join(diff)
            _drop_seen_on_node2_with_the_senders_identity(mn, pods)
        finally:
            mn.kubectl("delete", "-f", str(work / "policies.json"), "--wait=true", check=False)


def _drop_seen_on_node2_with_the_senders_identity(cl: Cluster, pods: dict[str, dict[str, Any]]) -> None:
    """Node 2's agent dropped mny/a's SYN to mnx/b and knew the sender by the identity node 1's
    agent gave it (node 2's ipcache, fed from the API)."""
    sender = next(e for e in _agent_json(cl, NODE1, "endpoint", "list") if e["pod"] == "mny/a")
    src, dst = pods["mny/a"]["status"]["podIP"], pods["mnx/b"]["status"]["podIP"]
    res = cl.agent_on(NODE2, "observe", "--last", "2000", "--verdict", "DROPPED", "-o", "json")
    assert res.returncode == 0, res.stderr
    flows = [json.loads(line) for line in res.stdout.splitlines() if line.strip()]
    seen = [f for f in flows if f["IP"]["source"] == src and f["IP"]["destination"] == dst]
    assert seen, f"node 2 recorded no drop {src} -> {dst} ({len(flows)} drops)"
    assert {f["source"]["identity"] for f in seen} == {sender["identity"]}, seen[:2]


def test_same_labels_same_identity_on_every_node(mn: Cluster) -> None:
    by_node: dict[str, dict[frozenset[str], int]] = {}
    for node in mn.node_names():
        ids = {frozenset(i["labels"]): int(i["id"]) for i in _agent_json(mn, node, "identity", "list")
               if not i["reserved"] and int(i["id"]) <= 65535}  # CIDR identities are node-local
        assert len(set(ids.values())) == len(ids), f"{node}: one number for two label sets"
        by_node[node] = ids
    one, two = by_node[NODE1], by_node[NODE2]
    pods = {f"k8s:pod={p}" for p in PODS}
    # every pod's identity (both namespaces) is known to both nodes, with one number
    of_pods = [labels for labels in one if pods & labels and any("mnx" in x or "mny" in x for x in labels)]
    assert len(of_pods) == 6, of_pods
    for labels in set(one) & set(two):
        assert one[labels] == two[labels], (sorted(labels), one[labels], two[labels])
    assert all(labels in two for labels in of_pods)
    # no number names two label sets across the nodes
    names = {}
    for ids in by_node.values():
        for labels, num in ids.items():
            assert names.setdefault(num, labels) == labels, (num, sorted(labels), sorted(names[num]))
