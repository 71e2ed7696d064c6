"""Fixtures of the conformance suite (see _harness.py for the machinery)."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import _testnet  # tests/ is on sys.path (tests/conftest.py)
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import (  # noqa: E402
    AX,
    DATAPATHS,
    HERE,
    NAMESPACES,
    PODS,
    PORTS,
    PYTHON,
    WORLD_HOST_IP,
    WORLD_IPS,
    Agent,
    Topology,
    cluster_yaml,
    datapath_unavailable,
    free_pod_cidr,
    root_or_skip,
    sh,
    uplink,
    wait_servers,
)


@pytest.fixture(scope="session")
def guard() -> Iterator[None]:
    """Drop forwarded pod traffic leaving through the uplink, before any probe."""
    root_or_skip()
    chain = f"AXTEST-GUARD-p{os.getpid()}"  # not AXON-: datapath cleanup owns that prefix; pid: swept if killed
    up = uplink()
    sh("iptables", "-N", chain)
    try:
        if up:
            sh("iptables", "-A", chain, "-s", "10.244.0.0/16", "-o", up, "-j", "DROP")
        sh("iptables", "-I", "FORWARD", "1", "-j", chain)
        yield
    finally:
        sh("iptables", "-D", "FORWARD", "-j", chain, check=False)
        sh("iptables", "-F", chain, check=False)
        sh("iptables", "-X", chain, check=False)


@pytest.fixture(scope="session")
def world(guard: None) -> Iterator[dict[str, str]]:
    """A netns holding 198.51.100.{10,11,12} (a /28 of the test network) running the pod server, routed via the node."""
    sfx = uuid.uuid4().hex[:5]
    ns, host_if, peer_if = f"axtw-p{os.getpid()}-{sfx}", f"axw{sfx}h", f"axw{sfx}p"
    proc = None
    try:
        _testnet.add_netns(ns)  # its own resolv.conf: never the host's resolver
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", peer_if)
        sh("ip", "link", "set", peer_if, "netns", ns)
        sh("ip", "addr", "add", f"{WORLD_HOST_IP}/28", "dev", host_if)
        sh("ip", "link", "set", host_if, "up")
        for ip in WORLD_IPS:
            sh("ip", "-n", ns, "addr", "add", f"{ip}/28", "dev", peer_if)
        sh("ip", "-n", ns, "link", "set", peer_if, "up")
        sh("ip", "-n", ns, "route", "add", "default", "via", WORLD_HOST_IP)
        route = sh("ip", "route", "get", WORLD_IPS[0]).stdout
        assert f"dev {host_if}" in route, f"198.51.100.0/24 is not routed to the test world: {route}"
        proc = subprocess.Popen(["ip", "netns", "exec", ns, PYTHON, str(HERE / "podserver.py"), "world",
                                 *map(str, PORTS)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # it binds every port before it accepts: the last one accepting means all do
        _testnet.wait_accepting(WORLD_IPS[0], PORTS[-1], ns, proc)
        yield {"netns": ns, "host_if": host_if}
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        sh("ip", "link", "del", host_if, check=False)
        _testnet.del_netns(ns)


# module scope: the iptables agent (and its host lock) must be gone before the
# next module, whose own iptables agents would otherwise wait on that lock
@pytest.fixture(scope="module", params=DATAPATHS, ids=lambda d: f"{d[0]}-{d[1]}" if d[1] else d[0])
def agent(request: pytest.FixtureRequest, world: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    name, mode = request.param
    reason = datapath_unavailable(name, mode)
    if reason:
        print(f"SKIP: {reason}", file=sys.stderr)
        pytest.skip(reason)
    # iptables chains are host-wide: one iptables agent at a time on this host
    # (the lock the repository's other kernel suites take too)
    lock = open("/tmp/axoneme-iptables-datapath.lock", "w")  # noqa: SIM115
    if name == "iptables":
        fcntl.flock(lock, fcntl.LOCK_EX)
    base = Path(tempfile.mkdtemp(prefix="axon-conf-", dir="/tmp"))
    ag = Agent(name, mode, base / "state", base / "axoneme.sock", pod_cidr=free_pod_cidr())
    try:
        ag.start()
        yield ag
    finally:
        ag.stop()
        subprocess.run([AX, "agent", "cleanup", "--state-dir", str(ag.state_dir)], capture_output=True,
                       env=ag.env(), timeout=120)
        # keep the agent's log for post-mortems; the rest goes
        keep = Path(tempfile.gettempdir()) / "axoneme-conformance-logs"
        keep.mkdir(exist_ok=True)
        for log in base.glob("agent-*.log"):
            log.rename(keep / f"{ag.label.replace('/', '-')}-{log.name}")
        subprocess.run(["rm", "-rf", str(base)], check=False)
        lock.close()


@pytest.fixture(scope="module")
def topology(agent: Agent, world: dict[str, str]) -> Iterator[Topology]:
    """Namespaces x,y,z (label ns=<name>) with pods a,b,c (label pod=<name>)
    serving TCP and UDP on 80 and 81 (named serve-80-tcp, serve-81-udp, ...)."""
    created: list[tuple[str, str]] = []
    try:
        for ns in NAMESPACES:
            agent.ax("namespace", "create", ns, "--labels", f"ns={ns}")
        for ns in NAMESPACES:
            for pod in PODS:
                ports: list[str] = []
                for p in PORTS:
                    ports += ["--port", f"serve-{p}-tcp:{p}/TCP", "--port", f"serve-{p}-udp:{p}/UDP"]
                agent.ax("pod", "run", pod, "-n", ns, "--labels", f"pod={pod}", *ports, "--",
                         PYTHON, str(HERE / "podserver.py"), f"{ns}/{pod}", *map(str, PORTS), timeout=120)
                created.append((ns, pod))
        pods = agent.json("pod", "list")
        ips = {f"{p['namespace']}/{p['name']}": p["ip"] for p in pods}  # type: ignore[union-attr]
        netns = {f"{p['namespace']}/{p['name']}": Path(p["netns"]).name for p in pods}  # type: ignore[union-attr]
        cluster = agent.state_dir.parent / "cluster.yaml"
        cluster.write_text(cluster_yaml(agent))
        topo = Topology(agent, ips, cluster, netns)
        wait_servers(topo)
        yield topo
    finally:
        for ns, pod in created:
            agent.ax("pod", "delete", pod, "-n", ns, check=False)
        for ns in NAMESPACES:
            agent.ax("namespace", "delete", ns, check=False)

