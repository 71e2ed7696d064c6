"""`axoneme policy trace` / `policy matrix`: output shapes, human tables, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from axoneme.agent.cli import main

ROOT = Path(__file__).resolve().parents[3]
DEMO = ROOT / "examples" / "demo"


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_demo_matrix_json_and_table(capsys: pytest.CaptureFixture[str]) -> None:
    base = ("policy", "matrix", "--cluster", str(DEMO / "cluster.yaml"), "-f", str(DEMO / "policies"))
    code, out, _ = run(capsys, *base, "--port", "80", "--port", "81/UDP", "-o", "json")
    assert code == 0
    probes = json.loads(out)["probes"]
    pods = {p["from"] for p in probes}
    assert len(probes) == 2 * len(pods) ** 2
    assert set(probes[0]) == {"from", "to", "port", "protocol", "verdict"}
    by = {(p["from"], p["to"], p["port"], p["protocol"]): p["verdict"] for p in probes}
    assert by[("x/b", "x/a", 80, "TCP")] == "denied"
    assert by[("y/a", "x/a", 80, "TCP")] == "allowed"
    assert by[("y/c", "x/a", 80, "TCP")] == "denied"  # the CNP deny beats the NP allow
    assert by[("x/a", "x/a", 80, "TCP")] == "allowed"
    code, out, _ = run(capsys, *base, "--port", "80")
    assert code == 0
    assert out.startswith("Port 80/TCP:")
    row = next(line for line in out.splitlines() if line.startswith("x/b"))
    header = next(line for line in out.splitlines() if line.startswith("-"))
    cols = [c.strip() for c in header.split("\t")]
    cells = [c.strip() for c in row.split("\t")]
    assert cells[cols.index("x/a")] == "X" and cells[cols.index("x/b")] == "."


def test_demo_trace_human(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "policy", "trace", "--cluster", str(DEMO / "cluster.yaml"), "-f",
                       str(DEMO / "policies"), "--from", "x/b", "--to", "x/a", "--port", "80")
    assert code == 0
    assert "ingress to x/a: denied" in out and "default deny: no rule allows" in out
    assert "no policy selects x/b for egress: allowed by default" in out
    assert out.rstrip().endswith("verdict: DENIED")


def test_trace_named_port_and_ip(capsys: pytest.CaptureFixture[str]) -> None:
    base = ("policy", "trace", "--cluster", str(DEMO / "cluster.yaml"), "-f", str(DEMO / "policies"), "-o", "json")
    code, out, _ = run(capsys, *base, "--from", "10.244.1.4", "--to", "x/a", "--port", "serve-80-tcp")
    assert code == 0  # 10.244.1.4 is y/a
    assert json.loads(out)["verdict"] == "allowed"
    assert json.loads(out)["ingress"]["rules"] == ["NetworkPolicy x/a-from-namespace-y spec.ingress[0]"]


@pytest.mark.parametrize("args,message", [
    (("--from", "x/nope", "--to", "x/a", "--port", "80"), "unknown pod 'x/nope'"),
    (("--from", "x/a", "--to", "x/b", "--port", "http"), "has no port named 'http'"),
    (("--from", "x/a", "--to", "x/b", "--port", "80/ICMP"), "bad protocol"),
    (("--from", "x/a", "--to", "x/b", "--port", "0"), "bad port"),
    (("--from", "x/a", "--to", "x/b"), "exactly one of --port and --icmp-type"),
    (("--from", "entity:moon", "--to", "x/b", "--port", "80"), "unknown entity"),
    (("--from", "x/a", "--to", "x/b", "--icmp-type", "Bogus"), "bad ICMP type"),
])
def test_trace_bad_input_exit_2(capsys: pytest.CaptureFixture[str], args: tuple[str, ...], message: str) -> None:
    code, _, err = run(capsys, "policy", "trace", "--cluster", str(DEMO / "cluster.yaml"),
                       "-f", str(DEMO / "policies"), *args)
    assert code == 2
    assert err.startswith("error: ") and message in err


def test_matrix_bad_cluster_and_port(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "c.yaml"
    bad.write_text("kind: Pod\nmetadata: {}\n")
    code, _, err = run(capsys, "policy", "matrix", "--cluster", str(bad), "--port", "80")
    assert code == 2 and "metadata" in err and str(bad) in err
    code, _, err = run(capsys, "policy", "matrix", "--cluster", str(DEMO / "cluster.yaml"), "--port", "x/y/z")
    assert code == 2 and "bad" in err
    code, _, err = run(capsys, "policy", "matrix", "--cluster", str(DEMO / "cluster.yaml"),
                       "-f", str(tmp_path / "missing.yaml"), "--port", "80")
    assert code == 2


def test_matrix_named_port_missing_on_some_pods(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "policy", "matrix", "--cluster", str(DEMO / "cluster.yaml"), "--port", "http", "-o", "json")
    assert code == 0
    probes = json.loads(out)["probes"]
    assert probes and {p["to"] for p in probes} == {"default/app1"}
    assert {p["port"] for p in probes} == {80}


def test_live_example_policies_offline(capsys: pytest.CaptureFixture[str]) -> None:
    live = ROOT / "examples" / "live"
    base = ("policy", "trace", "--cluster", str(DEMO / "cluster.yaml"), "-f", str(live / "00-default-deny.yaml"),
            "-f", str(live / "10-allow-app2.yaml"), "--to", "default/app1", "--port", "80", "-o", "json")
    code, out, _ = run(capsys, *base, "--from", "default/app2")
    assert code == 0 and json.loads(out)["verdict"] == "allowed"
    code, out, _ = run(capsys, *base, "--from", "default/app3")
    assert code == 0 and json.loads(out)["verdict"] == "denied"
    l7 = ("policy", "trace", "--cluster", str(DEMO / "cluster.yaml"), "-f", str(live / "20-l7-public-only.yaml"),
          "--from", "default/app2", "--to", "default/app1", "--port", "80", "-o", "json")
    code, out, _ = run(capsys, *l7)
    assert code == 0 and json.loads(out)["verdict"] == "redirected"


@pytest.mark.parametrize(("path", "verdict", "says"), [
    ("/public", "ALLOWED", "matched HTTP rule 0"),
    # the proxy normalises before matching: this is /public to the rules
    ("/x/%2e%2e/public", "ALLOWED", "matched HTTP rule 0"),
    # the proxy answers 400 before any rule: trace says so (before: the raw
    # path was matched against the rules, as if the proxy forwarded it)
    ("/public/..;/admin", "DENIED", "the proxy refuses request target '/public/..;/admin' (400 "),
    ("/public/%e0%80%ae", "DENIED", "the proxy refuses request target"),
])
def test_trace_http_path_as_the_proxy_sees_it(capsys: pytest.CaptureFixture[str], path: str,
                                               verdict: str, says: str) -> None:
    code, out, _ = run(capsys, "policy", "trace", "--cluster", str(DEMO / "cluster.yaml"), "-f",
                       str(DEMO / "policies"), "--from", "default/app2", "--to", "default/app1",
                       "--port", "80", "--http-path", path)
    assert code == 0
    assert says in out, out
    assert out.rstrip().endswith(f"verdict: {verdict}"), out
