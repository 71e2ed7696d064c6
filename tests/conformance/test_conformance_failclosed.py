"""Fail closed, on every kernel datapath, through the Datapath contract
itself (issue 13): while ``endpoint_fail_closed(endpoint, {INGRESS})`` is
set, everything the endpoint's policy decides in that direction is dropped
(a DROP_EP_NOT_READY flow says so) though its policy allows it all; the other
direction is not affected; a re-add and a restarted datapath keep it; an
empty set ends it.

No agent can make every datapath fail closed (only the eBPF policy map can
be full), so the datapath is driven directly, with real traffic between two
veth pods hanging off a private node namespace this module's thread enters
(no uplink there; the host's forwarding guard is installed first anyway).
"""

from __future__ import annotations

import ctypes
import ipaddress
import json
import os
import queue
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import _testnet  # tests/ is on sys.path (tests/conftest.py)
import pytest
from _harness import DATAPATHS, HERE, PYTHON, datapath_unavailable, sh

pytestmark = [pytest.mark.conformance, pytest.mark.privileged]

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
PORT = 80
ID = {"a": 30001, "b": 30002}


@dataclass
class Pod:
    name: str
    netns: str
    host_if: str
    ip: str


@dataclass
class Node:
    suffix: str
    pods: dict[str, Pod]

    def probe(self, src: str, dst: str) -> bool:
        r = subprocess.run(["ip", "netns", "exec", self.pods[src].netns, PYTHON,
                            str(HERE / "prober.py"), json.dumps([[self.pods[dst].ip, PORT, "tcp"]])],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return bool(json.loads(r.stdout.strip().splitlines()[-1])[0])


def _setns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
    finally:
        os.close(fd)


def _pod(name: str, ns: str, host_if: str, ip: str) -> Pod:
    """A pod netns wired to the node (the current netns) by a veth; the node
    has no address to ARP from, so both neighbour entries are pinned."""
    _testnet.add_netns(ns)
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
    return Pod(name, ns, host_if, ip)


@pytest.fixture(scope="module")
def node(guard: None) -> Iterator[Node]:
    sfx = secrets.token_hex(2)
    node_ns = f"axcf-p{os.getpid()}-{sfx}n"
    octet = 100 + secrets.randbelow(150)
    made: list[str] = []
    servers: list[subprocess.Popen[bytes]] = []
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    entered = False
    try:
        made.append(node_ns)
        _testnet.add_netns(node_ns)
        _setns(f"/run/netns/{node_ns}")  # this thread and what it starts live on the node
        entered = True
        sh("ip", "link", "set", "lo", "up")
        sh("sysctl", "-qw", "net.ipv4.ip_forward=1")
        pods = {}
        for i, name in enumerate("ab", start=1):
            ns = f"axcf-p{os.getpid()}-{sfx}{name}"
            made.append(ns)
            pods[name] = _pod(name, ns, f"axc{sfx}{name}", f"10.244.{octet}.{i}")
            route = sh("ip", "route", "get", pods[name].ip).stdout
            assert f"dev {pods[name].host_if}" in route, route
            servers.append(subprocess.Popen(
                ["ip", "netns", "exec", ns, PYTHON, str(HERE / "podserver.py"), name, str(PORT)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            _testnet.wait_accepting(pods[name].ip, PORT, ns, servers[-1])
        yield Node(sfx, pods)
    finally:
        for p in servers:
            p.kill()
            p.wait()
        if entered:
            _libc.setns(home, CLONE_NEWNET)
        os.close(home)
        for ns in reversed(made):  # the veths, routes and neighbours go with them
            _testnet.del_netns(ns)


@pytest.fixture(params=DATAPATHS, ids=lambda d: f"{d[0]}-{d[1]}" if d[1] else d[0])
def kernel_datapath(request: pytest.FixtureRequest, node: Node, tmp_path: Any) -> Iterator[Any]:
    """(datapath class, config) of one kernel datapath on the node; everything
    its instances made is removed afterwards."""
    name, mode = request.param
    reason = datapath_unavailable(name, mode)
    if reason:
        pytest.skip(reason)
    from axoneme.core.datapath import DatapathConfig
    from axoneme.core.plugins import load_class

    cls = load_class("axoneme.datapath", name)
    bpffs = f"/sys/fs/bpf/axoneme-conf-{secrets.token_hex(4)}"
    config = DatapathConfig(
        state_dir=str(tmp_path), mode=mode, bpffs_root=bpffs, policy_map_max=64, ct_max=4096,
        ipcache_max=1024, pod_cidr="10.244.0.0/16",
        options={"max_endpoints": 8, "nflog_group": 6000 + secrets.randbelow(900),
                 "host_ifname_prefix": f"axc{node.suffix}"})
    try:
        yield cls, config
    finally:
        try:
            cls(config).cleanup()
        finally:
            shutil.rmtree(bpffs, ignore_errors=True)


class Events:
    """The datapath's flows, read by a thread until ``stop()``."""

    def __init__(self, dp: Any) -> None:
        self.dp = dp
        self.flows: queue.Queue[Any] = queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for flow in self.dp.events():
            self.flows.put(flow)

    def find(self, pred: Any, timeout: float = 5.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                flow = self.flows.get(timeout=max(0.05, deadline - time.monotonic()))
            except queue.Empty:
                break
            if pred(flow):
                return flow
        return None


def test_endpoint_fail_closed(node: Node, kernel_datapath: Any) -> None:
    from axoneme.core.datapath import IPCacheChanges
    from axoneme.core.endpoint import Endpoint
    from axoneme.core.flow import DropReason
    from axoneme.core.labels import Labels
    from axoneme.core.mapstate import ALLOW, Direction, Key, MapState

    cls, config = kernel_datapath
    IN, OUT = Direction.INGRESS, Direction.EGRESS
    eps = {n: Endpoint(10 + i, ID[n], Labels(), ipv4=p.ip, host_ifname=p.host_if,
                       namespace="conf", pod_name=f"pod-{n}")
           for i, (n, p) in enumerate(sorted(node.pods.items()))}
    open_policy = MapState({Key(0, IN): ALLOW, Key(0, OUT): ALLOW})

    def wire(dp: Any) -> None:
        dp.ipcache_apply(IPCacheChanges({ipaddress.ip_network(f"{p.ip}/32"): ID[n]
                                         for n, p in node.pods.items()}))
        for ep in eps.values():
            dp.endpoint_added(ep, True, True)
            dp.sync(ep, open_policy)

    dp = cls(config)
    dp.start()
    events = Events(dp)
    try:
        wire(dp)
        assert node.probe("a", "b") and node.probe("b", "a")
        dp.endpoint_fail_closed(eps["b"], frozenset({IN}))
        dp.endpoint_fail_closed(eps["b"], frozenset({IN}))  # idempotent
        assert not node.probe("a", "b"), "b's policy allows a, but b fails closed in ingress"
        assert node.probe("b", "a"), "b's egress is not failing closed"
        flow = events.find(lambda f: f.drop_reason is DropReason.DROP_EP_NOT_READY)
        assert flow is not None, "no DROP_EP_NOT_READY flow"
        assert (flow.traffic_direction, flow.ip_destination) == ("INGRESS", node.pods["b"].ip)
        assert flow.to_json()["drop_reason_desc"] == "DROP_EP_NOT_READY"
        assert dp.dump(eps["b"]) == open_policy  # the policy itself stays
        dp.endpoint_added(eps["b"], True, False)  # re-added: still failing closed
        assert not node.probe("a", "b")
    finally:
        dp.stop()
        events.thread.join(10)
    # a restarted datapath adopts the kernel's state, failing closed included
    fresh = cls(config)
    fresh.start()
    try:
        wire(fresh)
        assert not node.probe("a", "b"), "the restarted datapath lost the fail-closed state"
        fresh.endpoint_fail_closed(eps["b"], frozenset())
        assert node.probe("a", "b"), "an empty set did not end failing closed"
        assert node.probe("b", "a")
    finally:
        fresh.stop()
