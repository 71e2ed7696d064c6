"""A real OTLP receiver (the OpenTelemetry Collector, built from its Go modules by
scripts/obs-build) receives the agent's spans: CNI ADD with the endpoint and its
identity, and after `policy apply` the regeneration, each endpoint's part naming
the policy, the endpoint and the identity."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _obsproc
import _testnet
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.privileged]

ROOT = Path(__file__).resolve().parents[2]
POLICY_KEY = _obsproc.WEB_POLICY_KEY
ATTR = re.compile(r"^\s*-> ([\w.]+): \w+\((.*)\)$")


@pytest.fixture(scope="module")
def otelcol() -> str:
    """The collector binary (built once; later runs reuse it from the cache)."""
    if shutil.which("go") is None and not os.access("/usr/local/go/bin/go", os.X_OK):
        why = "Go is not installed: scripts/obs-build builds the collector with it"
        print(f"SKIP: {why}")
        pytest.skip(why)
    res = subprocess.run([str(ROOT / "scripts" / "obs-build")], capture_output=True, text=True,
                         timeout=1500)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout.strip().splitlines()[-1]


def spans(log: str) -> list[dict[str, Any]]:
    """The spans the debug exporter printed (verbosity: detailed)."""
    out = []
    for block in re.split(r"^Span #\d+$", log, flags=re.M)[1:]:
        span: dict[str, Any] = {"attributes": {}}
        for line in block.splitlines():
            if line.startswith(("ResourceSpans", "ScopeSpans", "\t{")):
                break
            m = re.match(r"^\s+(Trace ID|Parent ID|ID|Name)\s+: ?(.*)$", line)
            if m:
                span[m.group(1)] = m.group(2).strip()
            elif a := ATTR.match(line):
                span["attributes"][a.group(1)] = a.group(2)
        out.append(span)
    return out


@dataclass
class Collector:
    port: int
    log: Path

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spans(self) -> list[dict[str, Any]]:
        return spans(self.log.read_text())

    def received(self, name: str, **attrs: str) -> dict[str, Any] | None:
        """The first span ``name`` with these attribute values (as printed)."""
        return next((s for s in self.spans() if s.get("Name") == name and all(
            s["attributes"].get(k) == v for k, v in attrs.items())), None)

    def tail(self) -> str:
        return self.log.read_text()[-4000:]


@pytest.fixture
def collector(otelcol: str, tmp_path: Path) -> Iterator[Collector]:
    """A running collector: OTLP/HTTP on a free loopback port, spans printed to its log."""
    port = _obsproc.free_port()
    config = tmp_path / "otelcol.yaml"
    config.write_text(
        "receivers:\n  otlp:\n    protocols:\n"
        f"      http: {{endpoint: '127.0.0.1:{port}'}}\n"
        "exporters:\n  debug: {verbosity: detailed}\n"
        "service:\n  telemetry: {metrics: {level: none}}\n"
        "  pipelines:\n    traces: {receivers: [otlp], exporters: [debug]}\n")
    log = tmp_path / "otelcol.log"
    with _obsproc.daemon([otelcol, f"--config=file:{config}"], log, port):
        yield Collector(port, log)


def test_collector_receives_cni_and_regeneration_spans(agent_factory: Any, collector: Collector,
                                                       tmp_path: Path) -> None:
    ap = agent_factory("noop", extra_args=["--otlp-endpoint", collector.endpoint])
    ap.pod_run("web", "sleep", "infinity", labels="app=web")
    web = next(e for e in ap.json("endpoint", "list") if e["pod"] == "default/web")
    policy = tmp_path / "policy.yaml"
    policy.write_text(_obsproc.WEB_POLICY)
    ap.cli("policy", "apply", "-f", str(policy), check=True)

    want = {"axoneme.endpoint": str(web["id"]), "axoneme.identity": str(web["identity"])}
    cni = _testnet.poll(lambda: collector.received("cni.add", **want), 20)
    assert cni and cni["attributes"]["axoneme.pod"] == "default/web", collector.tail()

    ep = _testnet.poll(lambda: collector.received("endpoint.regeneration", **want,
                                                  **{"axoneme.policy": POLICY_KEY}), 20)
    assert ep, collector.tail()
    assert ep["attributes"]["axoneme.outcome"] == "success"
    by_id = {s["ID"]: s for s in collector.spans()}
    regen = by_id[ep["Parent ID"]]
    assert regen["Name"] == "policy.regeneration"
    assert regen["attributes"]["axoneme.policy"] == POLICY_KEY
    apply = by_id[regen["Parent ID"]]
    assert apply["Name"] == "policy.apply" and apply["Trace ID"] == ep["Trace ID"]
    assert apply["attributes"]["axoneme.source"] == "api"

    ap.cli("pod", "delete", "web", check=True)
    gone = _testnet.poll(lambda: collector.received("cni.del", **want), 20)
    assert gone and gone["attributes"]["axoneme.deleted"] == "true", collector.tail()
    assert ap.stop() == 0  # the exporter flushes and stops with the agent


L7_POLICY = """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web-public, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: friend}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules: {http: [{method: GET, path: /public}]}
"""


def test_l7_decisions_are_counted_and_traced(agent_factory: Any, datapath_probe: Any,
                                              collector: Collector, tmp_path: Path) -> None:
    """Through the HTTP proxy: cilium_policy_l7_total counts the requests by verdict
    on /metrics, and each decision (sampling 1.0) is an l7.decision span."""
    reason = datapath_probe("ebpf")
    if reason is not None:
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    conf = tmp_path / "agent.yaml"
    conf.write_text("otlp_l7_sample_ratio: 1.0\n")
    metrics_port = _obsproc.free_port()
    with _testnet.kernel_agent_lock():  # the proxy ports and TPROXY rule are node-global
        ap = agent_factory("ebpf", extra_args=[
            "--config", str(conf), "--otlp-endpoint", collector.endpoint,
            "--prometheus-serve-addr", f"127.0.0.1:{metrics_port}"])
        web = ap.pod_run("web", "python3", *_testnet.http_server_argv("0.0.0.0", 80, echo=True),
                         labels="app=web")
        ap.pod_run("friend", "sleep", "infinity", labels="app=friend")
        policy = tmp_path / "l7.yaml"
        policy.write_text(L7_POLICY)
        ap.cli("policy", "apply", "-f", str(policy), check=True)

        def code(path: str) -> str:
            return ap.pod_exec("friend", "curl", "-s", "-m", "3", "-o", "/dev/null", "-w",
                               "%{http_code}", f"http://{web}{path}").stdout.strip()

        assert _testnet.poll(lambda: code("/public") == "200", 20), ap.log()
        assert code("/private") == "403"

        def l7(rule: str) -> float:
            text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                          timeout=5).read().decode()
            m = re.search(rf'^cilium_policy_l7_total{{proxy_type="http",rule="{rule}"}} (\S+)$',
                          text, re.M)
            return float(m.group(1)) if m else 0.0

        assert _testnet.poll(lambda: l7("denied") >= 1 and l7("forwarded") >= 1, 10), ap.log()
        assert l7("received") >= l7("denied") + l7("forwarded")
        web_ep = next(e for e in ap.json("endpoint", "list") if e["pod"] == "default/web")
        denied = _testnet.poll(lambda: collector.received(
            "l7.decision", **{"axoneme.verdict": "DROPPED", "axoneme.protocol": "http",
                              "axoneme.endpoint": str(web_ep["id"])}), 20)
        assert denied, collector.tail()
        assert denied["attributes"]["axoneme.identity"] == str(web_ep["identity"])
        assert denied["attributes"]["axoneme.direction"] == "INGRESS"
        allowed = _testnet.poll(lambda: collector.received(
            "l7.decision", **{"axoneme.verdict": "FORWARDED",
                              "axoneme.endpoint": str(web_ep["id"])}), 20)
        assert allowed, collector.tail()
        # the policy whose L7 rule allowed it (Hubble's ingress_allowed_by)
        assert allowed["attributes"]["axoneme.policy"] == "CiliumNetworkPolicy/default/web-public"
