"""Node routing on the real kernel, without Kubernetes: two "nodes" as network
namespaces of ours joined by a bridge of ours (in a third namespace, so the
host's own network is never involved), each with a pod namespace behind a
veth as the agent wires pods (the pod's /32, a permanent gateway neighbour,
the node's /32 route to the pod). ``NodeRouting`` runs for each node in its
namespace (``ip -n``) and pods talk across nodes in native and in tunnel
mode; a node removed takes its routes and FDB entries with it; cleanup
leaves nothing.

Address plan: node network 10.255.252.0/24 (only inside these namespaces),
pods 10.244.100.0/24 (node a) and 10.244.101.0/24 (node b).
"""

from __future__ import annotations

import ipaddress
import json
import secrets
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from axoneme.agent._noderoutes import NodeRouting, RoutingService
from axoneme.agent._routing import (
    ROUTE_PROTO,
    VXLAN_DEVICE,
    NodeInfo,
    desired_state,
    vtep_mac,
)
from axoneme.testing.capability import lacks_root, lacks_tools
from axoneme.testing.netns import add_netns, del_netns

pytestmark = [pytest.mark.privileged]

GATEWAY = "169.254.1.1"
NODE_NET = "10.255.252.0/24"


@dataclass
class Node:
    name: str
    netns: str
    pod_netns: str
    ip: str
    pod_cidr: str
    pod_ip: str

    @property
    def info(self) -> NodeInfo:
        return NodeInfo(self.name, ipaddress.IPv4Address(self.ip),
                        ipaddress.IPv4Network(self.pod_cidr))


