"""Privileged: the DNS proxy behind a real TPROXY redirect, in network namespaces.

Topology (all namespaces created here, all removed at the end)::

    client netns C            router netns R                 world netns W
    10.244.77.2 ---- veth ---- 10.244.77.1   198.51.100.1 ---- veth ---- 198.51.100.53
    resolv.conf ->             mangle: MARK + TPROXY udp/tcp 53          dnslib server
    198.51.100.53              -> DnsProxy (transparent) on :PORT         (api.twitter.com ...)
                               ip rule fwmark 0x200/0xf00 lookup T
                               ip route local 0.0.0.0/0 dev lo table T

R plays the node (Cilium's mechanism: the datapath marks, TPROXY diverts to
the proxy port, a policy route delivers locally). Nothing has a route out
of these namespaces: C routes only 198.51.100.0/24 via R, R has no default
route, W routes only 10.244.0.0/16 back; the test asserts ``ip route get``
to a public address fails in C and R before any probe, so no forwarding
guard on the host is needed (the host netns is never touched).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from axoneme.core.marks import (
    MARK_TO_PROXY_MASK,
    PROXY_ROUTE_TABLE,
    TPROXY_MARK,
    TPROXY_MASK,
    to_proxy_mark,
)

pytestmark = pytest.mark.privileged

HERE = Path(__file__).parent
# the repository's netns helpers (tests/_testnet.py): every netns gets its own resolv.conf
sys.path.insert(0, str(HERE.resolve().parents[2] / "tests"))
import _testnet  # noqa: E402

PY = sys.executable
RESOLVER = "198.51.100.53"


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (netns, iptables TPROXY)")
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool}")


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)}: {proc.stderr.strip()}")
    return proc


def nsx(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return sh("ip", "netns", "exec", ns, *args, check=check)


def _readline(proc: subprocess.Popen[str], want: str, timeout: float = 15) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise AssertionError(f"process exited: {proc.stderr.read()}")  # type: ignore[union-attr]
        if line.startswith(want):
            return line
    raise AssertionError(f"no {want!r} line")


@pytest.fixture
def topo():
    _need_root()
    sfx = secrets.token_hex(3)
    c, r, w = f"axdc-{sfx}", f"axdr-{sfx}", f"axdw-{sfx}"
    port = 20000 + secrets.randbelow(20000)
    table = str(PROXY_ROUTE_TABLE)  # private to R's netns
    procs: list[subprocess.Popen[str]] = []
    etc = Path("/etc/netns") / c
    try:
        for ns in (c, r, w):
            _testnet.add_netns(ns)
        sh("ip", "link", "add", f"c{sfx}", "netns", c, "type", "veth", "peer", "name",
           f"rc{sfx}", "netns", r)
        sh("ip", "link", "add", f"w{sfx}", "netns", w, "type", "veth", "peer", "name",
           f"rw{sfx}", "netns", r)
        nsx(c, "ip", "addr", "add", "10.244.77.2/24", "dev", f"c{sfx}")
        nsx(c, "ip", "link", "set", f"c{sfx}", "up")
        nsx(c, "ip", "route", "add", "198.51.100.0/24", "via", "10.244.77.1")
        nsx(r, "ip", "addr", "add", "10.244.77.1/24", "dev", f"rc{sfx}")
        nsx(r, "ip", "addr", "add", "198.51.100.1/24", "dev", f"rw{sfx}")
        nsx(r, "ip", "link", "set", f"rc{sfx}", "up")
        nsx(r, "ip", "link", "set", f"rw{sfx}", "up")
        nsx(r, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        nsx(w, "ip", "addr", "add", f"{RESOLVER}/24", "dev", f"w{sfx}")
        nsx(w, "ip", "link", "set", f"w{sfx}", "up")
        nsx(w, "ip", "route", "add", "10.244.0.0/16", "via", "198.51.100.1")
        # safety: nothing routes out of the namespaces
        for ns in (c, r):
            assert nsx(ns, "ip", "route", "get", "8.8.8.8", check=False).returncode != 0
        # the redirect, as the agent + datapath would do it (in R only)
        mark = f"{to_proxy_mark(port):#x}"
        chain = f"AXDNS-{sfx}"
        nsx(r, "iptables", "-w", "5", "-t", "mangle", "-N", chain)
        nsx(r, "iptables", "-w", "5", "-t", "mangle", "-A", "PREROUTING", "-i", f"rc{sfx}",
            "-j", chain)
        for proto in ("udp", "tcp"):
            # the "datapath": mark DNS from the pod for the proxy port
            nsx(r, "iptables", "-w", "5", "-t", "mangle", "-A", chain, "-p", proto,
                "--dport", "53", "-j", "MARK", "--set-xmark", f"{mark}/0xffffffff")
            nsx(r, "iptables", "-w", "5", "-t", "mangle", "-A", chain, "-p", proto, "-m",
                "mark", "--mark", f"{mark}/{MARK_TO_PROXY_MASK:#x}", "-j", "TPROXY",
                "--on-port", str(port), "--on-ip", "0.0.0.0",
                "--tproxy-mark", f"{TPROXY_MARK:#x}/{TPROXY_MASK:#x}")
        nsx(r, "ip", "rule", "add", "fwmark", f"{TPROXY_MARK:#x}/{TPROXY_MASK:#x}",
            "lookup", table)
        nsx(r, "ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", table)
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text(f"nameserver {RESOLVER}\noptions timeout:2 attempts:1\n")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        up = subprocess.Popen(["ip", "netns", "exec", w, PY, str(HERE / "dns_upstream.py"),
                               RESOLVER, "53"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env)
        procs.append(up)
        _readline(up, "READY")
        proxy = subprocess.Popen(["ip", "netns", "exec", r, PY,
                                  str(HERE / "dns_tproxy_runner.py"), str(port), RESOLVER],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env=env)
        procs.append(proxy)
        _readline(proxy, "READY")
        yield {"client": c, "router": r, "world": w, "port": port, "upstream": up,
               "proxy": proxy}
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
        for ns in (c, r, w):
            _testnet.del_netns(ns)


CLIENT_SCRIPT = r"""
import socket, struct, sys
from dnslib import DNSRecord
ns = [l.split()[1] for l in open('/etc/resolv.conf') if l.startswith('nameserver')][0]
name, proto = sys.argv[1], sys.argv[2]
q = DNSRecord.question(name).pack()
if proto == 'udp':
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
    s.sendto(q, (ns, 53)); data, peer = s.recvfrom(65535)
    assert peer == (ns, 53), peer  # the reply comes from the resolver's address
