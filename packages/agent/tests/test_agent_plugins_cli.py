"""`axoneme plugins` (per plugin: distribution, version, entry point, loads, capabilities;
exit 1 when one fails to load) and `policy trace --l7 KEY=VALUE` through the CLI."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
from axoneme.agent.cli import main
from axoneme.core import plugins
from axoneme.core.plugins import GROUP_L7, Registry


@dataclass
class Dist:
    name: str
    version: str


@dataclass
class FakeEP:
    name: str
    value: str
    dist: Dist

    def load(self) -> Any:
        raise ModuleNotFoundError("No module named 'thirdparty'")


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_plugins_lists_every_kind_with_details(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "plugins", "-o", "json")
    assert code == 0
    data = json.loads(out)
    assert {"datapath", "l7", "plugins", "details"} <= set(data)
    assert data["l7"]["http"] == "axoneme.l7.http:HttpParser"  # the existing shape stays
    by = {(d["kind"], d["name"]): d for d in data["details"]}
    http = by[("l7", "http")]
    assert http["distribution"] == "axoneme-l7-http" and http["loads"] and http["error"] is None
    assert http["entry_point"] == "axoneme.l7.http:HttpParser" and http["version"]
    assert {"proxy", "rules:http", "transport:tcp"} <= set(http["capabilities"])
    from axoneme.l7.http._native import engine_binary  # what l7_http_engine: auto runs

    assert f"proxy-engine:{'native' if engine_binary() else 'python'}" in http["capabilities"]
    assert "fqdn" in by[("l7", "dns")]["capabilities"]
    assert by[("datapath", "noop")]["distribution"] == "axoneme-core"


def test_plugins_exits_1_when_one_fails_to_load(capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def source(group: str) -> list[Any]:
        eps: list[Any] = list(entry_points(group=group))
        if group == GROUP_L7:
            eps.append(FakeEP("broken", "thirdparty:Parser", Dist("thirdparty-l7", "0.3")))
        return eps

    monkeypatch.setattr(plugins, "_REGISTRY", Registry(source=source))
    code, out, err = run(capsys, "plugins", "-o", "json")
    assert code == 1
    (bad,) = [d for d in json.loads(out)["details"] if d["name"] == "broken"]
    assert bad["loads"] is False and "No module named 'thirdparty'" in bad["error"]
    assert bad["distribution"] == "thirdparty-l7" and bad["version"] == "0.3"
    assert "'broken'" in err
    code, out, _ = run(capsys, "plugins")
    assert code == 1 and "broken" in out and "NO" in out


POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: cli}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules: {http: [{method: GET, path: /public}]}
"""
CLUSTER = """\
kind: Pod
metadata: {name: web, namespace: default, labels: {app: web}}
---
kind: Pod
metadata: {name: cli, namespace: default, labels: {app: cli}}
"""


def test_trace_l7_inputs(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(POLICY)
    (tmp_path / "c.yaml").write_text(CLUSTER)
    base = ("policy", "trace", "--cluster", str(tmp_path / "c.yaml"), "-f", str(tmp_path / "p.yaml"),
            "--from", "cli", "--to", "web", "--port", "80", "-o", "json")

    def verdict(*extra: str) -> str:
        code, out, err = run(capsys, *base, *extra)
        assert code == 0, err
        return str(json.loads(out)["verdict"])

    assert verdict("--l7", "method=GET", "--l7", "path=/public") == "allowed"
    assert verdict("--l7", "method=GET", "--l7", "path=/private") == "denied"
    # the shorthand and --l7 give the same answer; the shorthand wins over --l7
    assert verdict("--http-method", "GET", "--http-path", "/public") == "allowed"
    assert verdict("--l7", "method=PUT", "--http-method", "GET", "--l7", "path=/public") == "allowed"
    code, _, err = run(capsys, *base, "--l7", "verb=GET")
    assert code == 2 and "'verb'" in err and "method" in err
    code, _, err = run(capsys, *base, "--l7", "novalue")
    assert code == 2 and "KEY=VALUE" in err
