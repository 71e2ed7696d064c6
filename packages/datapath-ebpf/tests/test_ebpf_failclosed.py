"""Fail-closed paths of the tc programs, run through BPF_PROG_TEST_RUN on
crafted frames (issue 13, item 5):

- a managed interface whose endpoint record is missing drops IP traffic
  (NO_MATCHING_LOCAL_CONTAINER_FOUND) and counts it; ARP and ND still pass;
- an endpoint told to fail closed in a direction drops what its policy would
  decide there (DROP_EP_NOT_READY), whatever the policy map says, and a
  restarted datapath adopts that flag.
"""

from __future__ import annotations

import ctypes as ct
import ipaddress
import time
from collections.abc import Iterator
from typing import Any

import pytest
from axoneme.core.datapath import IPCacheChanges
from axoneme.core.endpoint import Endpoint
from axoneme.core.flow import DropReason
from axoneme.core.labels import Labels
from axoneme.core.mapstate import ALLOW, Direction, Key, MapState

pytestmark = pytest.mark.privileged

OK, SHOT = 0, 2
EG, IN = Direction.EGRESS, Direction.INGRESS
LO = 1  # the programs only run in test runs here: lo's ifindex is a safe stand-in
A = Endpoint(id=9, identity=4009, labels=Labels(), ipv4="10.244.252.1", ipv6="fd00:c::1")
PEER = 4888
PEER_IP = "10.244.252.2"


@pytest.fixture(scope="module")
def dp(start_ebpf: Any) -> Iterator[Any]:
    with start_ebpf(policy_map_max=64, ct_max=1024, ipcache_max=64,
                    options={"max_endpoints": 4}) as d:
        d._register(A, LO, "lo")
        d.ipcache_apply(IPCacheChanges(upserts={ipaddress.ip_network(f"{PEER_IP}/32"): PEER}))
        yield d


def run(dp: Any, which: str, frame: bytes) -> Any:
    from axoneme.datapath.ebpf import _bpf

    return _bpf.prog_test_run(dp.program_fd(which), frame, ifindex=LO)


def drops(dp: Any, reason: DropReason, timeout: float = 2.0) -> list[Any]:
    """Drop events with ``reason`` read from the ring buffer so far."""
    from axoneme.datapath.ebpf import _events

    out = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dp.bpf().ring_buffer_poll(50)
        while dp._queue:
            flow = _events.to_flow(dp._queue.popleft(), 0.0)
            if flow.drop_reason is reason:
                out.append(flow)
        if out:
            break
    return out


def test_no_endpoint_record_drops_and_counts(dp: Any) -> None:
    from axoneme.datapath.ebpf import _bpf
    from axoneme.datapath.ebpf import _packets as P

    dp.sync(A, MapState({Key(0, EG): ALLOW, Key(0, IN): ALLOW}))
    frame_out = P.ipv4(A.ipv4, PEER_IP, sport=40000, dport=80)
    frame_in = P.ipv4(PEER_IP, A.ipv4, sport=40001, dport=80)
    assert run(dp, "from_container", frame_out).retval == OK  # allowed with a record
    before = dp.metrics()["packets_unknown_endpoint"]
    fd = dp.map_fd("ax_endpoints")
    saved = dp._endpoints()[LO]
    _bpf.map_delete(fd, ct.c_uint32(LO))
    try:
        assert run(dp, "from_container", P.ipv4(A.ipv4, PEER_IP, sport=40002, dport=80)).retval == SHOT
        assert run(dp, "to_container", frame_in).retval == SHOT
        assert dp.metrics()["packets_unknown_endpoint"] == before + 2
        ev = drops(dp, DropReason.NO_MATCHING_LOCAL_CONTAINER_FOUND)
        assert ev and ev[0].ip_source in (A.ipv4, PEER_IP)
        # link control still passes: ARP and ICMPv6 neighbour discovery
        assert run(dp, "from_container", P.arp()).retval == OK
        assert run(dp, "to_container", P.arp()).retval == OK
        assert run(dp, "from_container", P.ipv6("::", "ff02::1", proto=58, icmp=(135, 0))).retval == OK
    finally:
        _bpf.map_update(fd, ct.c_uint32(LO), saved)


def test_fail_closed_overrides_the_policy_map_per_direction(dp: Any) -> None:
    from axoneme.datapath.ebpf import _layout as L
    from axoneme.datapath.ebpf import _packets as P

    dp.sync(A, MapState({Key(0, EG): ALLOW, Key(0, IN): ALLOW}))
    assert run(dp, "to_container", P.ipv4(PEER_IP, A.ipv4, sport=41000, dport=80)).retval == OK
    dp.endpoint_fail_closed(A, frozenset({IN}))
    try:
        # the established flow's cached verdict is decided again: dropped too
        assert run(dp, "to_container", P.ipv4(PEER_IP, A.ipv4, sport=41000, dport=80)).retval == SHOT
        assert run(dp, "to_container", P.ipv4(PEER_IP, A.ipv4, sport=41001, dport=80)).retval == SHOT
        ev = drops(dp, DropReason.DROP_EP_NOT_READY)
        assert ev and ev[0].traffic_direction == "INGRESS"
        # egress is not failing closed: the policy map still decides there
        assert run(dp, "from_container", P.ipv4(A.ipv4, PEER_IP, sport=41002, dport=80)).retval == OK
        # re-adding the endpoint (enforcement flags change) keeps it failing closed
        dp._register(A, LO, "lo", True, True)
        assert run(dp, "to_container", P.ipv4(PEER_IP, A.ipv4, sport=41003, dport=80)).retval == SHOT
        # a restarted datapath (it knows nothing yet) adopts the flag from the
        # pinned record (not start(): that would attach the programs to lo)
        dp._fail_closed.clear()
        dp._register(A, LO, "lo", True, True)
        assert dp._endpoints()[LO].flags & L.EP_F_FAIL_CLOSED_INGRESS
        assert run(dp, "to_container", P.ipv4(PEER_IP, A.ipv4, sport=41005, dport=80)).retval == SHOT
    finally:
        dp.endpoint_fail_closed(A, frozenset())
    assert run(dp, "to_container", P.ipv4(PEER_IP, A.ipv4, sport=41004, dport=80)).retval == OK
