"""Flows (observe, inject, follow), metrics and the --policy-dir watcher through a live agent."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import _testnet
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.privileged]


def _flow(src_ip: str, dst_ip: str, verdict: str = "DROPPED", port: int = 80) -> dict[str, Any]:
    flow: dict[str, Any] = {
        "verdict": verdict, "traffic_direction": "INGRESS",
        "IP": {"source": src_ip, "destination": dst_ip, "ipVersion": "IPv4"},
        "l4": {"TCP": {"source_port": 41000, "destination_port": port, "flags": {"SYN": True}}},
        "source": {"identity": 0}, "destination": {"identity": 0},
    }
    if verdict == "DROPPED":
        flow["drop_reason_desc"] = "POLICY_DENIED"
    return flow


def _wait(pred: Any, timeout: float = 10.0) -> Any:
    return _testnet.poll(pred, timeout)


def test_flow_injection_is_off_by_default(agent: Any) -> None:
    """Any client of the socket could forge the audit trail: POST /v1/flows is refused."""
    a = agent.pod_run("fa", "sleep", "infinity", labels="app=fa")
    api = agent.api()
    from axoneme.agent.client import AgentError

    with pytest.raises(AgentError) as err:
        api.post("/v1/flows", [_flow(a, a)])
    assert err.value.status in (404, 405)
    out = agent.cli("observe", "-o", "json", "--last", "10", "--verdict", "DROPPED", check=True)
    assert not any(json.loads(x).get("l4", {}).get("TCP", {}).get("source_port") == 41000
                   for x in out.stdout.splitlines())


@pytest.fixture
def injecting_agent(agent_factory: Any, datapath_name: str, tmp_path: Path) -> Any:
    """An agent whose config turns flow injection on (the test hook for `observe`)."""
    conf = tmp_path / "agent.yaml"
    conf.write_text("flow_injection: true\n")
    return agent_factory(datapath_name, extra_args=["--config", str(conf)])


def test_observe_filters_enrichment_follow_and_metrics(injecting_agent: Any) -> None:
    agent = injecting_agent
    a = agent.pod_run("fa", "sleep", "infinity", labels="app=fa")
    b = agent.pod_run("fb", "sleep", "infinity", labels="app=fb")
    api = agent.api()
    api.post("/v1/flows", [_flow(a, b), _flow(b, a, "FORWARDED", 443)])

    lines = agent.cli("observe", "-o", "json", "--last", "10", check=True).stdout.splitlines()
    flows = [json.loads(line) for line in lines]
    assert len(flows) >= 2
    dropped = [f for f in flows if f["verdict"] == "DROPPED"]
    assert dropped and dropped[-1]["source"]["pod_name"] == "fa"
    assert dropped[-1]["destination"]["namespace"] == "default"
    assert "k8s:app=fb" in dropped[-1]["destination"]["labels"]
    assert dropped[-1]["source"]["identity"] != 0  # enriched from the endpoint table
    assert dropped[-1]["drop_reason_desc"] == "POLICY_DENIED"

    only = agent.cli("observe", "-o", "json", "--verdict", "DROPPED", check=True).stdout
    assert all(json.loads(x)["verdict"] == "DROPPED" for x in only.splitlines())
    assert agent.cli("observe", "--from-pod", "default/fb", "--port", "443", "-o", "json",
                     check=True).stdout.count("\n") == 1
    assert agent.cli("observe", "--to-pod", "default/fa", "--verdict", "DROPPED",
                     check=True).stdout == ""
    compact = agent.cli("observe", "--pod", "default/fa", "--verdict", "DROPPED", check=True).stdout
    assert "default/fa:41000" in compact and "default/fb:80" in compact and "DROPPED" in compact
    pb = json.loads(agent.cli("observe", "-o", "jsonpb", "--last", "1", check=True).stdout)
    assert "flow" in pb and "node_name" in pb

    # follow: a flow posted after the subscription arrives on the stream
    follow = subprocess.Popen(["axoneme", "observe", "-f", "--last", "0", "-o", "json",
                               "--port", "8443"], stdout=subprocess.PIPE, text=True,
                              env=agent.env())
    try:
        time.sleep(1.0)
        api.post("/v1/flows", _flow(a, b, "FORWARDED", 8443))
        line = follow.stdout.readline() if follow.stdout else ""
        assert json.loads(line)["l4"]["TCP"]["destination_port"] == 8443
    finally:
        follow.kill()
        follow.wait(10)

    metrics = api.get("/metrics")
    assert 'axoneme_drop_count_total{direction="INGRESS",reason="POLICY_DENIED"}' in metrics
    assert "axoneme_endpoints 2.0" in metrics
    assert "axoneme_policy_regeneration_seconds_count" in metrics


def test_policy_dir_follows_files_and_keeps_last_good_version(agent_factory: Any,
                                                              tmp_path: Path) -> None:
    pdir = tmp_path / "policies"
    pdir.mkdir()
    first = pdir / "10-web.yaml"
    first.write_text("""apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress: [{fromEndpoints: [{matchLabels: {app: client}}]}]
""")
    ap = agent_factory("noop", extra_args=["--policy-dir", str(pdir)])
    assert [p["name"] for p in ap.json("policy", "list")] == ["web"]
    assert ap.json("policy", "list")[0]["source"] == str(first)

    second = pdir / "20-db.yaml"
    second.write_text("""apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db}
spec:
  podSelector: {matchLabels: {app: db}}
  policyTypes: [Ingress]
""")
    assert _wait(lambda: {p["name"] for p in ap.json("policy", "list")} == {"web", "db"})

    # an invalid edit: logged with its problems, the previous version stays
    rev = ap.json("status")["policy_revision"]
    second.write_text("""apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress: [{ports: [{port: 70000}]}]
""")
    status = _wait(lambda: (s := ap.json("status"))["components"]["policies"]["errors"] and s)
    assert str(second) in status["components"]["policies"]["errors"]
    assert {p["name"] for p in ap.json("policy", "list")} == {"web", "db"}
    assert status["policy_revision"] == rev
    assert "70000" in ap.log() or "port" in ap.log()

    # removing the file removes its policies
    second.unlink()
    assert _wait(lambda: [p["name"] for p in ap.json("policy", "list")] == ["web"])
