"""The Kubernetes network-policy e2e scenarios, as `axoneme policy matrix` expectations.

Topology of the upstream suite (test/e2e/network/netpol): namespaces x, y, z
(labelled ns=<name>), pods a, b, c in each (labelled pod=<name>), serving 80
and 81 over TCP, UDP and SCTP under named ports serve-<port>-<proto>. Each
case writes policies as YAML, runs the offline matrix through the CLI and
compares with a reachability table built from the documented semantics
(a pod to itself is always allowed).

Deliberate Cilium behaviour: ipBlock never matches pod IPs (CIDR rules only
select world/CIDR identities), so ipBlock is checked with `policy trace` to
addresses outside the cluster.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

cli = pytest.importorskip("axoneme.agent.cli")

NAMESPACES = ("x", "y", "z")
PODS = tuple(f"{ns}/{p}" for ns in NAMESPACES for p in "abc")


def cluster_objects() -> list[dict]:
    objs: list[dict] = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": {"ns": ns}}}
                        for ns in NAMESPACES]
    for i, key in enumerate(PODS):
        ns, name = key.split("/")
        ports = [{"name": f"serve-{port}-{proto.lower()}", "containerPort": port, "protocol": proto}
                 for port in (80, 81) for proto in ("TCP", "UDP", "SCTP")]
        objs.append({"apiVersion": "v1", "kind": "Pod",
                     "metadata": {"name": name, "namespace": ns, "labels": {"pod": name}},
                     "spec": {"containers": [{"name": "cont", "ports": ports}]},
                     "status": {"podIP": f"10.244.3.{i + 1}"}})
    return objs


class Reach:
    """Expected reachability (the e2e suite's Reachability helper)."""

    def __init__(self, default: bool = True) -> None:
        self.m = {(s, d): default for s in PODS for d in PODS}

    def all_ingress(self, dst: str, ok: bool) -> Reach:
        for s in PODS:
            self.m[(s, dst)] = ok
        return self

    def all_egress(self, src: str, ok: bool) -> Reach:
        for d in PODS:
            self.m[(src, d)] = ok
        return self

    def where(self, pred: Callable[[str, str], bool], ok: bool) -> Reach:
        for k in self.m:
            if pred(*k):
                self.m[k] = ok
        return self

    def expect(self, src: str, dst: str, ok: bool) -> Reach:
        self.m[(src, dst)] = ok
        return self

    def table(self) -> dict[tuple[str, str], bool]:
        return {k: (True if k[0] == k[1] else v) for k, v in self.m.items()}


def ns(pod: str) -> str:
    return pod.split("/")[0]


@pytest.fixture
def run_matrix(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(yaml.safe_dump_all(cluster_objects()))

    def run(policies: list[dict], port: str = "80") -> dict[tuple[str, str], bool]:
        pol = tmp_path / "policies.yaml"
        pol.write_text(yaml.safe_dump_all(policies) if policies else "")
        args = ["policy", "matrix", "--cluster", str(cluster), "--port", port, "-o", "json"]
        if policies:
            args += ["-f", str(pol)]
        capsys.readouterr()
        assert cli.main(args) == 0
        probes = json.loads(capsys.readouterr().out)["probes"]
        assert len(probes) == len(PODS) ** 2
        return {(p["from"], p["to"]): p["verdict"] == "allowed" for p in probes}

    return run


def np(name: str, namespace: str, spec: dict) -> dict:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def diff(got: dict, want: Reach) -> list[str]:
    table = want.table()
    return [f"{s}->{d}: got {'allowed' if got[(s, d)] else 'denied'}"
            for (s, d) in sorted(table) if got[(s, d)] != table[(s, d)]]


DENY_INGRESS_X = np("deny-ingress", "x", {"podSelector": {}, "policyTypes": ["Ingress"]})
DENY_EGRESS_X = np("deny-egress", "x", {"podSelector": {}, "policyTypes": ["Egress"]})
POD_A = {"matchLabels": {"pod": "a"}}


def test_no_policy_allows_everything(run_matrix) -> None:
    assert diff(run_matrix([]), Reach(True)) == []


def test_default_deny_ingress(run_matrix) -> None:
    want = Reach().where(lambda s, d: ns(d) == "x", False)
    assert diff(run_matrix([DENY_INGRESS_X]), want) == []


def test_default_deny_egress(run_matrix) -> None:
    want = Reach().where(lambda s, d: ns(s) == "x", False)
    assert diff(run_matrix([DENY_EGRESS_X]), want) == []


def test_default_deny_all(run_matrix) -> None:
    pol = np("deny-all", "x", {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]})
    want = Reach().where(lambda s, d: "x" in (ns(s), ns(d)), False)
    assert diff(run_matrix([pol]), want) == []


def test_allow_all_ingress_after_deny(run_matrix) -> None:
    allow = np("allow-all", "x", {"podSelector": {}, "ingress": [{}]})
    assert diff(run_matrix([DENY_INGRESS_X, allow]), Reach(True)) == []


def test_allow_all_egress_after_deny(run_matrix) -> None:
    allow = np("allow-all", "x", {"podSelector": {}, "egress": [{}], "policyTypes": ["Egress"]})
    assert diff(run_matrix([DENY_EGRESS_X, allow]), Reach(True)) == []


def test_pod_selector_same_namespace(run_matrix) -> None:
    pol = np("a-from-b", "x", {"podSelector": POD_A,
                                "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]})
    want = Reach().all_ingress("x/a", False).expect("x/b", "x/a", True)
    assert diff(run_matrix([pol]), want) == []


def test_deny_other_namespaces(run_matrix) -> None:
    pol = np("same-ns", "x", {"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]})
    want = Reach().where(lambda s, d: ns(d) == "x" and ns(s) != "x", False)
    assert diff(run_matrix([pol]), want) == []


def test_allow_from_all_namespaces(run_matrix) -> None:
    pol = np("all-ns", "x", {"podSelector": POD_A, "ingress": [{"from": [{"namespaceSelector": {}}]}]})
    assert diff(run_matrix([pol]), Reach(True)) == []


def test_namespace_selector(run_matrix) -> None:
    pol = np("a-from-y", "x", {"podSelector": POD_A,
                                "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]})
    want = Reach().all_ingress("x/a", False).where(lambda s, d: d == "x/a" and ns(s) == "y", True)
    assert diff(run_matrix([pol]), want) == []


def test_namespace_selector_match_expressions(run_matrix) -> None:
    pol = np("a-not-from-x", "x", {"podSelector": POD_A, "ingress": [{"from": [{"namespaceSelector": {
        "matchExpressions": [{"key": "ns", "operator": "NotIn", "values": ["x"]}]}}]}]})
    want = Reach().all_ingress("x/a", False).where(lambda s, d: d == "x/a" and ns(s) != "x", True)
    assert diff(run_matrix([pol]), want) == []


def test_pod_selector_match_expressions(run_matrix) -> None:
    pol = np("a-from-bc", "x", {"podSelector": POD_A, "ingress": [{"from": [{"podSelector": {
        "matchExpressions": [{"key": "pod", "operator": "In", "values": ["b", "c"]}]}}]}]})
    want = Reach().all_ingress("x/a", False).expect("x/b", "x/a", True).expect("x/c", "x/a", True)
    assert diff(run_matrix([pol]), want) == []


def test_pod_and_namespace_selector_and_form(run_matrix) -> None:
    # one peer with both selectors: pods b of namespace y only
    pol = np("and", "x", {"podSelector": POD_A, "ingress": [{"from": [{
        "namespaceSelector": {"matchLabels": {"ns": "y"}}, "podSelector": {"matchLabels": {"pod": "b"}}}]}]})
    want = Reach().all_ingress("x/a", False).expect("y/b", "x/a", True)
    assert diff(run_matrix([pol]), want) == []


def test_pod_or_namespace_selector_or_form(run_matrix) -> None:
    # two peers: every pod of y, or pod b of the policy's namespace
    pol = np("or", "x", {"podSelector": POD_A, "ingress": [{"from": [
        {"namespaceSelector": {"matchLabels": {"ns": "y"}}},
        {"podSelector": {"matchLabels": {"pod": "b"}}}]}]})
    want = (Reach().all_ingress("x/a", False).where(lambda s, d: d == "x/a" and ns(s) == "y", True)
            .expect("x/b", "x/a", True))
    assert diff(run_matrix([pol]), want) == []


def test_pod_selector_and_namespace_expressions(run_matrix) -> None:
    pol = np("and-expr", "x", {"podSelector": POD_A, "ingress": [{"from": [{
        "namespaceSelector": {"matchExpressions": [{"key": "ns", "operator": "In", "values": ["y", "z"]}]},
        "podSelector": {"matchExpressions": [{"key": "pod", "operator": "NotIn", "values": ["a"]}]}}]}]})
    want = Reach().all_ingress("x/a", False).where(
        lambda s, d: d == "x/a" and ns(s) in ("y", "z") and not s.endswith("/a"), True)
    assert diff(run_matrix([pol]), want) == []


@pytest.mark.parametrize("port,ok", [("80", True), ("81", False)])
def test_named_port_ingress(run_matrix, port: str, ok: bool) -> None:
    pol = np("named", "x", {"podSelector": POD_A, "ingress": [{"ports": [{"port": "serve-80-tcp"}]}]})
    want = Reach().all_ingress("x/a", ok)
    assert diff(run_matrix([pol], port), want) == []


def test_named_port_in_matrix_resolves_per_destination(run_matrix) -> None:
    pol = np("named", "x", {"podSelector": POD_A, "ingress": [{"ports": [{"port": 81}]}]})
    assert diff(run_matrix([pol], "serve-81-tcp"), Reach(True)) == []
    assert diff(run_matrix([pol], "serve-80-tcp"), Reach().all_ingress("x/a", False)) == []


@pytest.mark.parametrize("port,ok", [("80", False), ("81", True)])
def test_named_port_egress(run_matrix, port: str, ok: bool) -> None:
    pol = np("named-egress", "x", {"podSelector": POD_A, "policyTypes": ["Egress"],
                                    "egress": [{"ports": [{"port": "serve-81-tcp", "protocol": "TCP"}]}]})
    want = Reach().all_egress("x/a", ok)
    assert diff(run_matrix([pol], port), want) == []


@pytest.mark.parametrize("port,ok", [("80", False), ("81", True)])
def test_end_port(run_matrix, port: str, ok: bool) -> None:
    pol = np("range", "x", {"podSelector": POD_A, "ingress": [{"ports": [{"port": 81, "endPort": 90}]}]})
    want = Reach().all_ingress("x/a", ok)
    assert diff(run_matrix([pol], port), want) == []


def test_egress_to_pod_in_other_namespace(run_matrix) -> None:
    pol = np("to-y-b", "x", {"podSelector": POD_A, "policyTypes": ["Egress"], "egress": [{
        "to": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}, "podSelector": {"matchLabels": {"pod": "b"}}}],
        "ports": [{"port": 80}]}]})
    want = Reach().all_egress("x/a", False).expect("x/a", "y/b", True)
    assert diff(run_matrix([pol]), want) == []
    assert diff(run_matrix([pol], "81"), Reach().all_egress("x/a", False)) == []


@pytest.mark.parametrize("proto", ["UDP", "SCTP"])
def test_protocols(run_matrix, proto: str) -> None:
    pol = np("proto", "x", {"podSelector": POD_A, "ingress": [{"ports": [{"port": 80, "protocol": proto}]}]})
    assert diff(run_matrix([pol], f"80/{proto}"), Reach(True)) == []
    assert diff(run_matrix([pol], "80/TCP"), Reach().all_ingress("x/a", False)) == []
    assert diff(run_matrix([pol], f"81/{proto}"), Reach().all_ingress("x/a", False)) == []


def test_several_policies_combine_as_union(run_matrix) -> None:
    p1 = np("from-b", "x", {"podSelector": POD_A, "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]})
    p2 = np("from-z", "x", {"podSelector": POD_A, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "z"}}}]}]})
    want = (Reach().all_ingress("x/a", False).expect("x/b", "x/a", True)
            .where(lambda s, d: d == "x/a" and ns(s) == "z", True))
    assert diff(run_matrix([p1, p2]), want) == []


