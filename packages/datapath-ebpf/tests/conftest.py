"""Fixtures for the ebpf datapath's kernel tests: netns "pods", an outside host,
the forwarding guard, and a started EbpfDatapath on a private bpffs dir.

Every object gets a random suffix and is removed on success and failure.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import pytest
from axoneme.testing import netns as _testnet  # every netns gets its own resolv.conf
from axoneme.testing.capability import require_bpffs, require_root

PY = sys.executable

SERVER = textwrap.dedent('''
    import socket, sys, threading
    tcp_ports = [int(p) for p in sys.argv[1].split(",") if p]
    udp_ports = [int(p) for p in sys.argv[2].split(",") if p]
    def tcp(port):
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port)); s.listen(128)
        while True:
            c, _ = s.accept()
            threading.Thread(target=echo, args=(c,), daemon=True).start()
    def echo(c):
        try:
            while True:
                d = c.recv(4096)
                if not d:
                    break
                c.sendall(d)
        except OSError:
            pass
        c.close()
    def udp(port):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", port))
        while True:
            d, a = s.recvfrom(4096); s.sendto(d, a)
    for p in tcp_ports:
        threading.Thread(target=tcp, args=(p,), daemon=True).start()
    for p in udp_ports:
        threading.Thread(target=udp, args=(p,), daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()
''')

PROBE = textwrap.dedent('''
    import socket, sys
    kind, host, port, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    try:
        if kind == "tcp":
            s = socket.create_connection((host, port), timeout=timeout)
            s.sendall(b"ping"); s.settimeout(timeout)
            ok = s.recv(16) == b"ping"
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(timeout)
            s.sendto(b"ping", (host, port)); ok = s.recvfrom(16)[0] == b"ping"
    except OSError:
        ok = False
    sys.exit(0 if ok else 1)
''')

# A long-lived TCP client: each stdin line sends one message, prints ok/fail.
CLIENT = textwrap.dedent('''
    import socket, sys
    host, port = sys.argv[1], int(sys.argv[2])
    s = socket.create_connection((host, port), timeout=1.0)
    print("connected", flush=True)
    for line in sys.stdin:
        try:
            s.settimeout(1.0); s.sendall(b"m"); ok = s.recv(16) == b"m"
        except OSError:
            ok = False
        print("ok" if ok else "fail", flush=True)
''')


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


@dataclass
class Pod:
    name: str
    netns: str
    host_if: str
    ip: str
    ifindex: int = 0
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    def exec(self, *cmd: str, timeout: float = 10) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.netns, *cmd], capture_output=True,
                              text=True, timeout=timeout)

    def serve(self, tmp: str, tcp: list[int], udp: list[int]) -> None:
        path = os.path.join(tmp, "server.py")
        with open(path, "w") as f:
            f.write(SERVER)
        p = subprocess.Popen(["ip", "netns", "exec", self.netns, PY, path,
                              ",".join(map(str, tcp)), ",".join(map(str, udp))],
                             stdout=subprocess.PIPE, text=True)
        self.procs.append(p)
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"

    def tcp(self, tmp: str, host: str, port: int, timeout: float = 1.0) -> bool:
        return self._probe(tmp, "tcp", host, port, timeout)

    def udp(self, tmp: str, host: str, port: int, timeout: float = 1.0) -> bool:
        return self._probe(tmp, "udp", host, port, timeout)

    def _probe(self, tmp: str, kind: str, host: str, port: int, timeout: float) -> bool:
        path = os.path.join(tmp, "probe.py")
        if not os.path.exists(path):
            with open(path, "w") as f:
                f.write(PROBE)
        return self.exec(PY, path, kind, host, str(port), str(timeout)).returncode == 0

    def ping(self, host: str) -> bool:
        return self.exec("ping", "-c1", "-W1", host).returncode == 0

    def client(self, tmp: str, host: str, port: int) -> subprocess.Popen[str]:
        path = os.path.join(tmp, "client.py")
        with open(path, "w") as f:
            f.write(CLIENT)
        p = subprocess.Popen(["ip", "netns", "exec", self.netns, PY, path, host, str(port)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.procs.append(p)
        return p


def client_send(p: subprocess.Popen[str]) -> bool:
    assert p.stdin is not None and p.stdout is not None
    p.stdin.write("x\n")
    p.stdin.flush()
    return p.stdout.readline().strip() == "ok"


@dataclass
class Topology:
    suffix: str
    pods: dict[str, Pod]
    outside: Pod
    tmp: str

    # helpers as attributes: test modules cannot import conftest (importlib mode)
    @staticmethod
    def client_send(p: subprocess.Popen[str]) -> bool:
        return client_send(p)

    @staticmethod
    def wait_for(pred, timeout: float = 3.0, interval: float = 0.05):  # type: ignore[no-untyped-def]
        return wait_for(pred, timeout, interval)


def _uplink() -> str:
    out = run("ip", "-o", "route", "show", "default").stdout.split()
    return out[out.index("dev") + 1] if "dev" in out else ""


def _add_veth_ns(ns: str, host_if: str, ip: str) -> int:
    _testnet.add_netns(ns)
    run("ip", "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ns)
    run("ip", "link", "set", host_if, "up")
    run("sysctl", "-qw", f"net.ipv4.conf.{host_if}.proxy_arp=1")
    run("ip", "-n", ns, "link", "set", "lo", "up")
    run("ip", "-n", ns, "link", "set", "eth0", "up")
    run("ip", "-n", ns, "addr", "add", f"{ip}/32", "dev", "eth0")
    run("ip", "-n", ns, "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link")
    run("ip", "-n", ns, "route", "add", "default", "via", "169.254.1.1", "dev", "eth0")
    host_mac = open(f"/sys/class/net/{host_if}/address").read().strip()
    run("ip", "-n", ns, "neigh", "replace", "169.254.1.1", "lladdr", host_mac, "dev", "eth0")
    pod_mac = run("ip", "-n", ns, "-o", "link", "show", "eth0").stdout.split("link/ether")[1].split()[0]
    run("ip", "route", "add", f"{ip}/32", "dev", host_if)
    run("ip", "neigh", "replace", ip, "lladdr", pod_mac, "dev", host_if)
    return int(open(f"/sys/class/net/{host_if}/ifindex").read())


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    require_root("creates netns, veths, tc filters and BPF maps")
    sfx = uuid.uuid4().hex[:5]
    tmp = str(tmp_path_factory.mktemp(f"axebpf{sfx}"))
    net = random.randint(100, 250)
    chain = f"AXG{sfx}"
    uplink = _uplink()
    pods: dict[str, Pod] = {}
    outside = Pod("outside", f"axo-p{os.getpid()}-{sfx}", f"axo{sfx}", f"198.51.100.{random.randint(100, 250)}")
    created_ns: list[str] = []
    created_links: list[str] = []
    guard = False
    try:
        # guard first: pod traffic never leaves through the uplink
        run("iptables", "-N", chain)
        guard = True
        if uplink:
            run("iptables", "-A", chain, "-s", "10.244.0.0/16", "-o", uplink, "-j", "DROP")
        run("iptables", "-I", "FORWARD", "1", "-j", chain)
        run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        for i, name in enumerate(("a", "b", "c")):
            pod = Pod(name, f"axp-p{os.getpid()}-{sfx}{name}", f"axh{sfx}{name}", f"10.244.{net}.{10 + i}")
            created_ns.append(pod.netns)
            created_links.append(pod.host_if)
            pod.ifindex = _add_veth_ns(pod.netns, pod.host_if, pod.ip)
            pods[name] = pod
        created_ns.append(outside.netns)
        created_links.append(outside.host_if)
        outside.ifindex = _add_veth_ns(outside.netns, outside.host_if, outside.ip)
        # never probe anything that would route out of the uplink
        for p in (*pods.values(), outside):
            dev = run("ip", "-o", "route", "get", p.ip).stdout
            assert f"dev {p.host_if}" in dev, dev
        yield Topology(sfx, pods, outside, tmp)
    finally:
        for p in (*pods.values(), outside):
            for proc in p.procs:
                proc.kill()
                proc.wait(timeout=5)
        for link in created_links:
            run("ip", "link", "del", link, check=False)
        for ns in created_ns:
            _testnet.del_netns(ns)
        for p in pods.values():
            run("ip", "route", "del", f"{p.ip}/32", check=False)
        if guard:
            run("iptables", "-D", "FORWARD", "-j", chain, check=False)
            run("iptables", "-F", chain, check=False)
            run("iptables", "-X", chain, check=False)


@pytest.fixture(scope="session")
def start_ebpf() -> Callable[..., AbstractContextManager[Any]]:
    """``with start_ebpf(**DatapathConfig fields) as dp``: a started
    EbpfDatapath pinning under a private bpffs dir (skips without root);
    afterwards its kernel objects are cleaned up and the dir removed."""

    @contextlib.contextmanager
    def start(**config: Any) -> Iterator[Any]:
        require_bpffs()  # loads BPF programs and pins maps
        from axoneme.core.datapath import DatapathConfig
        from axoneme.datapath.ebpf import EbpfDatapath

        root = f"/sys/fs/bpf/axoneme-test-{uuid.uuid4().hex[:8]}"
        dp = EbpfDatapath(DatapathConfig(bpffs_root=root, **config))
        try:
            dp.start()
            yield dp
        finally:
            dp.cleanup()
            shutil.rmtree(root, ignore_errors=True)

    return start


@pytest.fixture
def bpffs_dir() -> Iterator[str]:
    """A private pin directory, removed afterwards."""
    require_bpffs()  # pins BPF maps
    path = f"/sys/fs/bpf/axoneme-test-{uuid.uuid4().hex[:8]}"
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def wait_for(pred, timeout: float = 3.0, interval: float = 0.05):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() > deadline:
            return v
        time.sleep(interval)
