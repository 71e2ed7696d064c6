"""Fail-open paths through a real agent process (issue 13, item 5)."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.privileged]

BAD = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
       "metadata": {"name": "deny-all", "namespace": "default"},
       "spec": {"endpointSelector": {},
                "ingress": [{"toPorts": [{"ports": [{"port": "99999"}]}]}]}}


def test_persisted_policy_that_no_longer_parses_stops_the_start(agent_factory: Any) -> None:
    ap = agent_factory("noop", start=False)
    ap.state_dir.mkdir(parents=True)
    state = ap.state_dir / "state.json"
    state.write_text(json.dumps({"version": 1, "policy_revision": 1, "policies": {
        "CiliumNetworkPolicy/default/deny-all": {
            "doc": {"file": "<api>", "index": 0, "obj": BAD}, "source": "api",
            "revision": 1}}}))
    before = state.read_bytes()
    res = subprocess.run(ap.command(), capture_output=True, text=True, env=ap.env(), timeout=60)
    assert res.returncode == 1, res.stderr
    assert ("persisted policy CiliumNetworkPolicy/default/deny-all no longer parses: "
            "spec.ingress[0].toPorts[0].ports[0].port") in res.stderr
    assert "--drop-unparseable-policies" in res.stderr
    assert "Traceback" not in res.stderr
    assert state.read_bytes() == before  # the policy is still there to be fixed
    assert not ap.socket.exists()

    # the way out: drop it loudly, see it in status, the document kept
    ap.extra_args = ("--drop-unparseable-policies",)
    ap.start()
    status = ap.json("status")
    dropped = status["components"]["policies"]["dropped_at_start"]
    assert [d["policy"] for d in dropped] == ["CiliumNetworkPolicy/default/deny-all"]
    assert "ports[0].port" in dropped[0]["problem"]
    kept = json.loads((ap.state_dir / "dropped-policies.json").read_text())
    assert kept["CiliumNetworkPolicy/default/deny-all"]["record"]["doc"]["obj"] == BAD
    assert "dropped" in ap.log().lower() and "deny-all" in ap.log()


SERVER = ("import http.server, socketserver\n"
          "socketserver.ThreadingTCPServer.allow_reuse_address = True\n"
          "socketserver.ThreadingTCPServer(('', 80), http.server.SimpleHTTPRequestHandler)"
          ".serve_forever()\n")


def _policy(ports: list[int]) -> str:
    items = "".join(f"        - port: \"{p}\"\n          protocol: TCP\n" for p in ports)
    return ("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\n"
            "metadata:\n  name: web-in\n  namespace: default\n"
            "spec:\n  endpointSelector:\n    matchLabels:\n      app: web\n"
            "  ingress:\n  - fromEndpoints:\n    - matchLabels:\n        app: client\n"
            f"    toPorts:\n    - ports:\n{items}")


def _code(agent: Any, ip: str) -> str:
    res = agent.pod_exec("client", "curl", "-s", "-m", "2", "-o", "/dev/null", "-w",
                         "%{http_code}", f"http://{ip}/")
    return res.stdout.strip()


def _until(fn: Any, want: str, tries: int = 15) -> str:
    got = fn()
    for _ in range(tries):
        if got == want:
            break
        got = fn()
    return got


def test_policy_map_full_fails_closed_on_ebpf(agent_factory: Any, datapath_probe: Any,
                                              tmp_path: Any) -> None:
    """--policy-map-max 8 and a policy that needs more: the traffic the old
    policy allowed is dropped (not left to the older policy), status and the
    drop flow say why; a policy that fits restores service."""
    reason = datapath_probe("ebpf")
    if reason is not None:
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    ap = agent_factory("ebpf", extra_args=["--policy-map-max", "8"])
    web = ap.pod_run("web", "python3", "-c", SERVER, labels="app=web")
    ap.pod_run("client", "sleep", "infinity", labels="app=client")
    small, big = tmp_path / "small.yaml", tmp_path / "big.yaml"
    small.write_text(_policy([80]))
    big.write_text(_policy([80, *range(8000, 8012)]))
    ap.cli("policy", "apply", "-f", str(small), check=True)
    assert _until(lambda: _code(ap, web), "200") == "200", ap.log()

    ap.cli("policy", "apply", "-f", str(big), check=True)
    assert _code(ap, web) != "200"  # port 80 is still allowed by it, but it does not fit
    eps = {e["pod"]: e for e in ap.json("endpoint", "list")}
    assert eps["default/web"]["status"].startswith("not-ready: policy map full"), eps
    assert "failing closed (ingress)" in eps["default/web"]["status"]
    fc = ap.json("status")["components"]["fail_closed"]
    assert [(f["endpoint"], f["directions"]) for f in fc] == [(eps["default/web"]["id"],
                                                               ["ingress"])]
    flows = [json.loads(line) for line in
             ap.cli("observe", "--last", "200", "-o", "json", check=True).stdout.splitlines()
             if line.startswith("{")]
    assert any(f.get("drop_reason_desc") == "DROP_EP_NOT_READY"
               and f.get("IP", {}).get("destination") == web for f in flows), flows[-5:]

    ap.cli("policy", "apply", "-f", str(small), check=True)  # fits again
    assert _until(lambda: _code(ap, web), "200") == "200", ap.log()
    assert ap.json("status")["components"]["fail_closed"] == []
    eps = {e["pod"]: e for e in ap.json("endpoint", "list")}
    assert eps["default/web"]["status"] == "ready"
