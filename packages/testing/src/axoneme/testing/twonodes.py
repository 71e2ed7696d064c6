"""Two nodes on one machine for kernel tests, without Kubernetes.

Each node is a network namespace of ours running its own `axoneme agent`
(standalone: its own state dir, API socket, bpffs root and pod CIDR) with
pods of its own; the nodes reach each other over a bridge of ours in a third
namespace (the wire, 10.255.252.0/24), and node b also has an "outside"
peer (198.51.100.2, a fourth namespace behind a veth, node b being
198.51.100.1). Routes between the pod CIDRs are made here, in the shape
the agent's routing makes them (``_noderoutes``):

- native: ``<other pod CIDR> via <other node>``;
- tunnel: the VXLAN device ``axon_vxlan`` (UDP 8472), collect_md
  (``external``, for a datapath that sets the VNI itself) or plain (VNI 1,
  FDB entries), a route ``<other pod CIDR> via <other node> dev axon_vxlan
  onlink`` and a permanent neighbour.

The agents are run (``nsenter --net``: the pods' netns mounts stay visible),
never imported. Nothing touches the machine's own network: every address
lives in these namespaces, which go (with their links, tc filters and
chains) in ``close``; the pinned maps go with ``agent cleanup`` and the bpffs
directories are removed.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from axoneme.testing.capability import lacks_root, lacks_tools
from axoneme.testing.netns import add_netns, del_netns

AX = str(Path(sys.executable).with_name("axoneme"))
WIRE_NET = "10.255.252"
OUTSIDE_NODE_IP, OUTSIDE_PEER_IP = "198.51.100.1", "198.51.100.2"
VXLAN = "axon_vxlan"
VXLAN_PORT = 8472
# argv: HOST PORT; prints "open" or "closed <why>" (one TCP connect, 1.5 s)
TCP_PROBE = textwrap.dedent("""\
    import socket, sys
    try:
        socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1.5).close()
        print("open")
    except OSError as e:
        print("closed", e)
""")

# argv: PORT; an HTTP server answering every GET with 200 "served <path>"
HTTP_SERVER = textwrap.dedent("""\
    import http.server, sys
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"served " + self.path.encode()
            self.send_response(200); self.send_header("Content-Length", str(len(body)))
            self.end_headers(); self.wfile.write(body)
        def log_message(self, *a):
            pass
    http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), H).serve_forever()
""")
# argv: URL; prints "<status> <body>" (0 and the error when no answer came, 3 s)
HTTP_GET = textwrap.dedent("""\
    import sys, urllib.error, urllib.request
    try:
        r = urllib.request.urlopen(sys.argv[1], timeout=3)
        print(r.status, r.read().decode())
    except urllib.error.HTTPError as e:
        print(e.code, e.read().decode(errors="replace")[:80])
    except OSError as e:
        print(0, e)