def sh(*argv: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    full = (["ip", "netns", "exec", netns] if netns else []) + list(argv)
    proc = subprocess.run(full, capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(full)}: {proc.stderr.strip()}")
    return proc


def _make_node(wire: str, tag: str, name: str, ip: str, pod_cidr: str, pod_ip: str) -> Node:
    node = Node(name, f"axrn-{tag}-{name}", f"axrp-{tag}-{name}", ip, pod_cidr, pod_ip)
    add_netns(node.netns)
    add_netns(node.pod_netns)
    # the node's "uplink": a veth to the wire bridge
    sh("ip", "-n", wire, "link", "add", f"w{name}", "type", "veth", "peer", "name", "und0",
       "netns", node.netns)
    sh("ip", "-n", wire, "link", "set", f"w{name}", "master", "br0", "up")
    sh("ip", "-n", node.netns, "addr", "add", f"{ip}/24", "dev", "und0")
    sh("ip", "-n", node.netns, "link", "set", "und0", "up")
    sh("sysctl", "-qw", "net.ipv4.ip_forward=1", netns=node.netns)
    # the pod, wired as the agent wires it (_netlink.setup_endpoint)
    sh("ip", "-n", node.netns, "link", "add", "lxc0", "type", "veth", "peer", "name", "eth0",
       "netns", node.pod_netns)
    sh("ip", "-n", node.netns, "link", "set", "lxc0", "up")
    host_mac = json.loads(sh("ip", "-j", "-n", node.netns, "link", "show", "lxc0").stdout)[0][
        "address"]
    sh("ip", "-n", node.pod_netns, "addr", "add", f"{pod_ip}/32", "dev", "eth0")
    sh("ip", "-n", node.pod_netns, "link", "set", "eth0", "up")
    sh("ip", "-n", node.pod_netns, "route", "add", GATEWAY, "dev", "eth0", "scope", "link")
    sh("ip", "-n", node.pod_netns, "route", "add", "default", "via", GATEWAY, "dev", "eth0")
    sh("ip", "-n", node.pod_netns, "neigh", "replace", GATEWAY, "lladdr", host_mac, "dev", "eth0",
       "nud", "permanent")
    sh("ip", "-n", node.netns, "route", "add", f"{pod_ip}/32", "dev", "lxc0", "scope", "link")
    return node


@pytest.fixture
def nodes() -> Iterator[tuple[Node, Node]]:
    why = lacks_root() or lacks_tools("ip", "bridge", "sysctl", "ping")
    if why:
        pytest.skip(why)
    tag = secrets.token_hex(3)
    wire = f"axrw-{tag}"
    made = [wire]
    try:
        add_netns(wire)
        sh("ip", "-n", wire, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", wire, "link", "set", "br0", "up")
        a = _make_node(wire, tag, "a", "10.255.252.1", "10.244.100.0/24", "10.244.100.10")
        made += [a.netns, a.pod_netns]
        b = _make_node(wire, tag, "b", "10.255.252.2", "10.244.101.0/24", "10.244.101.10")
        made += [b.netns, b.pod_netns]
        yield a, b
    finally:
        for ns in reversed(made):  # the links and routes of each go with it
            del_netns(ns)
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert tag not in left


def ping(src: Node, dst: Node) -> bool:
    return sh("ping", "-c", "1", "-W", "1", dst.pod_ip, netns=src.pod_netns,
              check=False).returncode == 0


_TCP = textwrap.dedent("""\
    import socket, sys
    role, ip, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if role == "serve":
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((ip, port)); s.listen(1); print("ready", flush=True)
        c, peer = s.accept(); data = c.recv(100); c.sendall(data + b" from " + peer[0].encode())
        c.close()
    else:
        c = socket.create_connection((ip, port), timeout=3); c.sendall(b"hello")
        print(c.recv(200).decode())
""")


def tcp(src: Node, dst: Node, port: int = 8080) -> str:
    """One TCP exchange from src's pod to dst's pod; what the server answered."""
    server = subprocess.Popen(["ip", "netns", "exec", dst.pod_netns, sys.executable, "-c", _TCP,
                               "serve", dst.pod_ip, str(port)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        out = sh(sys.executable, "-c", _TCP, "connect", dst.pod_ip, str(port),
                 netns=src.pod_netns, check=False)
        return out.stdout.strip()
    finally:
        server.kill()
        server.wait(10)


def our_routes(node: Node) -> list[dict[str, object]]:
    out = sh("ip", "-j", "-n", node.netns, "-4", "route", "show", "proto", str(ROUTE_PROTO))
    return json.loads(out.stdout or "[]")


def device(node: Node) -> dict[str, object] | None:
    out = sh("ip", "-j", "-n", node.netns, "-s", "link", "show", VXLAN_DEVICE, check=False)
    return json.loads(out.stdout)[0] if out.returncode == 0 else None


def fdb(node: Node) -> list[dict[str, object]]:
    out = sh("bridge", "-j", "-n", node.netns, "fdb", "show", "dev", VXLAN_DEVICE, check=False)
    return [f for f in json.loads(out.stdout or "[]") if f.get("dst")] if out.returncode == 0 \
        else []


def route_all(mode: str, a: Node, b: Node) -> tuple[NodeRouting, NodeRouting]:
    ka, kb = NodeRouting(netns=a.netns), NodeRouting(netns=b.netns)
    for kernel, me in ((ka, a), (kb, b)):
        problems = kernel.apply(desired_state(mode, me.info, [a.info, b.info]))
        assert problems == {}
    return ka, kb


def test_native_routing_pod_to_pod_across_nodes(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    assert not ping(a, b)  # no route yet: the node drops it
    ka, kb = route_all("native", a, b)
    assert [(r["dst"], r["gateway"]) for r in our_routes(a)] == [(b.pod_cidr, b.ip)]
    assert device(a) is None  # native: no tunnel device
    assert ping(a, b) and ping(b, a)
    assert tcp(a, b) == f"hello from {a.pod_ip}"  # the pod's own address, no NAT
    # idempotent: the same state again changes nothing and keeps traffic flowing
    before = our_routes(a)
    assert ka.apply(desired_state("native", a.info, [a.info, b.info])) == {}
    assert our_routes(a) == before and ping(a, b)
    # reconcile: node b deleted -> its route is gone on a, b's pods unreachable
    ka.apply(desired_state("native", a.info, [a.info]))
    assert our_routes(a) == [] and not ping(a, b)
    # cleanup: nothing of ours left on either node
    ka.cleanup()
    kb.cleanup()
    assert our_routes(a) == our_routes(b) == []


def test_tunnel_routing_pod_to_pod_across_nodes(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    ka, kb = route_all("tunnel", a, b)
    dev = device(a)
    assert dev is not None and dev["address"] == vtep_mac(ipaddress.IPv4Address(a.ip))
    assert int(dev["mtu"]) == 1450
    rp = sh("cat", f"/proc/sys/net/ipv4/conf/{VXLAN_DEVICE}/rp_filter", netns=a.netns).stdout
    assert rp.strip() == "0"
    assert [(r["dst"], r["gateway"], r["dev"]) for r in our_routes(a)] == \
        [(b.pod_cidr, b.ip, VXLAN_DEVICE)]
    assert [(f["mac"], f["dst"]) for f in fdb(a)] == [(vtep_mac(ipaddress.IPv4Address(b.ip)),
                                                       b.ip)]
    sent = int(device(a)["stats64"]["tx"]["packets"])  # type: ignore[index]
    got = int(device(b)["stats64"]["rx"]["packets"])  # type: ignore[index]
    assert ping(a, b) and ping(b, a)
    assert tcp(a, b) == f"hello from {a.pod_ip}"
    # the packets went through the tunnel devices, not routed on the wire
    assert int(device(a)["stats64"]["tx"]["packets"]) > sent  # type: ignore[index]
    assert int(device(b)["stats64"]["rx"]["packets"]) > got  # type: ignore[index]
    # without the tunnel the wire does not route pod addresses: switch b to
    # native while a stays tunnel -> a's packets reach b, b's replies cannot go
    # encapsulated; back to tunnel and it works again (the mode switch is exact)
    kb.apply(desired_state("native", b.info, [a.info, b.info]))
    assert device(b) is None and [r.get("dev") for r in our_routes(b)] == ["und0"]
    kb.apply(desired_state("tunnel", b.info, [a.info, b.info]))
    assert device(b) is not None and ping(a, b)
    # the agent's mtu lowered: the device is made again with it, traffic flows
    small = NodeRouting(netns=a.netns, mtu=1400)
    assert small.apply(desired_state("tunnel", a.info, [a.info, b.info])) == {}
    assert int(device(a)["mtu"]) == 1350 and ping(a, b)  # type: ignore[index]
    # reconcile: node b deleted on a -> its route, neighbour and FDB entry go
    ka.apply(desired_state("tunnel", a.info, [a.info]))
    assert our_routes(a) == [] and fdb(a) == [] and not ping(a, b)
    neigh = sh("ip", "-j", "-n", a.netns, "neigh", "show", "dev", VXLAN_DEVICE).stdout
    assert json.loads(neigh or "[]") == []
    # cleanup: no route, no device
    assert kb.cleanup() == 2  # b's route and its device
    ka.cleanup()
    for n in (a, b):
        assert our_routes(n) == [] and device(n) is None


def test_tunnel_device_is_collect_md_for_a_datapath_that_sets_the_vni(
        nodes: tuple[Node, Node]) -> None:
    """``external``: the device a datapath with ``tunnel_identity`` needs (it sets
    each packet's VNI and remote): collect_md, no FDB entries, the neighbour
    and route as in plain tunnel mode; a switch either way makes it again."""
    a, b = nodes

    def info(node: Node) -> dict[str, object]:
        out = sh("ip", "-d", "-j", "-n", node.netns, "link", "show", VXLAN_DEVICE).stdout
        return dict(json.loads(out)[0]["linkinfo"]["info_data"])

    ka = NodeRouting(netns=a.netns, external=True)
    assert ka.apply(desired_state("tunnel", a.info, [a.info, b.info])) == {}
    assert info(a).get("external") is True
    assert fdb(a) == []  # the datapath names the remote per packet
    neigh = json.loads(sh("ip", "-j", "-n", a.netns, "neigh", "show", "dev", VXLAN_DEVICE).stdout)
    assert [(n["dst"], n["lladdr"]) for n in neigh] == [(b.ip, vtep_mac(ipaddress.IPv4Address(b.ip)))]
    assert [(r["dst"], r["dev"]) for r in our_routes(a)] == [(b.pod_cidr, VXLAN_DEVICE)]
    ifindex = device(a)["ifindex"]  # type: ignore[index]
    assert ka.apply(desired_state("tunnel", a.info, [a.info, b.info])) == {}
    assert device(a)["ifindex"] == ifindex  # type: ignore[index]  # idempotent: not made again
    # the node's devices the agent names to the datapath: its address's and the tunnel
    svc = RoutingService("tunnel", "a", ka)
    svc.nodes = {"a": a.info, "b": b.info}
    named: list[list[str]] = []
    svc.devices_hook = named.append
    svc.reconcile()
    assert named == [["und0", VXLAN_DEVICE]] and svc.view()["node_devices"] == named[0]
    # a plain device (iptables: VNI 1 and FDB entries), then back
    assert NodeRouting(netns=a.netns).apply(desired_state("tunnel", a.info, [a.info, b.info])) == {}
    assert info(a).get("external", False) is False and info(a)["id"] == 1
    assert [f["dst"] for f in fdb(a)] == [b.ip]
    assert ka.apply(desired_state("tunnel", a.info, [a.info, b.info])) == {}
    assert info(a).get("external") is True and fdb(a) == []
    ka.cleanup()
    assert device(a) is None and our_routes(a) == []


def test_foreign_routes_and_unreachable_nodes_are_left_alone(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    # a route of someone else's to a pod CIDR a node announces: never replaced
    sh("ip", "-n", a.netns, "route", "add", "blackhole", "10.244.102.0/24")
    c = NodeInfo("c", ipaddress.IPv4Address("10.255.252.3"), ipaddress.IPv4Network("10.244.102.0/24"))
    # a node whose address is not on a connected network: the kernel refuses the route
    d = NodeInfo("d", ipaddress.IPv4Address("10.255.99.4"), ipaddress.IPv4Network("10.244.103.0/24"))
    ka = NodeRouting(netns=a.netns)
    problems = ka.apply(desired_state("native", a.info, [a.info, b.info, c, d]))
    assert set(problems) == {"c", "d"}
    assert "not ours" in problems["c"]
    assert [r["dst"] for r in our_routes(a)] == [b.pod_cidr]
    routes = json.loads(sh("ip", "-j", "-n", a.netns, "route", "show", "10.244.102.0/24").stdout)
    assert [r.get("type") for r in routes] == ["blackhole"]
    assert ping(a, b) is False  # b has no route back: only a was routed
    # tunnel mode: a node reached through a gateway (here a route of a's) is not routed
    # either: its encapsulated packets would leave by that gateway
    sh("ip", "-n", a.netns, "route", "add", "10.255.99.0/24", "via", "10.255.252.254")
    e = NodeInfo("e", ipaddress.IPv4Address("10.255.99.5"), ipaddress.IPv4Network("10.244.105.0/24"))
    problems = ka.apply(desired_state("tunnel", a.info, [a.info, b.info, e]))
    assert set(problems) == {"e"} and "via 10.255.252.254" in problems["e"], problems
    assert [r["dst"] for r in our_routes(a)] == [b.pod_cidr]
    assert [f["dst"] for f in fdb(a)] == [b.ip]  # no FDB entry for a node not routed
    ka.cleanup()
    # ours by protocol but not a shape we make: removed; a default route: never touched
    sh("ip", "-n", a.netns, "route", "add", "10.244.200.0/24", "dev", "und0", "proto",
       str(ROUTE_PROTO))
    sh("ip", "-n", a.netns, "route", "add", "default", "via", "10.255.252.254", "proto",
       str(ROUTE_PROTO))
    ka.apply(desired_state("native", a.info, [a.info, b.info]))
    assert sorted(str(r["dst"]) for r in our_routes(a)) == [b.pod_cidr, "default"]
    ka.cleanup()
    routes = json.loads(sh("ip", "-j", "-n", a.netns, "route", "show", "10.244.102.0/24").stdout)
    assert [r.get("type") for r in routes] == ["blackhole"]  # cleanup leaves it too
    assert [r["dst"] for r in our_routes(a)] == ["default"]


def test_agent_cleanup_removes_the_routing_its_state_file_records(
        nodes: tuple[Node, Node], tmp_path: Path) -> None:
    """``axoneme agent cleanup`` (in node a's namespace, as the node's agent runs)
    removes the routes and the VXLAN device when the state file says routing was
    on, and leaves them when it does not."""
    a, b = nodes
    NodeRouting(netns=a.netns).apply(desired_state("tunnel", a.info, [a.info, b.info]))
    assert our_routes(a) and device(a) is not None
    axoneme = str(Path(sys.executable).parent / "axoneme")

    def cleanup(state: dict[str, object]) -> None:
        state_dir = tmp_path / "state"
        state_dir.mkdir(exist_ok=True)
        (state_dir / "state.json").write_text(json.dumps(state))
        out = sh(axoneme, "agent", "cleanup", "--state-dir", str(state_dir), netns=a.netns,
                 check=False)
        assert out.returncode == 0, out.stderr

    cleanup({"version": 1})  # an agent that never routed: not its routes to remove
    assert our_routes(a) and device(a) is not None
    cleanup({"version": 1, "routing": "tunnel"})
    assert our_routes(a) == [] and device(a) is None


def test_an_agent_restarted_without_kubernetes_mode_removes_the_routing(
        nodes: tuple[Node, Node], tmp_path: Path) -> None:
    """Routing switched off: an agent whose state file records routing, started
    again in standalone mode (no Node objects to route to), removes the routes
    and the device (run in node a's namespace, noop datapath)."""
    a, b = nodes
    axoneme = str(Path(sys.executable).parent / "axoneme")
    state_dir, sock = tmp_path / "state", tmp_path / "agent.sock"
    argv = ["ip", "netns", "exec", a.netns, axoneme, "agent", "run", "--datapath", "noop",
            "--state-dir", str(state_dir), "--api-socket", str(sock), "--no-guard",
            "--no-l7-proxies", "--hubble-socket-path", "", "--pod-cidr", a.pod_cidr]

    def run_agent() -> None:
        log = open(tmp_path / "agent.log", "ab")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        log.close()
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                status = subprocess.run([axoneme, "status", "--api-socket", str(sock)],
                                        capture_output=True, text=True)
                if status.returncode == 0:
                    break
                assert proc.poll() is None, (tmp_path / "agent.log").read_text()
                time.sleep(0.2)
            else:
                raise AssertionError("agent not ready: " + (tmp_path / "agent.log").read_text())
        finally:
            proc.terminate()
            proc.wait(30)

    run_agent()  # a state file of this agent's own
    state = json.loads((state_dir / "state.json").read_text())
    assert state.get("routing") == ""  # standalone: no routing of its own
    NodeRouting(netns=a.netns).apply(desired_state("tunnel", a.info, [a.info, b.info]))
    assert our_routes(a) and device(a) is not None
    (state_dir / "state.json").write_text(json.dumps({**state, "routing": "tunnel"}))
    run_agent()
    assert our_routes(a) == [] and device(a) is None
