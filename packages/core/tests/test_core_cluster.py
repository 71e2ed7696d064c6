"""Cluster descriptions: loading Namespaces/Pods, IP allocation, identity labels, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from axoneme.core.cluster import Cluster, Namespace, Pod, pod_identity_labels
from axoneme.core.endpoint import NamedPort
from axoneme.core.errors import InvalidRule

CLUSTER = """
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {team: red}}
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Pod
  metadata: {name: a, namespace: x, labels: {app: web}}
  spec:
    serviceAccountName: web-sa
    containers:
    - name: c
      ports:
      - {name: http, containerPort: 8080}
      - {containerPort: 9090}
      - {name: dns, containerPort: 53, protocol: UDP}
- apiVersion: v1
  kind: Pod
  metadata: {name: b, namespace: x}
  status: {podIP: 10.244.0.1}
- apiVersion: v1
  kind: Pod
  metadata: {name: c, namespace: y}
- apiVersion: networking.k8s.io/v1
  kind: NetworkPolicy
  metadata: {name: ignored}
"""


def test_load_namespaces_pods_and_allocate_ips(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(CLUSTER)
    c = Cluster.load([str(tmp_path)])
    assert set(c.pods) == {"x/a", "x/b", "y/c"}
    a = c.pods["x/a"]
    assert a.ports == (NamedPort("http", 8080, "TCP"), NamedPort("dns", 53, "UDP"))
    assert a.service_account == "web-sa"
    # pods without an IP get the next free one, skipping addresses in use
    assert c.pods["x/b"].ips == ("10.244.0.1",)
    assert a.ips == ("10.244.0.2",) and c.pods["y/c"].ips == ("10.244.0.3",)
    assert c.namespaces["x"].labels == {"team": "red", "kubernetes.io/metadata.name": "x"}
    assert c.namespaces["y"].labels == {"kubernetes.io/metadata.name": "y"}  # implied namespace
    assert c.pod_by_ip("10.244.0.3") == c.pods["y/c"]


def test_pod_identity_labels() -> None:
    pod = Pod("a", "x", {"app": "web"}, ("10.244.0.9",), service_account="sa")
    labels = pod_identity_labels(pod, Namespace("x", {"team": "red", "kubernetes.io/metadata.name": "x"}), "c1")
    assert labels.sorted_strings() == sorted([
        "k8s:app=web", "k8s:io.kubernetes.pod.namespace=x",
        "k8s:io.cilium.k8s.namespace.labels.team=red",
        "k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=x",
        "k8s:io.cilium.k8s.policy.serviceaccount=sa", "k8s:io.cilium.k8s.policy.cluster=c1",
    ])


@pytest.mark.parametrize("text,field", [
    ("kind: Pod\nmetadata: {namespace: x}\n", "metadata.name"),
    ("kind: Pod\nmetadata: {name: a, labels: {'bad key!': v}}\n", "metadata.labels.bad key!"),
    ("kind: Pod\nmetadata: {name: a}\nstatus: {podIP: 300.1.1.1}\n", "status.podIP"),
    ("kind: Pod\nmetadata: {name: a}\nspec: {containers: [{ports: [{containerPort: 0}]}]}\n",
     "spec.containers[0].ports[0].containerPort"),
    ("- just a list\n", ""),
])
def test_errors_name_file_document_field(tmp_path: Path, text: str, field: str) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("kind: Namespace\nmetadata: {name: ok}\n---\n" + text)
    with pytest.raises(InvalidRule) as err:
        Cluster.load([str(f)])
    problem = err.value.problems[0]
    assert problem.file == str(f) and problem.document == 1 and problem.field == field


def test_missing_file_and_malformed_yaml(tmp_path: Path) -> None:
    with pytest.raises(InvalidRule, match="no such file"):
        Cluster.load([str(tmp_path / "nope.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: [unclosed\n")
    with pytest.raises(InvalidRule, match="invalid YAML"):
        Cluster.load([str(bad)])


def test_duplicate_pod(tmp_path: Path) -> None:
    f = tmp_path / "dup.yaml"
    f.write_text("kind: Pod\nmetadata: {name: a}\n---\nkind: Pod\nmetadata: {name: a}\n")
    with pytest.raises(InvalidRule, match="declared twice"):
        Cluster.load([str(f)])
