"""Audit and staged policies with a live agent, real pods and traffic (issue 19), on
eBPF and both iptables modes.

1. A default deny applied with `policy apply --audit` (staged): client -> web still
   connects; the flow is AUDIT, names the policy ("would be DROPPED BY
   default-deny") in `observe`, and axoneme_policy_audit_total counts it.
2. `policy promote` enforces it: the same connection is dropped.
3. Per-endpoint audit mode (`endpoint config ID policy-audit-mode=enabled`) on both
   pods: the enforced deny drops nothing again, reported AUDIT, also after an agent
   restart; disabled: dropped.
4. Agent-wide `--policy-audit-mode` (restart): the same.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import _testnet  # tests/ is on sys.path (tests/conftest.py)
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.privileged]

DENY = """apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny, namespace: shop}
spec: {podSelector: {}, policyTypes: [Ingress, Egress]}
"""


def _curl(agent: Any, url: str) -> subprocess.CompletedProcess[str]:
    return agent.pod_exec("client", "curl", "-s", "-m", "2", "-o", "/dev/null", "-w", "%{http_code}",
                          url, namespace="shop")


def _reaches(agent: Any, url: str) -> bool:
    return bool(_testnet.poll(lambda: _curl(agent, url).stdout == "200", timeout=10))


def _flows(agent: Any, *args: str) -> list[dict[str, Any]]:
    out = agent.cli("observe", "--last", "2000", "-n", "shop", *args, "-o", "json", check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def _audited(agent: Any, port: int, since: str) -> list[dict[str, Any]]:
    """AUDIT flows client -> web:port after ``since`` (an RFC 3339 time)."""
    return [f for f in _flows(agent, "--verdict", "AUDIT", "--since", since)
            if f.get("source", {}).get("pod_name") == "client"
            and f.get("l4", {}).get("TCP", {}).get("destination_port") == port]


def _now(agent: Any) -> str:
    import datetime as dt

    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


@pytest.mark.parametrize("datapath,mode", [("ebpf", ""), ("iptables", "plain"), ("iptables", "ipset")])
def test_audited_deny_drops_nothing_and_is_reported(agent_factory: Any, datapath_probe: Any,
                                                    tmp_path: Path, datapath: str, mode: str) -> None:
    reason = datapath_probe(datapath, mode) if mode else datapath_probe(datapath)
    if reason is not None:
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    ap = agent_factory(datapath, extra_args=["--iptables-mode", mode] if mode else [])
    (tmp_path / "index.html").write_text("ok\n")
    ap.cli("namespace", "create", "shop", check=True)
    web = ap.pod_run("web", "python3", *_testnet.http_server_argv("0.0.0.0", 80, str(tmp_path)),
                     namespace="shop", labels="app=web")
    ap.pod_run("client", "sleep", "infinity", namespace="shop", labels="app=client")
    url = f"http://{web}/"
    assert _reaches(ap, url), ap.log()

    # 1. staged: nothing dropped, the flow says what it would have been
    deny = tmp_path / "deny.yaml"
    deny.write_text(DENY)
    since = _now(ap)
    ap.cli("policy", "apply", "--audit", "-f", str(deny), check=True)
    [pol] = ap.json("policy", "list")
    assert pol["name"] == "default-deny" and pol["mode"] == "audit"
    for _ in range(3):
        assert _curl(ap, url).stdout == "200", ap.log()
    flows = _testnet.poll(lambda: _audited(ap, 80, since), timeout=10)
    assert flows, _flows(ap, "--since", since)
    f = flows[0]
    assert f["verdict"] == "AUDIT" and "drop_reason" not in f
    assert any(p["name"] == "default-deny" and p["namespace"] == "shop"
               for p in f.get("egress_denied_by", []) + f.get("ingress_denied_by", [])), f
    compact = ap.cli("observe", "--last", "2000", "-n", "shop", "--verdict", "AUDIT",
                     "--since", since, check=True).stdout
    assert "AUDIT would be DROPPED BY default-deny (NetworkPolicy)" in compact, compact
    assert not [x for x in _flows(ap, "--verdict", "DROPPED", "--since", since)
                if x.get("source", {}).get("pod_name") == "client"]
    metrics = ap.api().get("/metrics")
    assert 'axoneme_policy_audit_total{direction="EGRESS",policy="NetworkPolicy shop/default-deny"}' \
        in metrics, metrics

    # 2. promote: enforced, dropped
    out = ap.cli("policy", "promote", "default-deny", "-n", "shop", check=True).stdout
    assert "NetworkPolicy shop/default-deny promoted" in out
    assert ap.json("policy", "list")[0]["mode"] == "enforce"
    assert _curl(ap, url).stdout != "200"
    assert "already enforced" in ap.cli("policy", "promote", "default-deny", "-n", "shop",
                                        check=True).stdout

    # 3. per-endpoint audit mode: forwarded again, reported AUDIT
    eps = {e["pod"]: e["id"] for e in ap.json("endpoint", "list") if e.get("pod")}
    ids = [str(eps[k]) for k in eps if k.endswith("client") or k.endswith("web")]
    assert len(ids) == 2, eps
    since = _now(ap)
    for ep_id in ids:
        res = ap.json("endpoint", "config", ep_id, "policy-audit-mode=enabled")
        assert res["policy-audit-mode"] == "enabled"
    assert _reaches(ap, url), ap.log()
    assert _testnet.poll(lambda: _audited(ap, 80, since), timeout=10)
    assert {str(e["id"]) for e in ap.json("endpoint", "list") if e["policy_audit_mode"]} == set(ids)
    ap.restart()  # the setting is kept in the endpoint's record
    assert all(ap.json("endpoint", "config", i)["policy-audit-mode"] == "enabled" for i in ids)
    assert _reaches(ap, url), ap.log()
    bad = ap.cli("endpoint", "config", ids[0], "policy-audit-mode=maybe")
    assert bad.returncode == 2 and "policy-audit-mode=enabled|disabled" in bad.stderr
    for ep_id in ids:
        ap.cli("endpoint", "config", ep_id, "policy-audit-mode=disabled", check=True)
    assert _curl(ap, url).stdout != "200"

    # 4. agent-wide audit mode (restart: the endpoints are adopted)
    ap.extra_args = [*ap.extra_args, "--policy-audit-mode"]
    ap.restart()
    since = _now(ap)
    assert _reaches(ap, url), ap.log()
    assert _testnet.poll(lambda: _audited(ap, 80, since), timeout=10)
