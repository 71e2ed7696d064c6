"""The seed demo end to end: three pods, HTTP between them, restart after SIGKILL."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import _testnet  # tests/ is on sys.path (tests/conftest.py)
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.privileged]

LIVE = Path(__file__).resolve().parents[2] / "examples" / "live"
# datapaths documented to compute policy but enforce nothing (DESIGN.md: noop). What a
# test expects comes from here, never from the agent's own status: a broken datapath
# that reported "no enforcement" would otherwise pass every enforcement test.
NON_ENFORCING = {"noop"}


def _http_server(www: Any) -> list[str]:
    """The pod command of the demo's web server (no reverse lookup before it listens)."""
    return ["python3", *_testnet.http_server_argv("0.0.0.0", 80, str(www))]


def _curl(agent: Any, pod: str, url: str, attempts: int = 20) -> subprocess.CompletedProcess[str]:
    """curl from ``pod``; retried briefly because a fresh server may still be binding."""
    res = agent.pod_exec(pod, "curl", "-s", "-m", "2", url)
    for _ in range(attempts):
        if res.returncode == 0:
            break
        time.sleep(0.2)
        res = agent.pod_exec(pod, "curl", "-s", "-m", "2", url)
    return res


@pytest.fixture
def www(tmp_path: Any) -> Any:
    (tmp_path / "public").write_text("public data\n")
    (tmp_path / "private").write_text("secret\n")
    return tmp_path


def test_seed_demo_pods_reach_each_other_and_survive_agent_sigkill(agent: Any, www: Any) -> None:
    app1 = agent.pod_run("app1", *_http_server(www), labels="id=app1",
                         extra=["--port", "http:80/TCP"])
    app2 = agent.pod_run("app2", "sleep", "infinity", labels="id=app2")
    app3 = agent.pod_run("app3", "sleep", "infinity", labels="id=app3")
    assert len({app1, app2, app3}) == 3

    for client in ("app2", "app3"):
        res = _curl(agent, client, f"http://{app1}/public")
        assert res.returncode == 0, f"{client} -> app1 failed: {res.stderr}\n{agent.log()}"
        assert res.stdout == "public data\n"

    endpoints = agent.json("endpoint", "list")
    assert len(endpoints) == 3
    by_pod = {e["pod"]: e for e in endpoints}
    assert set(by_pod) == {"default/app1", "default/app2", "default/app3"}
    assert len({e["identity"] for e in endpoints}) == 3
    assert "k8s:id=app1" in by_pod["default/app1"]["labels"]
    assert "k8s:io.kubernetes.pod.namespace=default" in by_pod["default/app1"]["labels"]
    assert by_pod["default/app1"]["ipv4"] == app1
    assert all(e["status"] == "ready" for e in endpoints)
    pods_before = agent.json("pod", "list")
    assert {p["name"]: p["ip"] for p in pods_before} == {"app1": app1, "app2": app2, "app3": app3}

    agent.kill()
    agent.start()

    assert agent.json("endpoint", "list") == endpoints
    assert agent.json("pod", "list") == pods_before
    for client in ("app2", "app3"):
        res = _curl(agent, client, f"http://{app1}/public")
        assert res.returncode == 0, f"after restart {client} -> app1 failed: {res.stderr}"
        assert res.stdout == "public data\n"
    # a new pod after the restart gets a new address: nothing is handed out twice
    app4 = agent.pod_run("app4", "sleep", "infinity", labels="id=app4")
    assert app4 not in {app1, app2, app3}
    ids = [e["id"] for e in agent.json("endpoint", "list")]
    assert len(ids) == len(set(ids)) == 4


def test_policy_and_identities_survive_restart(agent: Any, www: Any) -> None:
    agent.pod_run("web", "sleep", "infinity", labels="id=app1")
    agent.pod_run("cli", "sleep", "infinity", labels="id=app2")
    res = agent.cli("policy", "apply", "-f", str(LIVE / "00-default-deny.yaml"),
                    "-f", str(LIVE / "10-allow-app2.yaml"), check=True)
    assert "revision" in res.stdout
    policies = agent.json("policy", "list")
    assert {p["name"] for p in policies} == {"default-deny-ingress", "app1-from-app2"}
    endpoints = agent.json("endpoint", "list")
    web = next(e for e in endpoints if e["pod"] == "default/web")
    assert web["policy_enforcement"] == {"ingress": True, "egress": False}
    detail = agent.json("endpoint", "get", str(web["id"]))
    assert detail["in_sync"] is True
    assert any("app1-from-app2" in d for e in detail["policy"] for d in e["derived_from"])

    identities = agent.json("identity", "list")
    assert any(i["reserved"] and i["id"] == 2 for i in identities)

    agent.kill()
    agent.start()
    assert agent.json("policy", "list") == policies
    assert agent.json("endpoint", "list") == endpoints
    assert agent.json("identity", "list") == identities
    detail2 = agent.json("endpoint", "get", str(web["id"]))
    assert detail2["policy"] == detail["policy"]
    assert detail2["in_sync"] is True

    agent.cli("policy", "delete", "cnp/app1-from-app2", "-n", "default", check=True)
    assert {p["name"] for p in agent.json("policy", "list")} == {"default-deny-ingress"}
    agent.cli("policy", "delete", "-f", str(LIVE / "00-default-deny.yaml"), check=True)
    assert agent.json("policy", "list") == []
    web2 = next(e for e in agent.json("endpoint", "list") if e["pod"] == "default/web")
    assert web2["policy_enforcement"] == {"ingress": False, "egress": False}


