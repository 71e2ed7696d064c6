"""A real OTLP receiver (the OpenTelemetry Collector, built from its Go modules by
scripts/obs-build) receives the agent's spans: CNI ADD with the endpoint and its
identity, and after `policy apply` the regeneration, each endpoint's part naming
the policy, the endpoint and the identity."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
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


def test_collector_receives_cni_and_regeneration_spans(agent_factory: Any, otelcol: str,
                                                       tmp_path: Path) -> None:
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
        ap = agent_factory("noop", extra_args=["--otlp-endpoint", f"http://127.0.0.1:{port}"])
        ap.pod_run("web", "sleep", "infinity", labels="app=web")
        web = next(e for e in ap.json("endpoint", "list") if e["pod"] == "default/web")
        policy = tmp_path / "policy.yaml"
        policy.write_text(_obsproc.WEB_POLICY)
        ap.cli("policy", "apply", "-f", str(policy), check=True)

        def received(name: str, **attrs: str) -> dict[str, Any] | None:
            return next((s for s in spans(log.read_text()) if s.get("Name") == name and all(
                s["attributes"].get(k) == v for k, v in attrs.items())), None)

        want = {"axoneme.endpoint": str(web["id"]), "axoneme.identity": str(web["identity"])}
        cni = _testnet.poll(lambda: received("cni.add", **want), 20)
        assert cni and cni["attributes"]["axoneme.pod"] == "default/web", log.read_text()[-4000:]

        ep = _testnet.poll(lambda: received("endpoint.regeneration", **want,
                                            **{"axoneme.policy": POLICY_KEY}), 20)
        assert ep, log.read_text()[-4000:]
        assert ep["attributes"]["axoneme.outcome"] == "success"
        by_id = {s["ID"]: s for s in spans(log.read_text())}
        regen = by_id[ep["Parent ID"]]
        assert regen["Name"] == "policy.regeneration"
        assert regen["attributes"]["axoneme.policy"] == POLICY_KEY
        apply = by_id[regen["Parent ID"]]
        assert apply["Name"] == "policy.apply" and apply["Trace ID"] == ep["Trace ID"]
        assert apply["attributes"]["axoneme.source"] == "api"
    assert ap.stop() == 0  # the exporter flushes and stops with the agent
