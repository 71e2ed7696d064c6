"""Staged policies and audit mode in the agent and the CLI, without root: offline
trace/matrix, flow attribution, the per-policy counter, the Kubernetes document,
and the document edits of `policy apply --audit` / `policy promote`."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from axoneme.agent._audit import AuditCounter, parse_option, set_mode
from axoneme.agent._errors import BadRequest
from axoneme.agent._flowattr import FlowAttributor
from axoneme.agent._k8s import policy_document
from axoneme.agent._metrics import AgentMetrics
from axoneme.agent.cli import main
from axoneme.agent.cli._audit import stage_documents
from axoneme.core.endpoint import Endpoint
from axoneme.core.flow import Flow, FlowEndpoint, FlowVerdict
from axoneme.core.labels import Labels
from axoneme.core.policy.api import MODE_ANNOTATION
from axoneme.core.policy.engine import PolicyEngine
from axoneme.core.policy.parse import parse_policy_obj

ROOT = Path(__file__).resolve().parents[3]
DEMO = ROOT / "examples" / "demo"

STAGED = f"""apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: y-egress-deny
  namespace: y
  annotations: {{"{MODE_ANNOTATION}": audit}}
spec: {{podSelector: {{}}, policyTypes: [Egress]}}
"""


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_offline_trace_and_matrix_show_staged_effects(capsys: pytest.CaptureFixture[str],
                                                      tmp_path: Path) -> None:
    staged = tmp_path / "staged.yaml"
    staged.write_text(STAGED)
    base = ("--cluster", str(DEMO / "cluster.yaml"), "-f", str(DEMO / "policies"))
    trace = ("policy", "trace", *base, "--from", "y/a", "--to", "x/a", "--port", "80")
    code, plain, _ = run(capsys, *trace)
    assert code == 0 and plain.rstrip().endswith("verdict: ALLOWED") and "audit" not in plain
    code, out, _ = run(capsys, *trace, "-f", str(staged))
    assert code == 0, out
    assert out.rstrip().endswith("verdict: ALLOWED (audit: would be DENIED by NetworkPolicy y/y-egress-deny)")
    assert "audit: would be DENIED by (staged):" in out
    code, out, _ = run(capsys, *trace, "-f", str(staged), "-o", "json")
    doc = json.loads(out)
    assert doc["verdict"] == "allowed"
    assert doc["audit"] == {"verdict": "denied", "by": ["NetworkPolicy y/y-egress-deny"]}
    assert doc["egress"]["audit"]["verdict"] == "denied" and "audit" not in doc["ingress"]
    # matrix: 'A' where the staged policy would deny what is allowed; nothing else changes
    matrix = ("policy", "matrix", *base, "--port", "80")
    _, before, _ = run(capsys, *matrix, "-o", "json")
    _, after, _ = run(capsys, *matrix, "-f", str(staged), "-o", "json")
    b = {(p["from"], p["to"]): p for p in json.loads(before)["probes"]}
    a = {(p["from"], p["to"]): p for p in json.loads(after)["probes"]}
    assert {k: p["verdict"] for k, p in a.items()} == {k: p["verdict"] for k, p in b.items()}
    audited = {k for k, p in a.items() if "audit" in p}
    assert audited and all(k[0].startswith("y/") and k[0] != k[1] and a[k]["verdict"] == "allowed"
                           for k in audited)
    assert a[("y/a", "x/a")]["audit"]["by"] == ["NetworkPolicy y/y-egress-deny"]
    _, table, _ = run(capsys, *matrix, "-f", str(staged))
    assert "'A' allowed but a staged policy would deny" in table
    row = next(line for line in table.splitlines() if line.startswith("y/a"))
    assert "A" in row.split("\t")[1:]


def _engine_with_staged_deny() -> tuple[PolicyEngine, int, int]:
    engine = PolicyEngine()
    ids = []
    for n, app in ((1, "a"), (2, "b")):
        ident = engine.allocator.allocate(Labels.from_strings(
            [f"k8s:app={app}", "k8s:io.kubernetes.pod.namespace=default"]))
        engine.upsert_endpoint(Endpoint(n, ident.id, ident.labels, ipv4=f"10.244.0.{n}"))
        ids.append(ident.id)
    engine.upsert_policy(parse_policy_obj({
        "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "dd", "namespace": "default", "annotations": {MODE_ANNOTATION: "audit"}},
        "spec": {"endpointSelector": {"matchLabels": {"app": "a"}}, "ingress": [{}]}}))
    return engine, ids[0], ids[1]


def test_audit_flow_names_the_staged_policy_and_is_counted() -> None:
    engine, id_a, id_b = _engine_with_staged_deny()
    attr = FlowAttributor(lambda f: f, SimpleNamespace(endpoints={}, endpoint_by_ip=lambda ip: None),
                          engine, "node1")
    flow = Flow(time=1.0, verdict=FlowVerdict.AUDIT, ip_source="10.244.0.2", ip_destination="10.244.0.1",
                source=FlowEndpoint(id_b, "default", "b", (), 0),
                destination=FlowEndpoint(id_a, "default", "a", (), 1),
                traffic_direction="INGRESS", l4={"TCP": {"source_port": 4000, "destination_port": 80}},
                is_reply=False)
    out = attr(flow)
    assert [(p.kind, p.namespace, p.name) for p in out.ingress_denied_by] == [
        ("CiliumNetworkPolicy", "default", "dd")]
    assert "AUDIT would be DROPPED BY dd (CiliumNetworkPolicy)" in out.compact()
    assert out.to_json()["ingress_denied_by"][0]["name"] == "dd"
    metrics = AgentMetrics()
    counter = AuditCounter(metrics)
    counter.observe(out)
    counter.observe(attr(Flow(time=1.0, verdict=FlowVerdict.FORWARDED, ip_source="10.244.0.1",
                              ip_destination="10.244.0.2", source=FlowEndpoint(id_a, id=1),
                              destination=FlowEndpoint(id_b), traffic_direction="EGRESS")))
    text = metrics.render().decode()
    assert ('axoneme_policy_audit_total{direction="INGRESS",policy="CiliumNetworkPolicy default/dd"} 1.0'
            in text), text
    assert text.count("axoneme_policy_audit_total{") == 1


def test_kubernetes_document_keeps_only_our_annotation() -> None:
    obj = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": "dd", "namespace": "x", "uid": "u", "resourceVersion": "7",
                        "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}",
                                        MODE_ANNOTATION: "audit"}},
           "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}, "status": {}}
    doc = policy_document(obj)
    assert doc["metadata"] == {"name": "dd", "namespace": "x", "annotations": {MODE_ANNOTATION: "audit"}}
    assert parse_policy_obj(doc).audit
    # kubectl annotate ... policy.axoneme.io/mode- : enforced
    del obj["metadata"]["annotations"][MODE_ANNOTATION]
    doc = policy_document(obj)
    assert "annotations" not in doc["metadata"] and not parse_policy_obj(doc).audit


def test_document_edits_and_options() -> None:
    docs = [{"file": "f", "index": 0, "obj": {"kind": "NetworkPolicy", "metadata": {"name": "a"}}}]
    original = docs[0]["obj"]
    stage_documents(docs)
    assert docs[0]["obj"]["metadata"]["annotations"] == {MODE_ANNOTATION: "audit"}
    assert "annotations" not in original["metadata"]  # the parsed input is not changed
    obj = docs[0]["obj"]
    assert not set_mode(obj, audit=True) and set_mode(obj, audit=False)
    assert obj["metadata"] == {"name": "a"} and not set_mode(obj, audit=False)
    assert parse_option("policy-audit-mode", "Enabled") and not parse_option("policy-audit-mode", "disabled")
    with pytest.raises(BadRequest, match="unknown endpoint option"):
        parse_option("conntrack", "enabled")
    with pytest.raises(BadRequest, match="expected enabled or disabled"):
        parse_option("policy-audit-mode", "maybe")


def test_cli_refuses_a_bad_endpoint_option(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "endpoint", "config", "3", "policy-audit-mode=sometimes",
                       "--api-socket", "/nonexistent/ax.sock")
    assert code == 2 and "policy-audit-mode=enabled|disabled" in err


def test_config_key_policy_audit_mode(tmp_path: Path) -> None:
    from axoneme.agent.cli._agentconfig import load_config
    from axoneme.core.errors import ConfigError

    conf = tmp_path / "agent.yaml"
    conf.write_text("policy-audit-mode: true\n")
    assert load_config(str(conf)) == {"policy_audit_mode": True}
    conf.write_text("policy_audit_mode: enabled\n")
    with pytest.raises(ConfigError, match="policy_audit_mode: expected true or false"):
        load_config(str(conf))


def test_promote_is_refused_in_kubernetes_mode() -> None:
    """Policies come from the API server there: 409, as apply and delete."""
    import asyncio

    from aiohttp.test_utils import TestClient, TestServer
    from axoneme.agent._api import build_app

    adopted = asyncio.Event()
    adopted.set()
    agent = SimpleNamespace(adopted=adopted, views=None, endpoints=None, policies=None,
                            namespaces=None, pods=None, config=SimpleNamespace(k8s_mode=True, flow_injection=False))

    async def go() -> tuple[int, dict]:
        async with TestClient(TestServer(build_app(agent))) as client:  # type: ignore[arg-type]
            resp = await client.post("/v1/policies/promote", json={"refs": [
                {"kind": "NetworkPolicy", "namespace": "x", "name": "dd"}]})
            return resp.status, await resp.json()

    status, body = asyncio.run(go())
    assert status == 409 and "Kubernetes mode" in body["error"]


def test_promote_names_itself_for_a_bad_kind(capsys: pytest.CaptureFixture[str]) -> None:
    """A bad KIND/NAME is exit 2 naming `policy promote` (the lookup is policy get's)."""
    code, _, err = run(capsys, "policy", "promote", "deployment/web", "--api-socket",
                       "/nonexistent/ax.sock")
    assert code == 2 and err.rstrip().endswith("(policy promote)"), err
    code, _, err = run(capsys, "policy", "get", "deployment/web", "--api-socket", "/nonexistent/ax.sock")
    assert code == 2 and err.rstrip().endswith("(policy get)"), err