def test_ingress_and_egress_policies_both_must_allow(run_matrix) -> None:
    # x/a may only send to z; y/* only accept from x/a -> nothing from x/a reaches y
    p1 = np("a-egress-z", "x", {"podSelector": POD_A, "policyTypes": ["Egress"], "egress": [{
        "to": [{"namespaceSelector": {"matchLabels": {"ns": "z"}}}]}]})
    p2 = np("y-from-xa", "y", {"podSelector": {}, "ingress": [{"from": [{
        "namespaceSelector": {"matchLabels": {"ns": "x"}}, "podSelector": POD_A}]}]})
    want = (Reach().all_egress("x/a", False).where(lambda s, d: s == "x/a" and ns(d) == "z", True)
            .where(lambda s, d: ns(d) == "y", False))
    assert diff(run_matrix([p1, p2]), want) == []


def test_ipblock_except_with_trace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(yaml.safe_dump_all(cluster_objects()))
    pol = tmp_path / "p.yaml"
    pol.write_text(yaml.safe_dump(np("ipblock", "x", {"podSelector": POD_A, "policyTypes": ["Egress"], "egress": [{
        "to": [{"ipBlock": {"cidr": "198.51.100.0/24", "except": ["198.51.100.128/25"]}}]}]})))

    def verdict(dst: str) -> str:
        capsys.readouterr()
        assert cli.main(["policy", "trace", "--cluster", str(cluster), "-f", str(pol), "--from", "x/a",
                         "--to", dst, "--port", "80", "-o", "json"]) == 0
        return json.loads(capsys.readouterr().out)["verdict"]

    assert verdict("198.51.100.10") == "allowed"
    assert verdict("198.51.100.130") == "denied"
    assert verdict("203.0.113.1") == "denied"
    assert verdict("y/b") == "denied"  # CIDR rules never select pods (Cilium)