else:
    s = socket.create_connection((ns, 53), timeout=3)
    s.sendall(struct.pack('!H', len(q)) + q)
    n = struct.unpack('!H', s.recv(2, socket.MSG_WAITALL))[0]
    data = s.recv(n, socket.MSG_WAITALL)
r = DNSRecord.parse(data)
print(r.header.rcode, ' '.join(str(x.rdata) for x in r.rr))
"""


def ask(topo, name: str, proto: str = "udp") -> tuple[int, list[str]]:
    out = nsx(topo["client"], PY, "-c", CLIENT_SCRIPT, name, proto).stdout.split()
    return int(out[0]), out[1:]


def test_tproxy_dns_proxy_in_netns(topo):
    # a real stub resolver (glibc via /etc/netns/<c>/resolv.conf) gets the answer
    got = nsx(topo["client"], "getent", "ahostsv4", "api.twitter.com")
    assert "198.51.100.10" in got.stdout
    assert ask(topo, "sub.example.com") == (0, ["198.51.100.12"])
    assert ask(topo, "sub.example.com", "tcp") == (0, ["198.51.100.12"])
    assert ask(topo, "kubernetes.io") == (5, [])
    assert ask(topo, "example.com", "tcp") == (5, [])
    assert nsx(topo["client"], "getent", "ahostsv4", "kubernetes.io",
               check=False).returncode != 0

    proxy = topo["proxy"]
    proxy.send_signal(signal.SIGTERM)
    out, err = proxy.communicate(timeout=10)
    flows = [json.loads(line[5:]) for line in out.splitlines() if line.startswith("FLOW ")]
    cache = json.loads(next(line[6:] for line in out.splitlines() if line.startswith("CACHE ")))
    topo["upstream"].send_signal(signal.SIGTERM)
    up_out, _ = topo["upstream"].communicate(timeout=10)
    seen = [line.split()[1] for line in up_out.splitlines() if line.startswith("QUERY ")]

    # only allowed names reached the outside resolver
    assert set(seen) == {"api.twitter.com.", "sub.example.com."}
    # the proxy saw the original destination (the pod's resolver) and the pod's address
    requests = [f for f in flows if f["l7"]["type"] == "REQUEST"]
    assert {f["IP"]["destination"] for f in requests} == {RESOLVER}
    assert {f["IP"]["source"] for f in requests} == {"10.244.77.2"}
    dropped = {f["l7"]["dns"]["query"] for f in flows if f["verdict"] == "DROPPED"}
    assert dropped == {"kubernetes.io.", "example.com."}
    learned = {(e["name"], e["ip"]) for e in cache["entries"]}
    assert ("api.twitter.com.", "198.51.100.10") in learned
    assert ("sub.example.com.", "198.51.100.12") in learned
    assert not any(n == "kubernetes.io." for n, _ in learned)