""")


def http_status(out: str) -> tuple[int, str]:
    """(status, body) of what ``HTTP_GET`` printed."""
    code, _, body = out.strip().partition(" ")
    return int(code or 0), body


def vtep_mac(ip: str) -> str:
    """The VXLAN device MAC of a node (as _routing.vtep_mac)."""
    return "0e:ae:" + ":".join(f"{int(b):02x}" for b in ip.split("."))


def in_netns(netns: str) -> list[str]:
    """Enter only the network namespace (``ip netns exec`` would also give the
    process a mount namespace of its own, hiding the pod namespaces it mounts)."""
    return ["nsenter", f"--net=/run/netns/{netns}"]


def sh(*argv: str, netns: str | None = None, check: bool = True,
       env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    full = (in_netns(netns) if netns else []) + list(argv)
    proc = subprocess.run(full, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(full)}: {proc.stdout}{proc.stderr}")
    return proc


@dataclass
class Node:
    name: str
    netns: str
    ip: str
    pod_cidr: str
    tmp: Path
    bpffs: str
    agent: subprocess.Popen[bytes] | None = None
    started: list[str] = field(default_factory=list)  # datapaths run here (cleanup)

    def env(self) -> dict[str, str]:
        return {**os.environ, "AXONEME_API_SOCKET": str(self.tmp / "api.sock")}

    def ax(self, *args: str, check: bool = True,
           timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return sh(AX, *args, netns=self.netns, check=check, env=self.env(), timeout=timeout)

    def log(self) -> str:
        try:
            return (self.tmp / "agent.log").read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def start(self, datapath: str = "ebpf", mode: str = "", *extra: str) -> None:
        """The agent, once it answers (``extra``: more `agent run` flags)."""
        cmd = [AX, "agent", "run", "--datapath", datapath, "--state-dir",
               str(self.tmp / "state"), "--api-socket", str(self.tmp / "api.sock"),
               "--bpffs-root", self.bpffs, "--pod-cidr", self.pod_cidr, "--no-guard",
               "--hubble-socket-path", "", *(["--datapath-opt", f"mode={mode}"] if mode else []),
               *extra]
        self.agent = subprocess.Popen([*in_netns(self.netns), *cmd],
                                      stdout=(self.tmp / "agent.log").open("ab"),
                                      stderr=subprocess.STDOUT, env=self.env())
        self.started.append(datapath)
        deadline = time.monotonic() + 120
        while self.ax("status", check=False).returncode != 0:
            assert self.agent.poll() is None and time.monotonic() < deadline, self.log()
            time.sleep(0.3)

    def stop(self) -> None:
        if self.agent is None:
            return
        self.agent.terminate()
        try:
            self.agent.wait(30)
        except subprocess.TimeoutExpired:
            self.agent.kill()
            self.agent.wait()
        self.agent = None

    def pod(self, name: str, labels: str, *cmd: str) -> dict[str, object]:
        """Run a pod (default command: sleep) and return its endpoint record
        (`endpoint list -o json`: id, identity, ipv4, ...)."""
        self.ax("pod", "run", name, "--labels", labels, "--", *(cmd or ("sleep", "900")))
        for ep in json.loads(self.ax("endpoint", "list", "-o", "json").stdout):
            if ep.get("pod") in (name, f"default/{name}"):
                return dict(ep)
        raise AssertionError(f"no endpoint for pod {name} on node {self.name}")

    def exec(self, pod: str, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self.ax("pod", "exec", pod, "--", *cmd, check=False, timeout=timeout)


class TwoNodes:
    """Nodes ``a`` (10.255.252.1, pods 10.244.100.0/24) and ``b`` (.2,
    10.244.101.0/24), the wire, and the outside peer behind node b."""

    def __init__(self, tmp: Path) -> None:
        self.tag = secrets.token_hex(3)
        self.wire = f"axtn-{self.tag}-w"
        self.outside = f"axtn-{self.tag}-o"
        self.made: list[str] = []
        self.a = self._node("a", 1, tmp)
        self.b = self._node("b", 2, tmp)

    def _node(self, name: str, n: int, tmp: Path) -> Node:
        d = tmp / name
        d.mkdir(parents=True, exist_ok=True)
        return Node(name, f"axtn-{self.tag}-{name}", f"{WIRE_NET}.{n}", f"10.244.{99 + n}.0/24",
                    d, f"/sys/fs/bpf/axtn-{self.tag}-{name}")

    def setup(self) -> None:
        add_netns(self.wire)
        self.made.append(self.wire)
        sh("ip", "-n", self.wire, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.wire, "link", "set", "br0", "up")
        for node in (self.a, self.b):
            add_netns(node.netns)
            self.made.append(node.netns)
            sh("ip", "-n", self.wire, "link", "add", f"w{node.name}", "type", "veth", "peer",
               "name", "und0", "netns", node.netns)
            sh("ip", "-n", self.wire, "link", "set", f"w{node.name}", "master", "br0", "up")
            sh("ip", "-n", node.netns, "addr", "add", f"{node.ip}/24", "dev", "und0")
            sh("ip", "-n", node.netns, "link", "set", "und0", "up")
            sh("sysctl", "-qw", "net.ipv4.ip_forward=1", netns=node.netns)
        add_netns(self.outside)
        self.made.append(self.outside)
        sh("ip", "-n", self.b.netns, "link", "add", "out0", "type", "veth", "peer", "name",
           "eth0", "netns", self.outside)
        sh("ip", "-n", self.b.netns, "addr", "add", f"{OUTSIDE_NODE_IP}/24", "dev", "out0")
        sh("ip", "-n", self.b.netns, "link", "set", "out0", "up")
        sh("ip", "-n", self.outside, "addr", "add", f"{OUTSIDE_PEER_IP}/24", "dev", "eth0")
        sh("ip", "-n", self.outside, "link", "set", "eth0", "up")
        sh("ip", "-n", self.outside, "route", "add", self.b.pod_cidr, "via", OUTSIDE_NODE_IP)

    def route(self, mode: str, external: bool = False) -> None:
        """Routes between the pod CIDRs: ``native`` or ``tunnel`` (``external``:
        a collect_md VXLAN device)."""
        for me, other in ((self.a, self.b), (self.b, self.a)):
            ns = me.netns
            sh("ip", "-n", ns, "link", "del", VXLAN, check=False)
            sh("ip", "-n", ns, "route", "del", other.pod_cidr, check=False)
            if mode == "native":
                sh("ip", "-n", ns, "route", "add", other.pod_cidr, "via", other.ip)
                continue
            vni = ["external"] if external else ["id", "1"]
            sh("ip", "-n", ns, "link", "add", VXLAN, "address", vtep_mac(me.ip), "mtu", "1450",
               "type", "vxlan", *vni, "local", me.ip, "dstport", str(VXLAN_PORT), "nolearning")
            for key, value in (("rp_filter", "0"), ("forwarding", "1")):
                sh("sysctl", "-qw", f"net.ipv4.conf.{VXLAN}.{key}={value}", netns=ns)
            sh("ip", "-n", ns, "link", "set", VXLAN, "up")
            if not external:
                sh("bridge", "-n", ns, "fdb", "replace", vtep_mac(other.ip), "dev", VXLAN, "dst",
                   other.ip, "self", "permanent")
            sh("ip", "-n", ns, "neigh", "replace", other.ip, "lladdr", vtep_mac(other.ip), "dev",
               VXLAN, "nud", "permanent")
            sh("ip", "-n", ns, "route", "add", other.pod_cidr, "via", other.ip, "dev", VXLAN,
               "onlink")

    def close(self) -> None:
        for node in (self.a, self.b):
            node.stop()
            if node.started:  # its pods' namespaces, tc filters, pinned maps, chains
                sh(AX, "agent", "cleanup", "--state-dir", str(node.tmp / "state"),
                   netns=node.netns, check=False, env=node.env())
        for ns in reversed(self.made):  # their links, routes, tc filters and chains go too
            del_netns(ns)
        for node in (self.a, self.b):
            shutil.rmtree(node.bpffs, ignore_errors=True)
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert self.tag not in left, left


@contextmanager
def two_nodes(tmp: Path) -> Iterator[TwoNodes]:
    """``TwoNodes`` set up, and closed on the way out, success or failure (a
    test without root or the tools is skipped, saying which)."""
    why = lacks_root() or lacks_tools("ip", "bridge", "nsenter", "sysctl")
    if why:
        pytest.skip(why)
    net = TwoNodes(tmp)
    try:
        net.setup()
        yield net
    finally:
        net.close()
