"""SIGKILL the agent in the middle of pod creation: after a restart nothing is lost,
nothing is duplicated and nothing is left behind."""

from __future__ import annotations

import ipaddress
import random
import secrets
import subprocess
import time
from typing import Any

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.privileged]


def _routes_in(cidr: str) -> dict[str, str]:
    out = subprocess.run(["ip", "-4", "route", "show"], capture_output=True, text=True).stdout
    net = ipaddress.ip_network(cidr)
    routes = {}
    for line in out.splitlines():
        words = line.split()
        try:
            dst = ipaddress.ip_network(words[0], strict=False)
        except (ValueError, IndexError):
            continue
        if dst.prefixlen == 32 and dst.subnet_of(net) and "dev" in words:  # type: ignore[arg-type]
            routes[str(dst.network_address)] = words[words.index("dev") + 1]
    return routes


def _netns_with(tag: str) -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if tag in line}


@pytest.mark.parametrize("round_", range(2))
def test_sigkill_during_pod_creation(agent: Any, round_: int) -> None:
    tag = f"k{secrets.token_hex(2)}"
    agent.pod_run(f"{tag}-first", "sleep", "infinity")
    clients = [subprocess.Popen(["axoneme", "pod", "run", f"{tag}-p{i}", "--", "sleep", "infinity"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=agent.env()) for i in range(6)]
    time.sleep(random.uniform(0.3, 1.5))
    agent.kill()
    for c in clients:
        try:
            c.wait(30)
        except subprocess.TimeoutExpired:
            c.kill()
            c.wait()
    agent.start()

    endpoints = agent.json("endpoint", "list")
    pods = agent.json("pod", "list")
    ips = [e["ipv4"] for e in endpoints]
    assert len(ips) == len(set(ips)), "an IP is held twice"
    assert len({e["id"] for e in endpoints}) == len(endpoints)
    assert all(e["status"] == "ready" for e in endpoints), endpoints
    # every pod the agent still knows is whole: endpoint, netns, running process
    by_pod = {e["pod"]: e for e in endpoints}
    for p in pods:
        assert f"{p['namespace']}/{p['name']}" in by_pod, p
        assert p["status"] in ("Running", "Failed"), p
        assert by_pod[f"default/{p['name']}"]["ipv4"] == p["ip"]
    assert any(p["name"] == f"{tag}-first" for p in pods)
    # nothing left behind: each host route of the pod CIDR belongs to a known endpoint,
    # and each of this test's netns belongs to a known pod
    routes = _routes_in(agent.pod_cidr)
    assert routes == {e["ipv4"]: e["host_ifname"] for e in endpoints}
    assert _netns_with(tag) == {p["netns"] for p in pods}
    # and the agent works on
    ip = agent.pod_run(f"{tag}-after", "sleep", "infinity")
    assert ip not in ips
