"""The host firewall's programs (bpf/host.c) and the pod programs' host checks
run through BPF_PROG_TEST_RUN on crafted frames: the host endpoint's records
are written, nothing is attached (lo's ifindex stands in for a device)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

import pytest
from axoneme.core.datapath import IPCacheChanges
from axoneme.core.endpoint import HOST_ENDPOINT_ID, Endpoint
from axoneme.core.labels import Labels
from axoneme.core.mapstate import ALLOW, Direction, Key, MapState, Protocol

pytestmark = pytest.mark.privileged

OK, SHOT = 0, 2
EG, IN, TCP = Direction.EGRESS, Direction.INGRESS, Protocol.TCP
LO = 1
HOST = Endpoint(HOST_ENDPOINT_ID, 1, Labels(), devices=("lo",))
NODE, POD, PEER_IP, WORLD_IP = "10.244.252.100", "10.244.252.7", "10.244.252.2", "198.51.100.9"
PEER = 4888  # a cluster identity (another node's pod)


@pytest.fixture(scope="module")
def dp(start_ebpf) -> Iterator:  # type: ignore[no-untyped-def, type-arg]
    with start_ebpf(policy_map_max=64, ct_max=1024, ipcache_max=64,
                    options={"max_endpoints": 4}) as d:
        d._host_records(HOST, {LO: "lo"}, True, True)
        d.ipcache_apply(IPCacheChanges(upserts={
            ipaddress.ip_network(f"{NODE}/32"): 1,
            ipaddress.ip_network(f"{PEER_IP}/32"): PEER,
            ipaddress.ip_network(f"{POD}/32"): 4999}))
        yield d


def run(dp, which: str, frame: bytes):  # type: ignore[no-untyped-def]
    from axoneme.datapath.ebpf import _bpf

    return _bpf.prog_test_run(dp.program_fd(which), frame, ifindex=LO)


def test_host_ingress_policy_on_the_device(dp) -> None:  # type: ignore[no-untyped-def]
    from axoneme.datapath.ebpf import _packets as P

    dp.sync(HOST, MapState({Key(PEER, IN, TCP, 30080, 16): ALLOW, Key(0, EG): ALLOW}))
    assert run(dp, "from_netdev", P.ipv4(PEER_IP, NODE, sport=41000, dport=30080)).retval == OK
    assert run(dp, "from_netdev", P.ipv4(PEER_IP, NODE, sport=41001, dport=22)).retval == SHOT
    assert run(dp, "from_netdev", P.ipv4(WORLD_IP, NODE, sport=41002, dport=30080)).retval == SHOT
    # forwarded (to a pod, not the node): not the host's to decide
    assert run(dp, "from_netdev", P.ipv4(WORLD_IP, POD, sport=41003, dport=22)).retval == OK
    # the node's reply to the allowed connection leaves (egress open anyway), and
    # a reply of the node's own connection comes back in although ingress denies it
    assert run(dp, "to_netdev", P.ipv4(NODE, WORLD_IP, sport=42000, dport=443)).retval == OK
    reply = P.ipv4(WORLD_IP, NODE, sport=443, dport=42000, flags=P.TCP_SYN | P.TCP_ACK)
    assert run(dp, "from_netdev", reply).retval == OK
    # ARP is link control
    assert run(dp, "from_netdev", P.arp()).retval == OK


def test_host_egress_policy_on_the_device(dp) -> None:  # type: ignore[no-untyped-def]
    from axoneme.datapath.ebpf import _packets as P

    dp.sync(HOST, MapState({Key(0, IN): ALLOW, Key(PEER, EG, TCP, 6443, 16): ALLOW}))
    assert run(dp, "to_netdev", P.ipv4(NODE, PEER_IP, sport=43000, dport=6443)).retval == OK
    assert run(dp, "to_netdev", P.ipv4(NODE, PEER_IP, sport=43001, dport=6444)).retval == SHOT
    assert run(dp, "to_netdev", P.ipv4(NODE, WORLD_IP, sport=43002, dport=443)).retval == SHOT
    # a pod's forwarded packet leaving by the device: its own policy decided it
    assert run(dp, "to_netdev", P.ipv4(POD, WORLD_IP, sport=43003, dport=443)).retval == OK


def test_without_the_host_record_the_device_programs_pass(dp) -> None:  # type: ignore[no-untyped-def]
    from axoneme.datapath.ebpf import _packets as P

    dp.sync(HOST, MapState({Key(PEER, IN, TCP, 30080, 16): ALLOW}))
    assert run(dp, "from_netdev", P.ipv4(WORLD_IP, NODE, sport=44000, dport=22)).retval == SHOT
    dp.endpoint_removed(HOST)  # the host firewall off: records and policy gone
    try:
        assert run(dp, "from_netdev", P.ipv4(WORLD_IP, NODE, sport=44001, dport=22)).retval == OK
        assert dp.dump(HOST) == MapState()
    finally:
        dp._host_records(HOST, {LO: "lo"}, True, True)
