"""The host endpoint (host firewall) of the iptables datapath on the real
kernel, both modes: its chains hang off INPUT/OUTPUT of the node namespace
(the conftest's, which this module's thread enters), so traffic to the node's
own address meets the host's INGRESS policy whoever sends it (a pod of the
node, the outside host ``w`` in 198.51.100.0/24), forwarded pod traffic never
does, and a drop is reported with the host endpoint as the destination.
"""

from __future__ import annotations

import ipaddress
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest
from axoneme.core.datapath import DatapathConfig, IPCacheChanges
from axoneme.core.endpoint import HOST_ENDPOINT_ID, Endpoint
from axoneme.core.flow import DropReason, FlowVerdict
from axoneme.core.labels import Labels
from axoneme.core.mapstate import ALLOW, Direction, Key, MapState, Protocol
from axoneme.datapath.iptables import IptablesDatapath

if TYPE_CHECKING:
    from conftest import Topology

pytestmark = pytest.mark.privileged

IN, OUT, TCP = Direction.INGRESS, Direction.EGRESS, Protocol.TCP
NODE_IP = "10.255.253.1"  # the node's own address, on its lo (inside the test netns only)
PORT = 30080
ID_A, ID_B = 1101, 1102
HOST = Endpoint(HOST_ENDPOINT_ID, 1, Labels(), devices=("lo",))


def _serve(stop: threading.Event, port: int) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((NODE_IP, port))
    s.listen(64)
    s.settimeout(0.2)

    def loop() -> None:  # echoes, as Topology.tcp expects
        while not stop.is_set():
            try:
                c = s.accept()[0]
            except OSError:
                continue
            with c:
                c.settimeout(1.0)
                try:
                    c.sendall(c.recv(16))
                except OSError:
                    pass
    threading.Thread(target=loop, daemon=True).start()
    return s


@pytest.fixture(scope="module", params=["plain", "ipset"])
def hostdp(request: pytest.FixtureRequest, topology: Topology
           ) -> Iterator[tuple[IptablesDatapath, int]]:
    group = 7300 + int(topology.suffix, 16) % 300 + (0 if request.param == "plain" else 300)
    dp = IptablesDatapath(DatapathConfig(mode=request.param, options={
        "nflog_group": group, "host_ifname_prefix": f"axh{topology.suffix}"}))
    dp.probe()
    subprocess.run(["ip", "addr", "replace", f"{NODE_IP}/32", "dev", "lo"], check=True)
    stop = threading.Event()
    port = PORT if request.param == "plain" else PORT + 1  # each mode its own listener
    sock = _serve(stop, port)
    try:
        dp.start()
        a, b, w = topology.pods["a"], topology.pods["b"], topology.world
        dp.ipcache_apply(IPCacheChanges({ipaddress.ip_network(f"{a.ip}/32"): ID_A,
                                         ipaddress.ip_network(f"{b.ip}/32"): ID_B,
                                         ipaddress.ip_network(f"{NODE_IP}/32"): 1}))
        for pod, ident, ep_id in ((a, ID_A, 201), (b, ID_B, 202)):
            ep = Endpoint(ep_id, ident, Labels(), ipv4=pod.ip, host_ifname=pod.host_if)
            dp.endpoint_added(ep, False, False)
            dp.sync(ep, MapState({Key(0, IN): ALLOW, Key(0, OUT): ALLOW}))
        assert w.ips
        yield dp, port
    finally:
        stop.set()
        sock.close()
        dp.cleanup()
        subprocess.run(["ip", "addr", "del", f"{NODE_IP}/32", "dev", "lo"], check=False)


def test_host_endpoint_enforces_input_and_reports_drops(
        hostdp: tuple[IptablesDatapath, int], topology: Topology) -> None:
    (dp, port), topo = hostdp, topology
    a, b, w = topo.pods["a"], topo.pods["b"], topo.world
    flows: list = []  # type: ignore[type-arg]
    reader = threading.Thread(target=lambda: flows.extend(dp.events()), daemon=True)
    reader.start()
    # the host firewall on, no host policy: nothing changes
    dp.endpoint_added(HOST, False, False)
    dp.sync(HOST, MapState({Key(0, IN): ALLOW, Key(0, OUT): ALLOW}))
    assert topo.probe([("tcp", a, NODE_IP, port), ("tcp", w, NODE_IP, port)]) == [True, True]
    # a host policy: only identity a to the node port, egress open
    state = MapState({Key(ID_A, IN, TCP, port, 16): ALLOW, Key(0, OUT): ALLOW})
    dp.endpoint_added(HOST, True, False)
    dp.sync(HOST, state)
    assert dp.dump(HOST) == state
    assert topo.probe([("tcp", a, NODE_IP, port), ("tcp", b, NODE_IP, port),
                       ("tcp", w, NODE_IP, port)]) == [True, False, False]
    # forwarded pod traffic is not the host's: a -> b still passes
    assert topo.tcp(a, b.ip, 80)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any(
            f.ip_source == w.ip and f.verdict is FlowVerdict.DROPPED for f in flows):
        time.sleep(0.1)
    drop = next(f for f in flows if f.ip_source == w.ip and f.verdict is FlowVerdict.DROPPED)
    assert drop.ip_destination == NODE_IP and drop.traffic_direction == "INGRESS"
    assert drop.destination.id == HOST_ENDPOINT_ID and drop.destination.identity == 1
    assert drop.drop_reason is DropReason.POLICY_DENIED
    # the host endpoint goes: the node is open again
    dp.endpoint_removed(HOST)
    assert topo.probe([("tcp", b, NODE_IP, port), ("tcp", w, NODE_IP, port)]) == [True, True]
