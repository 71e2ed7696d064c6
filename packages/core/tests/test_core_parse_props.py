"""Property tests of the translation: namespace scoping holds for any labels."""

from __future__ import annotations

from typing import Any

from axoneme.core.labels import Labels
from axoneme.core.policy.parse import parse_policy_obj
from hypothesis import given, settings
from hypothesis import strategies as st

SETTINGS = settings(max_examples=200, deadline=None)

names = st.from_regex(r"[a-z][a-z0-9]{0,6}", fullmatch=True)
values = st.from_regex(r"[a-z0-9]{0,5}", fullmatch=True)
label_maps = st.dictionaries(names, values, max_size=3)


def pod(ns: str, labels: dict[str, str], ns_labels: dict[str, str] | None = None) -> Labels:
    texts = [f"k8s:{k}={v}" for k, v in labels.items()]
    texts.append(f"k8s:io.kubernetes.pod.namespace={ns}")
    texts += [f"k8s:io.cilium.k8s.namespace.labels.{k}={v}" for k, v in (ns_labels or {}).items()]
    return Labels.from_strings(texts)


def cnp(spec: dict[str, Any], ns: str) -> dict[str, Any]:
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": "p", "namespace": ns}, "spec": spec}


@SETTINGS
@given(names, names, label_maps, label_maps)
def test_cnp_subject_and_peers_only_match_own_namespace(ns: str, other: str, sel: dict[str, str],
                                                         labels: dict[str, str]) -> None:
    spec = {"endpointSelector": {"matchLabels": sel}, "ingress": [{"fromEndpoints": [{"matchLabels": sel}]}]}
    rule = parse_policy_obj(cnp(spec, ns)).rules[0]
    peer = rule.rules[0].peers[0].selector  # type: ignore[index,union-attr]
    superset = all(labels.get(k) == v for k, v in sel.items())
    for selector in (rule.subject, peer):
        assert selector.matches(pod(ns, labels)) == superset
        if other != ns:
            assert not selector.matches(pod(other, labels))


@SETTINGS
@given(names, names, label_maps, label_maps, label_maps, label_maps)
def test_np_pod_and_namespace_selector_is_an_and(ns: str, other: str, pod_sel: dict[str, str],
                                                 ns_sel: dict[str, str], labels: dict[str, str],
                                                 ns_labels: dict[str, str]) -> None:
    doc = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": "n", "namespace": ns},
           "spec": {"podSelector": {}, "ingress": [{"from": [
               {"podSelector": {"matchLabels": pod_sel}, "namespaceSelector": {"matchLabels": ns_sel}},
               {"podSelector": {"matchLabels": pod_sel}},
           ]}]}}
    both, pod_only = (p.selector for p in parse_policy_obj(doc).rules[0].rules[0].peers)  # type: ignore[union-attr]
    pod_ok = all(labels.get(k) == v for k, v in pod_sel.items())
    ns_ok = all(ns_labels.get(k) == v for k, v in ns_sel.items())
    assert both.matches(pod(other, labels, ns_labels)) == (pod_ok and ns_ok)
    assert pod_only.matches(pod(ns, labels, ns_labels)) == pod_ok
    if other != ns:
        assert not pod_only.matches(pod(other, labels, ns_labels))
