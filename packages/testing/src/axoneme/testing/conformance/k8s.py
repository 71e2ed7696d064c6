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


# -- upstream semantics where Cilium differs (issue 16) -------------------------------
# An ipBlock matches pod addresses, one by one (upstream's "should allow egress
# access to server in CIDR block", "should enforce except clause while egress
# access to server in CIDR block", "should ensure an IP overlapping both
# IPBlock.CIDR and IPBlock.Except is allowed"); an egress named port resolves
# per destination pod.

def _host(topo, pod: str) -> str:
    return f"{topo.ips[pod]}/{128 if ':' in topo.ips[pod] else 32}"


def _around(topo) -> str:
    """A /16 holding every pod of the topology."""
    import ipaddress

    nets = [ipaddress.ip_network(f"{ip}/16", strict=False) for ip in topo.ips.values()]
    assert len(set(nets)) == 1, f"pods span several /16: {sorted(set(map(str, nets)))}"
    return str(nets[0])


def _egress_a(name: str, *peers: dict, ports: list | None = None) -> dict:
    rule: dict = {"to": list(peers)}
    if ports:
        rule["ports"] = ports
    return np(name, "x", {"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
                          "egress": [rule]})


def test_ip_block_egress_to_one_pod(clean, tmp_path):
    docs = [_egress_a("a-to-y-b-ip", {"ipBlock": {"cidr": _host(clean, "y/b")}})]
    run_case(clean, tmp_path, "ipblock-pod", docs, lambda s, d, p, pr: s != "x/a" or d == "y/b")


def test_ip_block_except_carves_out_a_pod(clean, tmp_path):
    block = {"ipBlock": {"cidr": _around(clean), "except": [_host(clean, "y/b")]}}
    docs = [_egress_a("a-to-all-but-y-b", block)]
    run_case(clean, tmp_path, "ipblock-except", docs, lambda s, d, p, pr: s != "x/a" or d != "y/b")


def test_ip_block_overlapping_cidr_and_except_is_allowed(clean, tmp_path):
    block = {"ipBlock": {"cidr": _around(clean), "except": [_host(clean, "y/b")]}}
    docs = [_egress_a("a-to-all-but-y-b", block),
            np("a-to-y-b", "x", {"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
                                  "egress": [{"to": [{"ipBlock": {"cidr": _host(clean, "y/b")}}]}]})]
    run_case(clean, tmp_path, "ipblock-overlap", docs, lambda s, d, p, pr: True)


def test_ip_block_ingress_from_one_pod_and_port(clean, tmp_path):
    docs = [np("y-b-from-x-a-ip", "y", {"podSelector": {"matchLabels": {"pod": "b"}},
                                        "ingress": [{"from": [{"ipBlock": {"cidr": _host(clean, "x/a")}}],
                                                     "ports": [{"port": 81, "protocol": "UDP"}]}]})]
    run_case(clean, tmp_path, "ipblock-ingress", docs,
             lambda s, d, p, pr: d != "y/b" or (s == "x/a" and (p, pr) == (81, "udp")))


def test_named_port_in_egress_per_destination(clean, tmp_path):
    docs = [_egress_a("a-to-y-named", {"namespaceSelector": {"matchLabels": {"ns": "y"}}},
                      ports=[{"port": "serve-81-udp", "protocol": "UDP"}])]
    run_case(clean, tmp_path, "named-egress", docs,
             lambda s, d, p, pr: s != "x/a" or (ns_of(d) == "y" and (p, pr) == (81, "udp")))


def test_named_port_in_egress_with_ip_block(clean, tmp_path):
    docs = [_egress_a("a-to-z-c-named", {"ipBlock": {"cidr": _host(clean, "z/c")}},
                      ports=[{"port": "serve-80-tcp"}])]
    run_case(clean, tmp_path, "named-ipblock", docs,
             lambda s, d, p, pr: s != "x/a" or (d == "z/c" and (p, pr) == (80, "tcp")))
