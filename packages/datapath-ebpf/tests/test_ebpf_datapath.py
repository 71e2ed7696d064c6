"""Kernel tests of the ebpf datapath: real tc programs on netns "pods"."""

from __future__ import annotations

import ipaddress
import os
import threading
from collections.abc import Iterator

import pytest

from axoneme.core.datapath import DatapathConfig, IPCacheChanges
from axoneme.core.endpoint import Endpoint
from axoneme.core.flow import DropReason, Flow, FlowVerdict
from axoneme.core.labels import Labels
from axoneme.core.mapstate import ALLOW, DENY, Direction, Entry, Key, MapChanges, MapState, Protocol

pytestmark = pytest.mark.privileged

EG, IN = Direction.EGRESS, Direction.INGRESS
TCP, UDP, ICMP = Protocol.TCP, Protocol.UDP, Protocol.ICMP
ID = {"a": 50001, "b": 50002, "c": 50003}
EPID = {"a": 3101, "b": 3102, "c": 3103}
WORLD, HOST = 2, 1
CIDR_ID = (1 << 24) | 77
PORTS = [8080, 8081, 8443, 9000]


def allow_all(direction: Direction) -> dict[Key, Entry]:
    return {Key(0, direction): ALLOW}


@pytest.fixture(scope="module")
def env(topology, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    from axoneme.datapath.ebpf import EbpfDatapath

    root = f"/sys/fs/bpf/axoneme-test-{topology.suffix}"
    dp = EbpfDatapath(DatapathConfig(bpffs_root=root, policy_map_max=4096, ct_max=4096,
                                     ipcache_max=4096))
    eps: dict[str, Endpoint] = {}
    try:
        dp.start()
        for name, pod in topology.pods.items():
            ep = Endpoint(id=EPID[name], identity=ID[name], labels=Labels(), ipv4=pod.ip,
                          host_ifname=pod.host_if, host_ifindex=pod.ifindex)
            eps[name] = ep
            dp.endpoint_added(ep, True, True)
            pod.serve(topology.tmp, PORTS, [5353])
        topology.outside.serve(topology.tmp, PORTS, [5353])
        dp.ipcache_apply(IPCacheChanges(upserts={
            ipaddress.ip_network(f"{p.ip}/32"): ID[n] for n, p in topology.pods.items()}))
        yield dp, eps, topology
    finally:
        dp.cleanup()


def set_policy(dp, eps, states: dict[str, dict[Key, Entry]]) -> None:  # type: ignore[no-untyped-def]
    """Make each pod hold exactly ``states[name]`` (unlisted pods: allow all)."""
    for name, ep in eps.items():
        st = states.get(name, {**allow_all(IN), **allow_all(EG)})
        dp.sync(ep, MapState(st))
        assert dp.dump(ep) == MapState(st)


def test_allow_deny_per_identity_and_port(env) -> None:  # type: ignore[no-untyped-def]
    dp, eps, topo = env
    a, b, c = topo.pods["a"], topo.pods["b"], topo.pods["c"]
    set_policy(dp, eps, {
        "b": {Key(ID["a"], IN, TCP, 8080, 16): ALLOW, **allow_all(EG)},
    })
    tmp = topo.tmp
    assert a.tcp(tmp, b.ip, 8080)
    assert not a.tcp(tmp, b.ip, 8081)  # port not allowed
    assert not c.tcp(tmp, b.ip, 8080)  # identity not allowed
    assert not a.udp(tmp, b.ip, 5353)
    assert not a.ping(b.ip)