def test_seed_demo_policy_is_enforced(agent: Any, www: Any) -> None:
    app1 = agent.pod_run("app1", *_http_server(www), labels="id=app1",
                         extra=["--port", "http:80/TCP"])
    agent.pod_run("app2", "sleep", "infinity", labels="id=app2")
    agent.pod_run("app3", "sleep", "infinity", labels="id=app3")
    assert _curl(agent, "app3", f"http://{app1}/public").returncode == 0
    agent.cli("policy", "apply", "-f", str(LIVE / "00-default-deny.yaml"),
              "-f", str(LIVE / "10-allow-app2.yaml"), check=True)
    says_no_enforcement = "no enforcement" in agent.json("status")["datapath"]["detail"]
    # the status must tell the truth about the datapath, checked below against traffic
    assert says_no_enforcement == (agent.datapath in NON_ENFORCING), agent.json("status")

    res = _curl(agent, "app2", f"http://{app1}/public")
    assert res.returncode == 0 and res.stdout == "public data\n"
    denied = agent.pod_exec("app3", "curl", "-s", "-m", "1", f"http://{app1}/public")
    if agent.datapath in NON_ENFORCING:
        # policy computed, nothing enforced: the default deny must not drop real traffic
        assert (denied.returncode, denied.stdout) == (0, "public data\n"), denied.stderr
        web = next(e for e in agent.json("endpoint", "list") if e["pod"] == "default/app1")
        assert web["policy_enforcement"] == {"ingress": True, "egress": False}
        out = agent.cli("observe", "--verdict", "DROPPED", "--from-pod", "default/app3",
                        "-o", "json", check=True).stdout
        assert out.strip() == "", f"a non-enforcing datapath reported drops: {out}"
        return
    assert denied.returncode != 0, "app3 reached app1 despite default deny"
    assert denied.stdout == "", denied.stdout
    web = next(e for e in agent.json("endpoint", "list") if e["pod"] == "default/app1")
    assert agent.json("endpoint", "get", str(web["id"]))["in_sync"] is True
    flows = []
    for _ in range(30):
        out = agent.cli("observe", "--verdict", "DROPPED", "--from-pod", "default/app3",
                        "-o", "json", check=True).stdout
        flows = [json.loads(line) for line in out.splitlines()]
        if flows:
            break
        time.sleep(0.2)
    assert flows, "no DROPPED flow from app3 was observed"
    assert flows[-1]["destination"]["pod_name"] == "app1"

    # deleting the deny-all policy restores access
    agent.cli("policy", "delete", "-f", str(LIVE / "00-default-deny.yaml"),
              "-f", str(LIVE / "10-allow-app2.yaml"), check=True)
    assert _curl(agent, "app3", f"http://{app1}/public").returncode == 0


def test_seed_demo_l7_public_only(agent: Any, tmp_path: Any) -> None:
    if agent.datapath in NON_ENFORCING:
        pytest.skip(f"{agent.datapath} datapath has no L7 redirect")
    plugins = json.loads(agent.cli("plugins", "-o", "json", check=True).stdout)
    if "http" not in plugins.get("l7", {}):
        pytest.skip("the http L7 parser is not installed")
    www = tmp_path / "www"
    (www / "private").mkdir(parents=True)
    (www / "public").write_text("public data\n")
    (www / "private" / "index.html").write_text("secret\n")
    app1 = agent.pod_run("app1", *_http_server(www), labels="id=app1")
    agent.pod_run("app2", "sleep", "infinity", labels="id=app2")
    assert _curl(agent, "app2", f"http://{app1}/public").returncode == 0
    agent.cli("policy", "apply", "-f", str(LIVE / "00-default-deny.yaml"),
              "-f", str(LIVE / "20-l7-public-only.yaml"), check=True)

    def code(path: str) -> str:
        res = agent.pod_exec("app2", "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                             "-m", "3", f"http://{app1}{path}")
        return res.stdout

    assert code("/public") == "200"
    assert code("/private/") == "403"
    proxies = agent.json("status")["components"]["l7_proxies"]
    assert [p["parser"] for p in proxies] == ["http"]
    out = agent.cli("observe", "--protocol", "http", "-o", "json", check=True).stdout
    flows = [json.loads(line) for line in out.splitlines()]
    assert any(f["verdict"] == "DROPPED" and "/private" in f["l7"]["http"]["url"] for f in flows)
    assert any(f["verdict"] == "FORWARDED" and "/public" in f["l7"]["http"]["url"] for f in flows)

    # a clean shutdown keeps L7 enforcement failing closed; a restart brings the proxy back
    netns = next(p["netns"] for p in agent.json("pod", "list") if p["name"] == "app2")
    agent.stop()
    down = subprocess.run(["ip", "netns", "exec", netns, "curl", "-s", "-o", "/dev/null", "-w",
                           "%{http_code}", "-m", "3", f"http://{app1}/public"],
                          capture_output=True, text=True)
    assert down.stdout != "200", "L7 policy was bypassed while the agent was down"
    agent.start()
    for _ in range(20):
        if code("/public") == "200":
            break
        time.sleep(0.2)
    assert code("/public") == "200"
    assert code("/private/") == "403"
