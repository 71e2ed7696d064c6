"""Fixtures of the conformance suite (registered by ``axoneme.testing.plugin``).

Named ``conformance_*`` so that no conftest of a project running the kit
shadows them. The datapath under test is the ``axoneme_datapath`` parameter
(a ``DatapathSpec``) that the plugin gives every test asking for it.

- ``conformance_guard`` (session): forwarded pod traffic never leaves through
  the uplink; installed before anything else of the kernel part.
- ``conformance_world`` (session): a netns holding .10-.12 of a free /28 of
  198.51.100.0/24 (a ``World``) serving the pod server, routed via the node.
- ``conformance_agent`` / ``conformance_topology`` (module): an agent on the
  datapath under test and namespaces x,y,z x pods a,b,c made through the CLI.
- ``conformance_node`` (module) / ``conformance_kernel_datapath``: two veth
  pods off a private node namespace that the module's thread enters, and the
  datapath class with a config for it (driven directly, no agent).

Everything is removed by name or PID on success and on failure.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from axoneme.testing import netns
from axoneme.testing.capability import require_root
from axoneme.testing.conformance._harness import (
    AX,
    HERE,
    NAMESPACES,
    PODS,
    PORTS,
    PYTHON,
    WORLD_LOCK,
    Agent,
    Topology,
    World,
    cluster_yaml,
    free_world,
    sh,
    uplink,
    wait_servers,
)

KERNEL_NEEDS = "netns, veth, iptables and the datapath's kernel objects"
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
NODE_PORT = 80
NODE_IDS = {"a": 30001, "b": 30002}


def skip_unavailable(request: pytest.FixtureRequest, spec: Any) -> None:
    """Skip (the reason printed) when this machine lacks what ``spec`` needs."""
    reason = request.getfixturevalue("axoneme_probe")(spec.name, spec.mode)
    if reason:
        print(f"SKIP: {reason}", file=sys.stderr)
        pytest.skip(reason)


@pytest.fixture(scope="session")
def conformance_guard() -> Iterator[None]:
    """Drop forwarded pod traffic leaving through the uplink, before any probe."""
    require_root(KERNEL_NEEDS)
    if shutil.which("iptables") is None:
        pytest.skip("no iptables binary: cannot install the forwarding guard")
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
def conformance_world(conformance_guard: None) -> Iterator[World]:
    """A netns holding three hosts of a free /28 of the test network (198.51.100.0/24)
    running the pod server, routed via the node."""
    sfx = uuid.uuid4().hex[:5]
    ns, host_if, peer_if = f"axtw-p{os.getpid()}-{sfx}", f"axw{sfx}h", f"axw{sfx}p"
    proc = None
    try:
        netns.add_netns(ns)  # its own resolv.conf: never the host's resolver
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", peer_if)
        sh("ip", "link", "set", peer_if, "netns", ns)
        with open(WORLD_LOCK, "w") as lock:  # choose and take a /28, one session at a time
            fcntl.flock(lock, fcntl.LOCK_EX)
            world = free_world()
            sh("ip", "addr", "add", f"{world.host_ip}/28", "dev", host_if)
        sh("ip", "link", "set", host_if, "up")
        for ip in world.ips:
            sh("ip", "-n", ns, "addr", "add", f"{ip}/28", "dev", peer_if)
        sh("ip", "-n", ns, "link", "set", peer_if, "up")
        sh("ip", "-n", ns, "route", "add", "default", "via", world.host_ip)
        route = sh("ip", "route", "get", world.ips[0]).stdout
        assert f"dev {host_if}" in route, f"{world.net} is not routed to the test world: {route}"
        proc = subprocess.Popen(["ip", "netns", "exec", ns, PYTHON, str(HERE / "podserver.py"), "world",
                                 *map(str, PORTS)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # it binds every port before it accepts: the last one accepting means all do
        netns.wait_accepting(world.ips[0], PORTS[-1], ns, proc)
        yield world
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        sh("ip", "link", "del", host_if, check=False)
        netns.del_netns(ns)


# module scope: an agent (and its node lock) must be gone before the next
# module, whose own agents would otherwise wait on that lock
@pytest.fixture(scope="module")
def conformance_agent(request: pytest.FixtureRequest, axoneme_datapath: Any,
                      conformance_world: World) -> Iterator[Agent]:
    spec = axoneme_datapath
    skip_unavailable(request, spec)
    # one agent of a datapath at a time on this host (its kernel objects may be
    # host-wide: iptables chains are), the lock the repository's other suites take too
    lock = open(f"/tmp/axoneme-{spec.name}-datapath.lock", "w")  # noqa: SIM115
    fcntl.flock(lock, fcntl.LOCK_EX)
    # -p<pid>-: a live session's state dir, never swept while its agent is down on purpose
    base = Path(tempfile.mkdtemp(prefix=f"axon-conf-p{os.getpid()}-", dir="/tmp"))
    ag = Agent(spec.name, spec.mode, base / "state", base / "axoneme.sock", pod_cidr=netns.free_pod_cidr())
    try:
        ag.start()
        status = ag.json("status")
        dp = status.get("datapath", {}) if isinstance(status, dict) else {}
        assert dp.get("name") == spec.name, f"the agent runs datapath {dp!r}, not {spec.label}"
        if spec.mode:
            assert dp.get("mode") == spec.mode, f"the agent runs {dp!r}, not mode {spec.mode!r}"
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
        shutil.rmtree(base, ignore_errors=True)
        lock.close()


@pytest.fixture(scope="module")
def conformance_topology(conformance_agent: Agent, conformance_world: World) -> Iterator[Topology]:
    """Namespaces x,y,z (label ns=<name>) with pods a,b,c (label pod=<name>)
    serving TCP and UDP on 80 and 81 (named serve-80-tcp, serve-81-udp, ...)."""
    agent = conformance_agent
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
        nets = {f"{p['namespace']}/{p['name']}": Path(p["netns"]).name for p in pods}  # type: ignore[union-attr]
        cluster = agent.state_dir.parent / "cluster.yaml"
        cluster.write_text(cluster_yaml(agent))
        topo = Topology(agent, ips, cluster, nets, conformance_world)
        wait_servers(topo)
        yield topo
    finally:
        for ns, pod in created:
            agent.ax("pod", "delete", pod, "-n", ns, check=False)
        for ns in NAMESPACES:
            agent.ax("namespace", "delete", ns, check=False)


# -- a node namespace with two veth pods, for driving a datapath directly --------------

@dataclass
class NodePod:
    name: str
    netns: str
    host_if: str
    ip: str


@dataclass
class Node:
    suffix: str
    pods: dict[str, NodePod]

    def probe(self, src: str, dst: str, port: int = NODE_PORT, proto: str = "tcp") -> bool:
        r = subprocess.run(["ip", "netns", "exec", self.pods[src].netns, PYTHON,
                            str(HERE / "prober.py"), json.dumps([[self.pods[dst].ip, port, proto]])],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return bool(json.loads(r.stdout.strip().splitlines()[-1])[0])

    def endpoints(self) -> dict[str, Any]:
        """An Endpoint per pod (identity NODE_IDS[name]) on its host veth."""
        from axoneme.core.endpoint import Endpoint
        from axoneme.core.labels import Labels

        return {n: Endpoint(10 + i, NODE_IDS[n], Labels(), ipv4=p.ip, host_ifname=p.host_if,
                            namespace="conf", pod_name=f"pod-{n}")
                for i, (n, p) in enumerate(sorted(self.pods.items()))}

    def wire(self, dp: Any, eps: dict[str, Any], policy: Any) -> None:
        """The pods' identities in ``dp``'s ipcache, each endpoint added and
        enforcing ``policy`` (a MapState) in both directions."""
        import ipaddress

        from axoneme.core.datapath import IPCacheChanges

        dp.ipcache_apply(IPCacheChanges({ipaddress.ip_network(f"{p.ip}/32"): NODE_IDS[n]
                                         for n, p in self.pods.items()}))
        for ep in eps.values():
            dp.endpoint_added(ep, True, True)
            dp.sync(ep, policy)


def _setns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
    finally:
        os.close(fd)


def _node_pod(name: str, ns: str, host_if: str, ip: str) -> NodePod:
    """A pod netns wired to the node (the current netns) by a veth; the node
    has no address to ARP from, so both neighbour entries are pinned."""
    netns.add_netns(ns)
    sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ns)
    sh("ip", "-n", ns, "link", "set", "lo", "up")
    sh("ip", "-n", ns, "link", "set", "eth0", "up")
    sh("ip", "-n", ns, "addr", "add", f"{ip}/32", "dev", "eth0")
    sh("ip", "-n", ns, "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link")
    sh("ip", "-n", ns, "route", "add", "default", "via", "169.254.1.1", "dev", "eth0")
    sh("ip", "link", "set", host_if, "up")
    host_mac = sh("ip", "-o", "link", "show", "dev", host_if).stdout.split("link/ether")[1].split()[0]
    pod_mac = sh("ip", "-n", ns, "-o", "link", "show", "dev", "eth0").stdout.split(
        "link/ether")[1].split()[0]
    sh("ip", "-n", ns, "neigh", "replace", "169.254.1.1", "lladdr", host_mac, "dev", "eth0",
       "nud", "permanent")
    sh("ip", "neigh", "replace", ip, "lladdr", pod_mac, "dev", host_if, "nud", "permanent")
    sh("ip", "route", "add", f"{ip}/32", "dev", host_if)
    return NodePod(name, ns, host_if, ip)


@pytest.fixture(scope="module")
def conformance_node(conformance_guard: None) -> Iterator[Node]:
    """Pods a and b (TCP/UDP servers on port 80) off a private node netns this
    module's thread enters: no uplink there; the host's guard is in place anyway."""
    sfx = secrets.token_hex(2)
    node_ns = f"axcf-p{os.getpid()}-{sfx}n"
    octet = 100 + secrets.randbelow(150)
    made: list[str] = []
    servers: list[subprocess.Popen[bytes]] = []
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    entered = False
    try:
        made.append(node_ns)
        netns.add_netns(node_ns)
        _setns(f"/run/netns/{node_ns}")  # this thread and what it starts live on the node
        entered = True
        sh("ip", "link", "set", "lo", "up")
        sh("sysctl", "-qw", "net.ipv4.ip_forward=1")
        pods = {}
        for i, name in enumerate("ab", start=1):
            ns = f"axcf-p{os.getpid()}-{sfx}{name}"
            made.append(ns)
            pods[name] = _node_pod(name, ns, f"axc{sfx}{name}", f"10.244.{octet}.{i}")
            route = sh("ip", "route", "get", pods[name].ip).stdout
            assert f"dev {pods[name].host_if}" in route, route
            servers.append(subprocess.Popen(
                ["ip", "netns", "exec", ns, PYTHON, str(HERE / "podserver.py"), name, str(NODE_PORT)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            netns.wait_accepting(pods[name].ip, NODE_PORT, ns, servers[-1])
        yield Node(sfx, pods)
    finally:
        for p in servers:
            p.kill()
            p.wait()
        if entered:
            _libc.setns(home, CLONE_NEWNET)
        os.close(home)
        for ns in reversed(made):  # the veths, routes and neighbours go with them
            netns.del_netns(ns)


def supported_options(cls: type, wanted: dict[str, Any]) -> dict[str, Any]:
    """The options of ``wanted`` that ``cls`` takes: those it declares, or all of
    them for a datapath that declares none (it reads what it knows)."""
    declared = {o.name for o in getattr(cls, "options", ())}
    return {k: v for k, v in wanted.items() if not declared or k in declared}


@pytest.fixture
def conformance_kernel_datapath(request: pytest.FixtureRequest, axoneme_datapath: Any,
                                conformance_node: Node, tmp_path: Path) -> Iterator[Any]:
    """(datapath class, config) of the datapath under test on the node; everything
    its instances made is removed afterwards."""
    spec = axoneme_datapath
    skip_unavailable(request, spec)
    from axoneme.core.datapath import DatapathConfig, datapath_class

    cls = datapath_class(spec.name)
    bpffs = f"/sys/fs/bpf/axoneme-conf-{secrets.token_hex(4)}"
    # small maps, a private NFLOG group, the node's veth names as pod interfaces
    options = supported_options(cls, {"max_endpoints": 8, "nflog_group": 6000 + secrets.randbelow(900),
                                 "host_ifname_prefix": f"axc{conformance_node.suffix}"})
    config = DatapathConfig(
        state_dir=str(tmp_path), mode=spec.mode, bpffs_root=bpffs, policy_map_max=64, ct_max=4096,
        ipcache_max=1024, pod_cidr="10.244.0.0/16", options=options)
    try:
        yield cls, config
    finally:
        try:
            cls(config).cleanup()
        finally:
            shutil.rmtree(bpffs, ignore_errors=True)
