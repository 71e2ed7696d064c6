"""Translation tests: each policy kind and field into the normalized model."""

from __future__ import annotations

import ipaddress
import textwrap
from pathlib import Path

import pytest

from axoneme.core.errors import InvalidRule
from axoneme.core.labels import Labels
from axoneme.core.mapstate import Direction
from axoneme.core.policy.api import (
    CIDRPeer,
    DNSRule,
    EndpointPeer,
    EntityPeer,
    FQDNPeer,
    HeaderMatch,
    HTTPRule,
    ICMPField,
    KafkaRule,
    PolicyKind,
    PolicyRef,
    PortProtocol,
)
from axoneme.core.policy.parse import Document, load_documents, parse_policies, parse_policy, parse_policy_obj
from axoneme.core.selectors import LabelSelector, Operator, Requirement


def cnp(spec: dict, name: str = "p", namespace: str | None = "ns1", kind: str = "CiliumNetworkPolicy",
        key: str = "spec") -> dict:
    meta: dict = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    return {"apiVersion": "cilium.io/v2", "kind": kind, "metadata": meta, key: spec}


def np_(spec: dict, name: str = "np", namespace: str | None = "ns1") -> dict:
    meta: dict = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": meta, "spec": spec}


def ns_req(ns: str) -> Requirement:
    return Requirement("k8s:io.kubernetes.pod.namespace", Operator.IN, frozenset({ns}))


def pod_labels(ns: str, ns_labels: dict[str, str] | None = None, **labels: str) -> Labels:
    texts = [f"k8s:{k}={v}" for k, v in labels.items()]
    texts.append(f"k8s:io.kubernetes.pod.namespace={ns}")
    for k, v in (ns_labels or {}).items():
        texts.append(f"k8s:io.cilium.k8s.namespace.labels.{k}={v}")
    return Labels.from_strings(texts)


def test_cnp_subject_is_scoped_to_namespace() -> None:
    pol = parse_policy_obj(cnp({"endpointSelector": {"matchLabels": {"app": "web"}}, "ingress": [{}]}))
    assert pol.ref == PolicyRef(PolicyKind.CILIUM_NETWORK_POLICY, "ns1", "p")
    (rule,) = pol.rules
    assert rule.subject == LabelSelector.build({"app": "web"}).with_requirement(ns_req("ns1"))
    assert rule.subject.matches(pod_labels("ns1", app="web"))
    assert not rule.subject.matches(pod_labels("ns2", app="web"))


def test_missing_namespace_defaults_to_default() -> None:
    pol = parse_policy_obj(cnp({"endpointSelector": {}}, namespace=None))
    assert pol.ref.namespace == "default"
    assert pol.rules[0].subject == LabelSelector(frozenset({ns_req("default")}))
