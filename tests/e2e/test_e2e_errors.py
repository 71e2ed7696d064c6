"""Bad input and failure modes of the agent and the pod runtime (each one exits as documented)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.privileged]

AXONEME = str(Path(sys.executable).parent / "axoneme")


def _netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def _alive(pid: int) -> bool:
    """A zombie is dead: PID 1 here may not reap orphans."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_unknown_namespace_duplicate_pod_and_invalid_label_exit_2(agent: Any) -> None:
    res = agent.cli("pod", "run", "p", "-n", "nosuchns", "--", "sleep", "10")
    assert res.returncode == 2
    assert "namespace nosuchns not found" in res.stderr
    assert res.stderr.startswith("error: ")

    agent.pod_run("dup", "sleep", "infinity")
    netns_before = _netns_names()
    res = agent.cli("pod", "run", "dup", "--", "sleep", "10")
    assert res.returncode == 2
    assert "pod default/dup already exists" in res.stderr
    assert _netns_names() == netns_before  # nothing was created for the rejected pod

    res = agent.cli("pod", "run", "bad", "--labels", "app=ok,bad key=x", "--", "sleep", "10")
    assert res.returncode == 2
    assert "bad key=x" in res.stderr
    res = agent.cli("namespace", "create", "ns1", "--labels", "=novalue")
    assert res.returncode == 2
    assert "=novalue" in res.stderr
    assert [p["name"] for p in agent.json("pod", "list")] == ["dup"]


