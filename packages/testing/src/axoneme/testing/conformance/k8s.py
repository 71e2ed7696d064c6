"""The Kubernetes NetworkPolicy e2e scenarios, in the kernel, on the datapath under test.

Namespaces x,y,z (label ns=<name>) x pods a,b,c (label pod=<name>), each
serving TCP and UDP on 80 and 81. Each case states the semantics it expects
(written from the Kubernetes documentation, not from our engine) and checks
the kernel against it, the engine (`policy matrix`) against the kernel, the
datapath dump against the resolved MapState, and the flow log against the
probes.
"""

from __future__ import annotations

import pytest
from axoneme.testing.conformance._cases import L4, name_of, ns_of, run_case

pytestmark = [pytest.mark.conformance, pytest.mark.privileged, pytest.mark.axoneme_kernel]


def np(name: str, ns: str, spec: dict) -> dict:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


@pytest.fixture
def clean(conformance_topology):
    yield conformance_topology
    conformance_topology.agent.reset_policies()


def test_no_policy_allows_everything(clean, tmp_path):
    run_case(clean, tmp_path, "none", [], lambda s, d, p, pr: True)


def test_default_deny_ingress(clean, tmp_path):
    docs = [np("deny-ingress", "x", {"podSelector": {}, "policyTypes": ["Ingress"]})]
    run_case(clean, tmp_path, "deny-ingress", docs, lambda s, d, p, pr: ns_of(d) != "x")


def test_default_deny_egress(clean, tmp_path):
    docs = [np("deny-egress", "x", {"podSelector": {}, "policyTypes": ["Egress"]})]
    run_case(clean, tmp_path, "deny-egress", docs, lambda s, d, p, pr: ns_of(s) != "x")


def test_allow_all_ingress_overrides_default_deny(clean, tmp_path):
    docs = [np("deny-ingress", "x", {"podSelector": {}, "policyTypes": ["Ingress"]}),
            np("allow-all", "x", {"podSelector": {}, "ingress": [{}]})]
    run_case(clean, tmp_path, "allow-all", docs, lambda s, d, p, pr: True)


def test_pod_selector_same_namespace(clean, tmp_path):
    docs = [np("a-from-b", "x", {"podSelector": {"matchLabels": {"pod": "a"}},
                                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]})]

    def expect(s, d, p, pr):
        return d != "x/a" or s == "x/b"
    run_case(clean, tmp_path, "pod-selector", docs, expect)


def test_namespace_selector(clean, tmp_path):
    docs = [np("a-from-ns-y", "x", {"podSelector": {"matchLabels": {"pod": "a"}},
                                    "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]})]
    run_case(clean, tmp_path, "ns-selector", docs, lambda s, d, p, pr: d != "x/a" or ns_of(s) == "y")


def test_pod_and_namespace_selector_and(clean, tmp_path):
    peer = {"namespaceSelector": {"matchLabels": {"ns": "y"}}, "podSelector": {"matchLabels": {"pod": "b"}}}
    docs = [np("a-from-y-b", "x", {"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [peer]}]})]
    run_case(clean, tmp_path, "and", docs, lambda s, d, p, pr: d != "x/a" or s == "y/b")


def test_pod_or_namespace_selector(clean, tmp_path):
    peers = [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}, {"podSelector": {"matchLabels": {"pod": "b"}}}]
    docs = [np("a-from-y-or-b", "x", {"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": peers}]})]
    run_case(clean, tmp_path, "or", docs, lambda s, d, p, pr: d != "x/a" or ns_of(s) == "y" or s == "x/b")


def test_match_expressions(clean, tmp_path):
    sel = {"matchExpressions": [{"key": "ns", "operator": "NotIn", "values": ["x", "y"]}]}
    docs = [np("a-from-not-xy", "x", {"podSelector": {"matchLabels": {"pod": "a"}},
                                      "ingress": [{"from": [{"namespaceSelector": sel}]}]})]
    run_case(clean, tmp_path, "expr", docs, lambda s, d, p, pr: d != "x/a" or ns_of(s) == "z")


def test_port_restriction(clean, tmp_path):
    docs = [np("a-81", "x", {"podSelector": {"matchLabels": {"pod": "a"}},
                             "ingress": [{"ports": [{"port": 81, "protocol": "TCP"}]}]})]
    run_case(clean, tmp_path, "port", docs, lambda s, d, p, pr: d != "x/a" or (p, pr) == (81, "tcp"))


def test_named_port(clean, tmp_path):
    docs = [np("a-named", "x", {"podSelector": {"matchLabels": {"pod": "a"}},
                                "ingress": [{"ports": [{"port": "serve-80-udp", "protocol": "UDP"}]}]})]
    run_case(clean, tmp_path, "named", docs, lambda s, d, p, pr: d != "x/a" or (p, pr) == (80, "udp"))


def test_end_port_range(clean, tmp_path):
    docs = [np("a-range", "x", {"podSelector": {"matchLabels": {"pod": "a"}},
                                "ingress": [{"ports": [{"port": 80, "endPort": 81, "protocol": "TCP"}]}]})]
    run_case(clean, tmp_path, "range", docs, lambda s, d, p, pr: d != "x/a" or pr == "tcp")


def test_egress_to_namespace_and_port(clean, tmp_path):
    docs = [np("a-egress", "x", {"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
                                 "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}],
                                             "ports": [{"port": 80}]}]})]

    def expect(s, d, p, pr):
        return s != "x/a" or (ns_of(d) == "y" and (p, pr) == (80, "tcp"))
    run_case(clean, tmp_path, "egress", docs, expect)


def test_several_policies_combine(clean, tmp_path):
    docs = [np("c-from-a", "y", {"podSelector": {"matchLabels": {"pod": "c"}},
                                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "a"}}}]}]}),
            np("c-from-z", "y", {"podSelector": {"matchLabels": {"pod": "c"}},
                                 "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "z"}}}],
                                              "ports": [{"port": 81, "protocol": "UDP"}]}]})]

    def expect(s, d, p, pr):
        if d != "y/c":
            return True
        return s == "y/a" or (ns_of(s) == "z" and (p, pr) == (81, "udp"))
    run_case(clean, tmp_path, "combined", docs, expect)


def test_policy_removal_restores_default_allow(clean, tmp_path):
    docs = [np("deny-ingress", "z", {"podSelector": {}, "policyTypes": ["Ingress"]})]
    run_case(clean, tmp_path, "deny-z", docs, lambda s, d, p, pr: ns_of(d) != "z", l4=L4[:1], flows=False)
    clean.agent.reset_policies()
    run_case(clean, tmp_path, "after-removal", [], lambda s, d, p, pr: True, l4=L4[:1], flows=False)


def test_pod_label_selector_follows_names(clean, tmp_path):
    # sanity of the topology itself: labels feed identities as expected
    assert {name_of(p) for p in clean.ips} == {"a", "b", "c"}
