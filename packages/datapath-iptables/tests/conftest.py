"""Kernel harness for the iptables datapath: netns pods, a fake outside host,
a forwarding guard, and in-process probes (sockets created inside a netns).

The "node" (where the datapath's rules and the pods' host-side veths live) is
itself a private network namespace that the test process's main thread
enters for the module: agents of other test suites on this machine run an
iptables datapath in the host's namespace at the same time, and one set of
AXON- chains per namespace is the contract. Pods and the outside host hang
off the node namespace, which has no uplink at all; the guard in the host's
FORWARD chain is installed first anyway.

Everything created here has a random suffix and is removed on teardown,
on success and on failure.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest
from axoneme.testing import netns as _testnet  # every netns gets its own resolv.conf
from axoneme.testing.capability import require_root, require_tools

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def sh(*cmd: str, check: bool = True, stdin: str | None = None) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, input=stdin, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr.strip()}")
    return proc.stdout


def in_netns(ns: str, fn: Callable[[], object]) -> object:
    """Run ``fn`` in a thread that entered netns ``ns``; sockets it creates stay there."""
    out: dict[str, object] = {}

    def run() -> None:
        fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
            out["v"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            out["e"] = e
        finally:
            os.close(fd)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "e" in out:
        raise out["e"]  # type: ignore[misc]
    return out["v"]


def ns_socket(ns: str, kind: int, family: int = socket.AF_INET) -> socket.socket:
    return in_netns(ns, lambda: socket.socket(family, kind))  # type: ignore[return-value]


@dataclass
class Pod:
    name: str  # short role: a, b, c, w
    netns: str
    host_if: str
    ips: list[str]
    ep_id: int = 0
    identity: int = 0
    ip6: str = ""

    @property
    def ip(self) -> str:
        return self.ips[0]


TCP_PORTS = (80, 443, 8080, 8081, 9000)
UDP_PORTS = (53, 5353)


class Servers:
    """TCP echo and UDP echo servers inside a netns, served by threads."""

    def __init__(self, ns: str) -> None:
        self.socks: list[socket.socket] = []
        self.stop = threading.Event()
        for port in TCP_PORTS:
            # one dual-stack socket per port
            s = ns_socket(ns, socket.SOCK_STREAM, socket.AF_INET6)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.bind(("::", port))
            s.listen(64)
            s.settimeout(0.2)
            self.socks.append(s)
            threading.Thread(target=self._accept, args=(s,), daemon=True).start()
        for port in UDP_PORTS:
            u = ns_socket(ns, socket.SOCK_DGRAM)
            u.bind(("0.0.0.0", port))
            u.settimeout(0.2)
            self.socks.append(u)
            threading.Thread(target=self._udp, args=(u,), daemon=True).start()

    def _accept(self, s: socket.socket) -> None:
        while not self.stop.is_set():
            try:
                c, _ = s.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=self._echo, args=(c,), daemon=True).start()

    def _echo(self, c: socket.socket) -> None:
        c.settimeout(0.5)
        with c:
            while not self.stop.is_set():
                try:
                    data = c.recv(4096)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                try:
                    c.sendall(data)
                except OSError:
                    return

    def _udp(self, u: socket.socket) -> None:
        while not self.stop.is_set():
            try:
                data, peer = u.recvfrom(4096)
                u.sendto(data, peer)
            except (TimeoutError, OSError):
                continue

    def close(self) -> None:
        self.stop.set()
        for s in self.socks:
            s.close()


@dataclass
class Topology:
    suffix: str
    pods: dict[str, Pod]
    world: Pod
    uplink: str
    guard_chain: str
    servers: list[Servers] = field(default_factory=list)

    def socket(self, pod: Pod, kind: int) -> socket.socket:
        return ns_socket(pod.netns, kind)

    def tcp(self, src: Pod, dst_ip: str, port: int, timeout: float = 1.0) -> bool:
        family = socket.AF_INET6 if ":" in dst_ip else socket.AF_INET
        s = ns_socket(src.netns, socket.SOCK_STREAM, family)
        s.settimeout(timeout)
        try:
            s.connect((dst_ip, port))
            s.sendall(b"hi")
            return s.recv(16) == b"hi"
        except OSError:
            return False
        finally:
            s.close()

    def udp(self, src: Pod, dst_ip: str, port: int, timeout: float = 1.0) -> bool:
        s = ns_socket(src.netns, socket.SOCK_DGRAM)
        s.settimeout(timeout)
        try:
            s.sendto(b"hey", (dst_ip, port))
            return s.recvfrom(16)[0] == b"hey"
        except OSError:
            return False
        finally:
            s.close()

    def ping(self, src: Pod, dst_ip: str) -> bool:
        proc = subprocess.run(["ip", "netns", "exec", src.netns, "ping", "-c1", "-W1", "-q", dst_ip],
                              capture_output=True, check=False)
        return proc.returncode == 0

    def probe(self, checks: list[tuple[str, Pod, str, int]]) -> list[bool]:
        """Run (kind, src, dst ip, port) probes concurrently."""
        def one(c: tuple[str, Pod, str, int]) -> bool:
            kind, src, ip, port = c
            if kind == "tcp":
                return self.tcp(src, ip, port)
            if kind == "udp":
                return self.udp(src, ip, port)
            return self.ping(src, ip)
        with ThreadPoolExecutor(max_workers=max(1, len(checks))) as pool:
            return list(pool.map(one, checks))


def _uplink() -> str:
    out = sh("ip", "-o", "route", "show", "default")
    parts = out.split()
    return parts[parts.index("dev") + 1] if "dev" in parts else ""


def _mac_of(ifname: str, ns: str = "") -> str:
    # netlink, not /sys: /sys shows the netns it was mounted from
    cmd = ["ip", "-n", ns] if ns else ["ip"]
    out = sh(*cmd, "-o", "link", "show", "dev", ifname)
    return out.split("link/ether", 1)[1].split()[0]


def _make_pod(name: str, ns: str, host_if: str, ips: list[str], ip6: str = "") -> Pod:
    """A pod netns wired to the node (the current netns) by a veth."""
    _testnet.add_netns(ns)
    sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ns)
    sh("ip", "-n", ns, "link", "set", "lo", "up")
    sh("ip", "-n", ns, "link", "set", "eth0", "up")
    for ip in ips:
        sh("ip", "-n", ns, "addr", "add", f"{ip}/32", "dev", "eth0")
    sh("ip", "-n", ns, "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link")
    sh("ip", "-n", ns, "route", "add", "default", "via", "169.254.1.1", "dev", "eth0")
    sh("sysctl", "-qw", f"net.ipv4.conf.{host_if}.proxy_arp=1")
    # proxy ARP answers after a random delay (up to 0.8 s): longer than a
    # probe's patience. Pin the gateway's neighbour entry instead.
    sh("sysctl", "-qw", f"net.ipv4.neigh.{host_if}.proxy_delay=0")
    sh("ip", "link", "set", host_if, "up")
    mac = _mac_of(host_if)
    sh("ip", "-n", ns, "neigh", "replace", "169.254.1.1", "lladdr", mac, "dev", "eth0",
       "nud", "permanent")
    # the node has no address of its own to ARP from: pin the pod side too
    pod_mac = _mac_of("eth0", ns)
    for ip in ips:
        sh("ip", "neigh", "replace", ip, "lladdr", pod_mac, "dev", host_if, "nud", "permanent")
    for ip in ips:
        sh("ip", "route", "add", f"{ip}/32", "dev", host_if)
    if ip6:
        sh("ip", "-n", ns, "addr", "add", f"{ip6}/128", "dev", "eth0", "nodad")
        sh("ip", "-n", ns, "-6", "neigh", "replace", "fe80::1", "lladdr", mac, "dev", "eth0",
           "nud", "permanent")
        sh("ip", "-n", ns, "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0")
        sh("ip", "-6", "route", "add", f"{ip6}/128", "dev", host_if)
        sh("ip", "-6", "neigh", "replace", ip6, "lladdr", pod_mac, "dev", host_if, "nud", "permanent")
    return Pod(name, ns, host_if, ips, ip6=ip6)


@pytest.fixture(scope="module")
def topology() -> Iterator[Topology]:
    require_root("creates network namespaces and iptables rules")
    require_tools("iptables", "ipset", "ping")
    sfx = secrets.token_hex(2)
    uplink = _uplink()
    guard = f"AXIG-{sfx}"
    node = f"axi-p{os.getpid()}-{sfx}n"
    octet = 100 + secrets.randbelow(150)
    base = 8 * (1 + secrets.randbelow(28))
    made_ns: list[str] = []
    topo: Topology | None = None
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    entered = False
    try:
        # 1. the guard first: nothing of ours may leave through the uplink
        if uplink:
            sh("iptables", "-N", guard)
            for rule in (f"-s 10.244.0.0/16 -o {uplink} -j DROP",
                         f"-s 198.51.100.0/24 -o {uplink} -j DROP"):
                sh("iptables", "-A", guard, *rule.split())
            sh("iptables", "-I", "FORWARD", "1", "-j", guard)
        # 2. the node namespace; this thread (and what it forks) moves in
        made_ns.append(node)
        _testnet.add_netns(node)
        fd = os.open(f"/run/netns/{node}", os.O_RDONLY)
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
            entered = True
        finally:
            os.close(fd)
        sh("ip", "link", "set", "lo", "up")
        sh("sysctl", "-qw", "net.ipv4.ip_forward=1")
        sh("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        pods = {}
        for i, name in enumerate("abc", start=1):
            ns, hif = f"axi-p{os.getpid()}-{sfx}{name}", f"axh{sfx}{name}"
            made_ns.append(ns)
            pods[name] = _make_pod(name, ns, hif, [f"10.244.{octet}.{i}"], f"fd00:244:{octet}::{i}")
        wips = [f"198.51.100.{base + k}" for k in (0, 1, 2, 4)]
        made_ns.append(f"axi-p{os.getpid()}-{sfx}w")
        world = _make_pod("w", f"axi-p{os.getpid()}-{sfx}w", f"axh{sfx}w", wips)
        # 3. every probe target routes through our veths
        for pod in [*pods.values(), world]:
            for ip in pod.ips:
                route = sh("ip", "route", "get", ip)
                assert f"dev {pod.host_if}" in route, route
        topo = Topology(sfx, pods, world, uplink, guard)
        for pod in [*pods.values(), world]:
            topo.servers.append(Servers(pod.netns))
        yield topo
    finally:
        if topo is not None:
            for s in topo.servers:
                s.close()
        if entered:
            _libc.setns(home, CLONE_NEWNET)
        os.close(home)
        for ns in made_ns:  # veths go with their namespaces
            _testnet.del_netns(ns)
        if uplink:
            sh("iptables", "-D", "FORWARD", "-j", guard, check=False)
            sh("iptables", "-F", guard, check=False)
            sh("iptables", "-X", guard, check=False)


@pytest.fixture
def stray_pod(topology: Topology) -> Iterator[Pod]:
    """A pod wired like the others (our host veth name, a pod address) that no
    endpoint stands for: removed with its netns (the veth, route and
    neighbour entries go with it)."""
    octet = topology.pods["a"].ip.split(".")[2]
    ns = f"axi-p{os.getpid()}-{topology.suffix}d"
    servers = None
    try:
        pod = _make_pod("d", ns, f"axh{topology.suffix}d", [f"10.244.{octet}.4"])
        servers = Servers(ns)
        yield pod
    finally:
        if servers is not None:
            servers.close()
        _testnet.del_netns(ns)