def test_agent_not_running_exit_1(tmp_path: Path) -> None:
    sock = tmp_path / "nobody.sock"
    for args in (["status"], ["pod", "list"], ["endpoint", "list"],
                 ["pod", "run", "x", "--", "sleep", "1"]):
        res = subprocess.run([AXONEME, *args, "--api-socket", str(sock)] if args[0] != "pod"
                             else [AXONEME, "--api-socket", str(sock), *args],
                             capture_output=True, text=True)
        assert res.returncode == 1, (args, res.stderr)
        assert res.stderr.strip() == (f"error: cannot reach the agent at {sock} "
                                      f"(start it with: axoneme agent run)")
    # the environment variable names the socket too
    res = subprocess.run([AXONEME, "status"], capture_output=True, text=True,
                         env={"AXONEME_API_SOCKET": str(sock), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 1
    assert str(sock) in res.stderr


def test_corrupt_state_file_refuses_to_start(agent_factory: Any) -> None:
    ap = agent_factory("noop", start=False)
    ap.state_dir.mkdir(parents=True)
    state = ap.state_dir / "state.json"
    garbage = b'{"version": 1, "pods": {"default/x": '
    state.write_bytes(garbage)
    res = subprocess.run(ap.command(), capture_output=True, text=True, env=ap.env(), timeout=60)
    assert res.returncode == 2, res.stderr
    assert str(state) in res.stderr
    assert "corrupt" in res.stderr
    assert state.read_bytes() == garbage  # nothing overwritten
    assert not ap.socket.exists()
    # a state file of the wrong shape is refused too
    state.write_text(json.dumps({"version": 1, "endpoints": {"c": {"id": "not-a-record"}}}))
    res = subprocess.run(ap.command(), capture_output=True, text=True, env=ap.env(), timeout=60)
    assert res.returncode == 2
    assert str(state) in res.stderr


def test_unavailable_datapath_exits_1(agent_factory: Any) -> None:
    ap = agent_factory("noop", start=False)
    cmd = ap.command()
    cmd[cmd.index("--datapath") + 1] = "no-such-datapath"
    res = subprocess.run(cmd, capture_output=True, text=True, env=ap.env(), timeout=60)
    assert res.returncode == 1
    assert "no-such-datapath" in res.stderr


def test_invalid_policy_applies_nothing(agent: Any, tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("""apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: good}
spec:
  endpointSelector: {matchLabels: {id: a}}
  ingress: [{fromEndpoints: [{matchLabels: {id: b}}]}]
""")
    bad = tmp_path / "bad.yaml"
    bad.write_text("""apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: bad}
spec:
  endpointSelector: {matchLabels: {id: a}}
  ingress: [{toPorts: [{ports: [{port: "99999", protocol: TCP}]}]}]
""")
    res = agent.cli("policy", "apply", "-f", str(good), "-f", str(bad))
    assert res.returncode == 2
    assert "bad.yaml" in res.stderr
    assert agent.json("policy", "list") == []
    assert agent.json("status")["policy_revision"] == 0
    res = agent.cli("policy", "delete", "cnp/nothere", "-n", "default")
    assert res.returncode == 2
    assert "nothere" in res.stderr


def test_pod_delete_removes_netns_link_and_process(agent: Any) -> None:
    ip = agent.pod_run("gone", "sleep", "infinity", labels="app=gone")
    pod = next(p for p in agent.json("pod", "list") if p["name"] == "gone")
    ep = next(e for e in agent.json("endpoint", "list") if e["pod"] == "default/gone")
    assert pod["ip"] == ip and pod["status"] == "Running"
    assert pod["netns"] in _netns_names()
    assert ep["host_ifname"] in _links()
    pid = pod["pid"]
    assert Path(f"/proc/{pid}").exists()
    agent.cli("pod", "delete", "gone", check=True)
    assert pod["netns"] not in _netns_names()
    assert ep["host_ifname"] not in _links()
    assert not _alive(pid)
    assert agent.json("pod", "list") == []
    assert agent.json("endpoint", "list") == []
    res = agent.cli("pod", "delete", "gone")
    assert res.returncode == 2
    assert "not found" in res.stderr


def test_agent_cleanup_removes_everything_and_is_idempotent(agent_factory: Any) -> None:
    ap = agent_factory("noop")
    ap.pod_run("c1", "sleep", "infinity")
    pod = ap.json("pod", "list")[0]
    ep = ap.json("endpoint", "list")[0]
    ap.kill()
    for _ in range(2):
        res = subprocess.run([AXONEME, "agent", "cleanup", "--state-dir", str(ap.state_dir)],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        assert pod["netns"] not in _netns_names()
        assert ep["host_ifname"] not in _links()
        assert not (ap.state_dir / "state.json").exists()
        assert not _alive(pod["pid"])


def test_namespace_label_changes_identity_and_logs(agent: Any) -> None:
    agent.cli("namespace", "create", "team", "--labels", "env=dev", check=True)
    agent.pod_run("w", "sh", "-c", "echo hello-from-pod; sleep 1000", namespace="team",
                  labels="app=w")
    before = next(e for e in agent.json("endpoint", "list") if e["pod"] == "team/w")
    assert "k8s:io.cilium.k8s.namespace.labels.env=dev" in before["labels"]
    agent.cli("namespace", "label", "team", "env=prod", check=True)
    after = next(e for e in agent.json("endpoint", "list") if e["pod"] == "team/w")
    assert "k8s:io.cilium.k8s.namespace.labels.env=prod" in after["labels"]
    assert after["identity"] != before["identity"]
    assert after["ipv4"] == before["ipv4"]
    res = agent.cli("namespace", "delete", "team")
    assert res.returncode == 2 and "still has pods" in res.stderr
    logs = ""
    for _ in range(50):
        logs = agent.cli("pod", "logs", "w", "-n", "team", check=True).stdout
        if "hello-from-pod" in logs:
            break
        import time

        time.sleep(0.1)
    assert "hello-from-pod" in logs
    rc = agent.pod_exec("w", "sh", "-c", "exit 7", namespace="team")
    assert rc.returncode == 7
    out = agent.pod_exec("w", "cat", "/etc/resolv.conf", namespace="team")
    assert "198.51.100.53" in out.stdout
