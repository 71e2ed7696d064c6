"""Cilium policy semantics through `axoneme policy trace` / `matrix` on YAML policies."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

cli = pytest.importorskip("axoneme.agent.cli")

NAMESPACES = ("x", "y")


def cluster_objects() -> list[dict]:
    objs: list[dict] = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": {"ns": ns}}}
                        for ns in NAMESPACES]
    n = 0
    for ns in NAMESPACES:
        for name in "abc":
            n += 1
            objs.append({"apiVersion": "v1", "kind": "Pod",
                         "metadata": {"name": name, "namespace": ns, "labels": {"pod": name}},
                         "spec": {"containers": [{"name": "c", "ports": [
                             {"name": "http", "containerPort": 8080, "protocol": "TCP"}]}]},
                         "status": {"podIP": f"10.244.4.{n}"}})
    return objs


def cnp(name: str, namespace: str, spec: dict) -> dict:
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def ccnp(name: str, spec: dict) -> dict:
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumClusterwideNetworkPolicy",
            "metadata": {"name": name}, "spec": spec}


def np(name: str, namespace: str, spec: dict) -> dict:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


A = {"matchLabels": {"pod": "a"}}


class Env:
    def __init__(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.dir = tmp_path
        self.capsys = capsys
        self.cluster = tmp_path / "cluster.yaml"
        self.cluster.write_text(yaml.safe_dump_all(cluster_objects()))
        self.policies = tmp_path / "policies.yaml"
        self.policies.write_text("")

    def use(self, *policies: dict) -> Env:
        self.policies.write_text(yaml.safe_dump_all(list(policies)))
        return self

    def trace(self, src: str, dst: str, *extra: str, port: str | None = "80") -> dict[str, Any]:
        args = ["policy", "trace", "--cluster", str(self.cluster), "-f", str(self.policies),
                "--from", src, "--to", dst, "-o", "json", *extra]
        if port is not None:
            args += ["--port", port]
        self.capsys.readouterr()
        assert cli.main(args) == 0
        return json.loads(self.capsys.readouterr().out)

    def verdict(self, src: str, dst: str, *extra: str, port: str | None = "80") -> str:
        return str(self.trace(src, dst, *extra, port=port)["verdict"])

    def human(self, src: str, dst: str, port: str = "80") -> str:
        self.capsys.readouterr()
        assert cli.main(["policy", "trace", "--cluster", str(self.cluster), "-f", str(self.policies),
                         "--from", src, "--to", dst, "--port", port]) == 0
        return self.capsys.readouterr().out


@pytest.fixture
def env(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Env:
    return Env(tmp_path, capsys)


L7_POLICY = cnp("l7", "x", {"endpointSelector": A, "ingress": [{
    "fromEndpoints": [{"matchLabels": {"pod": "b"}}],
    "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}],
                 "rules": {"http": [{"method": "GET", "path": "/public"}]}}]}]})


def test_l7_trace_shows_redirect_and_rules(env: Env) -> None:
    out = env.use(L7_POLICY).trace("x/b", "x/a")
    assert out["verdict"] == "redirected"
    # the documented keys (trace -o json may carry more per side: reasons, rule_refs)
    assert {k: out["ingress"][k] for k in ("verdict", "rules")} == \
        {"verdict": "redirected", "rules": ["CiliumNetworkPolicy x/l7 spec.ingress[0]"]}
    assert {k: out["egress"][k] for k in ("verdict", "rules")} == {"verdict": "allowed", "rules": []}
    assert out["l7"]["verdict"] == "redirected"
    assert out["l7"]["rules"] == [{"parser": "http", "method": "GET", "path": "/public"}]
    assert env.verdict("x/c", "x/a") == "denied"


def test_l7_trace_applies_http_rules(env: Env) -> None:
    pytest.importorskip("axoneme.l7.http")
    env.use(L7_POLICY)
    out = env.trace("x/b", "x/a", "--http-method", "GET", "--http-path", "/public")
    assert out["verdict"] == "allowed" and out["l7"]["verdict"] == "allowed"
    out = env.trace("x/b", "x/a", "--http-method", "GET", "--http-path", "/private")
    assert out["verdict"] == "denied" and out["l7"]["verdict"] == "denied"
    assert env.verdict("x/b", "x/a", "--http-method", "POST", "--http-path", "/public") == "denied"


def test_l7_with_missing_or_unimplemented_parser_denies(env: Env) -> None:
    env.use(cnp("kafka", "x", {"endpointSelector": A, "ingress": [{
        "toPorts": [{"ports": [{"port": "9092", "protocol": "TCP"}],
                     "rules": {"kafka": [{"role": "produce", "topic": "t"}]}}]}]}))
    assert env.verdict("x/b", "x/a", port="9092") == "redirected"
    out = env.trace("x/b", "x/a", "--kafka-role", "produce", "--kafka-topic", "other", port="9092")
    assert out["verdict"] == "denied" and out["l7"]["verdict"] == "denied"


def test_l4_only_rule_makes_l7_moot(env: Env) -> None:
    l4 = cnp("l4", "x", {"endpointSelector": A, "ingress": [{
        "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}]}]})
    out = env.use(L7_POLICY, l4).trace("x/b", "x/a")
    assert out["verdict"] == "allowed" and out["l7"] is None
    assert set(out["ingress"]["rules"]) == {"CiliumNetworkPolicy x/l7 spec.ingress[0]",
                                            "CiliumNetworkPolicy x/l4 spec.ingress[0]"}


def test_from_endpoints_with_namespace_label(env: Env) -> None:
    env.use(cnp("from-y", "x", {"endpointSelector": A, "ingress": [{"fromEndpoints": [
        {"matchLabels": {"k8s:io.kubernetes.pod.namespace": "y", "pod": "b"}}]}]}))
    assert env.verdict("y/b", "x/a") == "allowed"
    assert env.verdict("x/b", "x/a") == "denied"
    assert env.verdict("y/c", "x/a") == "denied"


def test_from_endpoints_scoped_to_policy_namespace(env: Env) -> None:
    env.use(cnp("same-ns", "x", {"endpointSelector": A, "ingress": [{"fromEndpoints": [{}]}]}))
    assert env.verdict("x/b", "x/a") == "allowed"
    assert env.verdict("y/b", "x/a") == "denied"
    # a namespace-labels key is not scoped to the policy namespace
    env.use(cnp("ns-label", "x", {"endpointSelector": A, "ingress": [{"fromEndpoints": [
        {"matchLabels": {"k8s:io.cilium.k8s.namespace.labels.ns": "y"}}]}]}))
    assert env.verdict("y/c", "x/a") == "allowed"
    assert env.verdict("x/b", "x/a") == "denied"


def test_cilium_empty_rule_allows_nothing(env: Env) -> None:
    env.use(cnp("empty", "x", {"endpointSelector": A, "ingress": [{}]}))
    assert env.verdict("x/b", "x/a") == "denied"
    assert env.verdict("x/a", "x/b") == "allowed"


@pytest.mark.parametrize("entity,src,want", [
    ("world", "entity:world", "allowed"), ("world", "203.0.113.9", "allowed"),
    ("world", "x/b", "denied"), ("world", "entity:host", "allowed"),  # host: allow-localhost
    ("cluster", "y/b", "allowed"), ("cluster", "entity:world", "denied"),
    ("all", "203.0.113.9", "allowed"), ("all", "y/c", "allowed"),
])
def test_from_entities(env: Env, entity: str, src: str, want: str) -> None:
    env.use(cnp("ent", "x", {"endpointSelector": A, "ingress": [{"fromEntities": [entity]}]}))
    assert env.verdict(src, "x/a") == want


@pytest.mark.parametrize("entity,dst,want", [
    ("host", "entity:host", "allowed"), ("host", "entity:world", "denied"), ("host", "x/b", "denied"),
    ("world", "198.51.100.7", "allowed"), ("world", "y/a", "denied"),
    ("cluster", "y/a", "allowed"), ("cluster", "entity:host", "allowed"), ("cluster", "198.51.100.7", "denied"),
])
def test_to_entities(env: Env, entity: str, dst: str, want: str) -> None:
    env.use(cnp("ent", "x", {"endpointSelector": A, "egress": [{"toEntities": [entity]}]}))
    assert env.verdict("x/a", dst) == want


def test_to_cidr_and_cidrset_except(env: Env) -> None:
    env.use(cnp("cidr", "x", {"endpointSelector": A, "egress": [
        {"toCIDR": ["192.0.2.0/24"]},
        {"toCIDRSet": [{"cidr": "198.51.100.0/24", "except": ["198.51.100.128/25"]}]}]}))
    assert env.verdict("x/a", "192.0.2.1") == "allowed"
    assert env.verdict("x/a", "198.51.100.1") == "allowed"
    assert env.verdict("x/a", "198.51.100.129") == "denied"
    assert env.verdict("x/a", "203.0.113.1") == "denied"
    assert env.trace("x/a", "198.51.100.1")["egress"]["rules"] == ["CiliumNetworkPolicy x/cidr spec.egress[1]"]


def test_end_port_range(env: Env) -> None:
    env.use(cnp("range", "x", {"endpointSelector": A, "ingress": [{"toPorts": [{"ports": [
        {"port": "8000", "endPort": 8100, "protocol": "TCP"}]}]}]}))
    for port, want in (("7999", "denied"), ("8000", "allowed"), ("8063", "allowed"),
                       ("8100", "allowed"), ("8101", "denied"), ("8050/UDP", "denied")):
        assert env.verdict("x/b", "x/a", port=port) == want, port


def test_icmp_types(env: Env) -> None:
    env.use(cnp("icmp", "x", {"endpointSelector": A, "ingress": [{"icmps": [{"fields": [
        {"family": "IPv4", "type": "EchoRequest"}]}]}]}))
    assert env.verdict("x/b", "x/a", "--icmp-type", "8", port=None) == "allowed"
    assert env.verdict("x/b", "x/a", "--icmp-type", "EchoRequest", port=None) == "allowed"
    assert env.verdict("x/b", "x/a", "--icmp-type", "0", port=None) == "denied"
    assert env.verdict("x/b", "x/a", "--icmp-type", "128", "--icmp-family", "IPv6", port=None) == "denied"
    assert env.verdict("x/b", "x/a") == "denied"


def test_deny_beats_allow_from_any_kind(env: Env) -> None:
    allow = np("allow-all", "x", {"podSelector": {}, "ingress": [{}]})
    deny = cnp("deny-y", "x", {"endpointSelector": A, "ingressDeny": [{"fromEndpoints": [
        {"matchLabels": {"k8s:io.kubernetes.pod.namespace": "y"}}]}]})
    env.use(allow, deny)
    out = env.trace("y/b", "x/a")
    assert out["verdict"] == "denied"
    assert out["ingress"]["rules"] == ["CiliumNetworkPolicy x/deny-y spec.ingressDeny[0]"]
    assert env.verdict("x/b", "x/a") == "allowed"
    assert "denied by a deny rule" in env.human("y/b", "x/a")


def test_port_deny_beats_l3_allow(env: Env) -> None:
    env.use(cnp("allow", "x", {"endpointSelector": A, "ingress": [{"fromEntities": ["cluster"]}]}),
            cnp("deny80", "x", {"endpointSelector": A, "ingressDeny": [{"fromEntities": ["all"],
                                                                          "toPorts": [{"ports": [{"port": "80"}]}]}]}))
    assert env.verdict("x/b", "x/a") == "denied"
    assert env.verdict("x/b", "x/a", port="81") == "allowed"


def test_ccnp_selects_every_namespace(env: Env) -> None:
    env.use(ccnp("a-from-b", {"endpointSelector": A, "ingress": [{"fromEndpoints": [
        {"matchLabels": {"pod": "b"}}]}]}))
    assert env.verdict("x/b", "x/a") == "allowed"
    assert env.verdict("y/b", "x/a") == "allowed"  # no namespace scoping in a CCNP
    assert env.verdict("y/c", "y/a") == "denied"
    assert env.verdict("y/c", "y/b") == "allowed"  # b is not selected


def test_enable_default_deny_false(env: Env) -> None:
    env.use(cnp("no-default-deny", "x", {"endpointSelector": A, "enableDefaultDeny": {"ingress": False},
                                         "ingress": [{"fromEndpoints": [{"matchLabels": {"pod": "b"}}]}]}))
    assert env.verdict("x/b", "x/a") == "allowed"
    assert env.verdict("x/c", "x/a") == "allowed"  # not enforced: still allowed by default
    assert "no policy selects x/a" not in env.human("x/b", "x/a")
    assert "none enables default deny: allowed by default" in env.human("x/c", "x/a")


def test_egress_and_ingress_both_decide(env: Env) -> None:
    env.use(cnp("a-out", "x", {"endpointSelector": A, "egress": [{"toEndpoints": [{"matchLabels": {"pod": "b"}}]}]}),
            cnp("b-in", "x", {"endpointSelector": {"matchLabels": {"pod": "b"}}, "ingress": [
                {"fromEndpoints": [{"matchLabels": {"pod": "c"}}]}]}))
    out = env.trace("x/a", "x/b")
    assert out["egress"]["verdict"] == "allowed" and out["ingress"]["verdict"] == "denied"
    assert out["verdict"] == "denied"
    text = env.human("x/a", "x/b")
    assert "default deny: no rule allows" in text and "CiliumNetworkPolicy x/a-out spec.egress[0]" in text
    assert "no policy selects x/c for egress: allowed by default" in env.human("x/c", "x/b")


def test_named_port_trace(env: Env) -> None:
    env.use(cnp("named", "x", {"endpointSelector": A, "ingress": [{"toPorts": [{"ports": [
        {"port": "http", "protocol": "TCP"}]}]}]}))
    assert env.verdict("x/b", "x/a", port="http") == "allowed"
    assert env.verdict("x/b", "x/a", port="8080") == "allowed"
    assert env.verdict("x/b", "x/a", port="80") == "denied"


def test_pod_to_itself_is_allowed(env: Env) -> None:
    env.use(cnp("deny-all", "x", {"endpointSelector": A, "ingressDeny": [{"fromEntities": ["all"]}],
                                  "egressDeny": [{"toEntities": ["all"]}]}))
    assert env.verdict("x/a", "x/a") == "allowed"
    assert env.verdict("x/b", "x/a") == "denied"
