"""The README's demo command, run as a newcomer would: every step's result is
checked in its output, and nothing it made is left behind."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.privileged]

ROOT = Path(__file__).resolve().parents[2]


def _netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.split()}


def test_demo_shows_every_step_and_cleans_up(pod_cidr: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("the demo's live part needs root (agent, netns, eBPF)")
    before = _netns()
    # a pod CIDR of its own: other suites' agents may still hold 10.244.0.0/24
    env = {**os.environ, "AXONEME_DEMO_POD_CIDR": pod_cidr}
    res = subprocess.run([str(ROOT / "scripts" / "demo")], capture_output=True, text=True,
                         timeout=600, stdin=subprocess.DEVNULL, cwd=ROOT, env=env)
    out = res.stdout
    assert res.returncode == 0, f"demo failed ({res.returncode}):\n{out}\n{res.stderr}"
    # offline: the truth table and the trace of a denied flow
    assert re.search(r"Port 80/TCP: \d+ of 144 allowed", out), out
    assert "verdict: DENIED" in out
    # live, L3/L4: app2 allowed, app3 dropped, and the drop is observed
    assert out.count("app2 -> app1/public: HTTP 200") >= 2, out
    assert re.search(r"app3 -> app1/public: no connection \(curl exit (7|28)\)", out), out
    assert re.search(r"default/app3:\d+ \(ID:\d+\) -> default/app1:80 .*Policy denied DROPPED", out), out
    # L7: GET /private is refused by the proxy
    assert "app2 -> app1/private/: HTTP 403" in out, out
    # FQDN: the seed scenario
    assert "mediabot -> http://api.twitter.com/: HTTP 200" in out, out
    assert re.search(r"mediabot -> http://kubernetes.io/: blocked \(curl exit (7|28)\)", out), out
    assert re.search(r"DNS Answer \"198\.51\.100\.\d+\"", out), out
    # cleaned up: no demo world, no new pod netns, no guard chain of the demo
    # (only names the demo makes: a pod's axon-<ns>-<pod>-<hex>, its world's axdemo-*;
    # another process of the machine may make its own meanwhile)
    left = {n for n in _netns() - before if n.startswith(("axon-", "axdemo"))}
    assert not left, left
    chains = subprocess.run(["iptables", "-w", "5", "-S"], capture_output=True, text=True).stdout
    assert "AXDEMO-GUARD" not in chains
