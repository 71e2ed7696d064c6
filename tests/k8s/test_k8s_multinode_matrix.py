"""The x,y,z x a,b,c truth tables with the pods spread over 3 nodes (issue 20, acceptance).

``scripts/cluster up --nodes 3 --datapath D --routing-mode R``: namespaces x, y, z, each with
pods a (node 1), b (node 2) and c (node 3), agnhost porters on TCP 80 (upstream's NetworkPolicy
e2e layout). Per policy state (none, then two sets of NetworkPolicies mixing ingress, egress,
namespace and pod selectors), the 81 probes (every pod to every pod, from inside the source
pod) must equal ``axoneme policy matrix --cluster`` fed with ``kubectl get -o json`` of the same
namespaces and pods; 54 of the 81 cross a node.

Combinations: ``AXONEME_K8S_MATRIX`` is a comma list of ``DATAPATH/ROUTING`` with DATAPATH
``ebpf``, ``iptables:plain`` or ``iptables:ipset`` and ROUTING ``native`` or ``tunnel``; unset,
one combination runs (``iptables:ipset/tunnel``: the eBPF datapath's cross-node tables run in
test_k8s_multinode.py on 2 nodes, both modes). ``scripts/k8s-multinode-matrix`` runs all six and
writes conformance-results/multinode-matrix.{json,md}. With ``AXONEME_K8S_MATRIX_RESULTS=FILE``
each combination appends its figures to FILE (JSON lines).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ._truth import matrix, pods_of, porter_pod, settled
from .conftest import Cluster, cluster_up

pytestmark = [pytest.mark.privileged, pytest.mark.e2e]

NAMESPACES = ("x", "y", "z")
PODS = ("a", "b", "c")
NODES = {"a": "axoneme-node", "b": "axoneme-node2", "c": "axoneme-node3"}
PORT = 80
ALL = [f"{dp}/{r}" for dp in ("ebpf", "iptables:plain", "iptables:ipset") for r in ("native", "tunnel")]
COMBOS = [c.strip() for c in os.environ.get("AXONEME_K8S_MATRIX", "iptables:ipset/tunnel").split(",")
          if c.strip()]


def _np(ns: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def _peer(ns: str | None = None, pod: str | None = None) -> dict[str, Any]:
    peer: dict[str, Any] = {}
    if ns is not None:
        peer["namespaceSelector"] = {"matchLabels": {"kubernetes.io/metadata.name": ns}}
    if pod is not None:
        peer["podSelector"] = {"matchLabels": {"pod": pod}}
    return peer


# upstream's cases, mixed so one state exercises several at once
STATES: dict[str, list[dict[str, Any]]] = {
    "no policy": [],
    "x deny-all ingress; x/a from namespace y; x/b from z/c; y/c from pods of y": [
        _np("x", "deny-all", {"podSelector": {}, "policyTypes": ["Ingress"]}),
        _np("x", "a-from-y", {"podSelector": {"matchLabels": {"pod": "a"}},
                              "ingress": [{"from": [_peer(ns="y")]}]}),
        _np("x", "b-from-z-c", {"podSelector": {"matchLabels": {"pod": "b"}},
                                "ingress": [{"from": [_peer(ns="z", pod="c")],
                                             "ports": [{"port": PORT, "protocol": "TCP"}]}]}),
        _np("y", "c-from-own-ns", {"podSelector": {"matchLabels": {"pod": "c"}},
                                   "ingress": [{"from": [{"podSelector": {}}]}]}),
    ],
    "z egress only to x/a and own namespace; y/b deny-all egress; x/c from b of any namespace": [
        _np("z", "egress-x-a", {"podSelector": {}, "policyTypes": ["Egress"],
                                "egress": [{"to": [_peer(ns="x", pod="a"), {"podSelector": {}}]}]}),
        _np("y", "b-no-egress", {"podSelector": {"matchLabels": {"pod": "b"}},
                                 "policyTypes": ["Egress"]}),
        _np("x", "c-from-any-b", {"podSelector": {"matchLabels": {"pod": "c"}},
                                  "ingress": [{"from": [{"namespaceSelector": {},
                                                         "podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
    ],
}


@pytest.fixture(scope="module", params=COMBOS)
def three(request: pytest.FixtureRequest, cluster_session: None) -> Iterator[tuple[Cluster, float]]:
    combo = str(request.param)
    if combo not in ALL:
        raise AssertionError(f"AXONEME_K8S_MATRIX: {combo!r} is not one of {', '.join(ALL)}")
    datapath, routing = combo.split("/")
    start = time.monotonic()
    cl = cluster_up(datapath, nodes=3, routing=routing)
    up = time.monotonic() - start
    objs: list[dict[str, Any]] = [{"apiVersion": "v1", "kind": "Namespace",
                                   "metadata": {"name": ns}} for ns in NAMESPACES]
    objs += [porter_pod(ns, p, PORT, {"nodeName": NODES[p]}) for ns in NAMESPACES for p in PODS]
    with cl.objects(objs, NAMESPACES):
        yield cl, up


def test_truth_tables_over_three_nodes_equal_the_matrix(three: tuple[Cluster, float]) -> None:
    cl, up = three
    pods = pods_of(cl, NAMESPACES)
    assert {p["spec"]["nodeName"] for p in pods.values()} == set(NODES.values())
    record: dict[str, Any] = {"datapath": cl.datapath, "routing": cl.routing, "nodes": 3,
                              "up_s": round(up, 1), "states": []}
    with tempfile.TemporaryDirectory(prefix="ax-mx-") as tmp:
        work = Path(tmp)
        for name, policies in STATES.items():
            start = time.monotonic()
            want = matrix(cl, NAMESPACES, policies, PORT, work)
            assert len(want) == 81, len(want)
            if policies:
                cl.kubectl("apply", "-f", str(work / "policies.json"))
            try:
                diff = settled(cl, pods, want, PORT)
                assert not diff, f"{cl.datapath}/{cl.routing}, {name}:\n" + "\n".join(diff)
            finally:
                if policies:
                    cl.kubectl("delete", "-f", str(work / "policies.json"), "--wait=true", check=False)
            cross = sum(1 for s, d in want if pods[s]["spec"]["nodeName"] != pods[d]["spec"]["nodeName"])
            record["states"].append({"state": name, "probes": len(want), "cross_node": cross,
                                     "allowed": sum(want.values()), "equal": True,
                                     "seconds": round(time.monotonic() - start, 1)})
    # the states are not trivial: each denies something, across nodes too
    allowed = [s["allowed"] for s in record["states"]]
    assert allowed[0] == 81 and all(a < 81 for a in allowed[1:]), allowed
    out = os.environ.get("AXONEME_K8S_MATRIX_RESULTS")
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(record) + "\n")
