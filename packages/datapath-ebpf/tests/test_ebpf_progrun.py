"""The real tc programs run through BPF_PROG_TEST_RUN on crafted frames:
IPv6, ARP, proxy marks and counters, without attaching anything."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

import pytest
from axoneme.core.datapath import IPCacheChanges
from axoneme.core.endpoint import Endpoint
from axoneme.core.labels import Labels
from axoneme.core.mapstate import ALLOW, DENY, Direction, Entry, Key, MapState, Protocol
from axoneme.core.marks import (
    MARK_MAGIC_CHECKED,
    MARK_MAGIC_PROXY_EGRESS,
    MARK_MAGIC_PROXY_INGRESS,
    from_proxy_mark,
    to_proxy_identity_mark,
    to_proxy_mark,
)

pytestmark = pytest.mark.privileged

OK, SHOT = 0, 2
EG, IN = Direction.EGRESS, Direction.INGRESS
TCP = Protocol.TCP
LO = 1  # the programs only run in test runs here: lo's ifindex is a safe stand-in
A = Endpoint(id=7, identity=4007, labels=Labels(), ipv4="10.244.251.1", ipv6="fd00:a::1")
PEER = 4777


@pytest.fixture(scope="module")
def dp(start_ebpf) -> Iterator:  # type: ignore[no-untyped-def, type-arg]
    with start_ebpf(policy_map_max=64, ct_max=1024, ipcache_max=64,
                    options={"max_endpoints": 4}) as d:
        d._register(A, LO, "lo")
        d.ipcache_apply(IPCacheChanges(upserts={
            ipaddress.ip_network("10.244.251.2/32"): PEER,
            ipaddress.ip_network("fd00:a::2/128"): PEER}))
        yield d


def run(dp, which: str, frame: bytes, mark: int = 0):  # type: ignore[no-untyped-def]
    from axoneme.datapath.ebpf import _bpf

    return _bpf.prog_test_run(dp.program_fd(which), frame, ifindex=LO, mark=mark)


def test_ipv4_and_ipv6_decided_by_policy(dp) -> None:  # type: ignore[no-untyped-def]
    from axoneme.datapath.ebpf import _packets as P

    allow = Key(PEER, EG, TCP, 80, 16)
    dp.sync(A, MapState({allow: ALLOW, **{Key(0, IN): ALLOW}}))
    assert run(dp, "from_container", P.ipv4(A.ipv4, "10.244.251.2", dport=80)).retval == OK
    assert run(dp, "from_container", P.ipv4(A.ipv4, "10.244.251.2", dport=81)).retval == SHOT
    assert run(dp, "from_container", P.ipv6(A.ipv6, "fd00:a::2", dport=80, sport=41000)).retval == OK
    assert run(dp, "from_container", P.ipv6(A.ipv6, "fd00:a::2", dport=81)).retval == SHOT
    # no ipcache entry: world, not allowed
    assert run(dp, "from_container", P.ipv6(A.ipv6, "fd00:b::9", dport=80)).retval == SHOT
    packets, nbytes = dp.policy_counters(A, allow)
    assert packets == 2 and nbytes > 0
    # ARP is never policed
    dp.sync(A, MapState())
    assert run(dp, "from_container", P.arp()).retval == OK
    assert run(dp, "to_container", P.arp()).retval == OK
    assert run(dp, "from_container", P.ipv4(A.ipv4, "10.244.251.2", dport=80, sport=42000)).retval == SHOT
    # ICMPv6 link control (ND, MLD) is never policed; other ICMPv6 is
    for kind in (135, 136, 130, 131, 132, 143):
        frame = P.ipv6("::", "ff02::16", proto=58, icmp=(kind, 0))
        assert run(dp, "from_container", frame).retval == OK, kind
    assert run(dp, "from_container", P.ipv6(A.ipv6, "fd00:a::2", proto=58, icmp=(128, 0))).retval == SHOT


def test_ingress_reply_and_checked_mark(dp) -> None:  # type: ignore[no-untyped-def]
    from axoneme.datapath.ebpf import _packets as P

    dp.sync(A, MapState({Key(PEER, IN, TCP, 22, 16): ALLOW, Key(0, EG): DENY}))
    syn = P.ipv4("10.244.251.2", A.ipv4, sport=50000, dport=22)
    assert run(dp, "to_container", syn).retval == OK
    assert run(dp, "to_container", P.ipv4("10.244.251.2", A.ipv4, sport=50000, dport=23)).retval == SHOT
    # the reply leaves the pod although egress denies everything: CT
    reply = P.ipv4(A.ipv4, "10.244.251.2", sport=22, dport=50000, flags=P.TCP_SYN | P.TCP_ACK)
    assert run(dp, "from_container", reply).retval == OK
    assert run(dp, "from_container", P.ipv4(A.ipv4, "10.244.251.2", sport=22, dport=50001)).retval == SHOT
    # already checked by a local source's from-container: passes, mark cleared
    r = run(dp, "to_container", P.ipv4("10.244.251.2", A.ipv4, dport=9999), mark=MARK_MAGIC_CHECKED)
    assert r.retval == OK and r.mark == 0


def test_proxy_redirect_mark(dp) -> None:  # type: ignore[no-untyped-def]
    from axoneme.datapath.ebpf import _packets as P

    dp.sync(A, MapState({Key(PEER, EG, TCP, 80, 16): Entry(proxy_port=15001), Key(0, IN): ALLOW}))
    r = run(dp, "from_container", P.ipv4(A.ipv4, "10.244.251.2", sport=43000, dport=80))
    assert r.retval == OK and r.mark == to_proxy_identity_mark(15001, A.identity)
    # the proxy's own packets: not redirected again, still policed
    r = run(dp, "from_container", P.ipv4(A.ipv4, "10.244.251.2", sport=43001, dport=80),
            mark=MARK_MAGIC_PROXY_INGRESS)
    assert r.retval == OK and r.mark == MARK_MAGIC_PROXY_INGRESS
    r = run(dp, "from_container", P.ipv4(A.ipv4, "10.244.251.2", sport=43002, dport=81),
            mark=MARK_MAGIC_PROXY_INGRESS)
    assert r.retval == SHOT


def test_the_redirect_mark_carries_the_source_identity(dp) -> None:  # type: ignore[no-untyped-def]
    """The to-proxy mark carries the identity the packet was judged by, and the
    port as an offset (core.marks.to_proxy_identity_mark): 0x8200 set, the
    identity in bits 16..31. A port outside the offset window gets the plain
    port mark. An ingress proxy's upstream packet is judged by the identity
    its from-proxy mark carries, before the ipcache (which knows nothing of
    10.244.251.9 here: world without the mark's identity)."""
    from axoneme.datapath.ebpf import _packets as P

    dp.sync(A, MapState({Key(PEER, IN, TCP, 8080, 16): Entry(proxy_port=15001),
                         Key(PEER, IN, TCP, 8090, 16): Entry(proxy_port=21000),
                         Key(PEER, IN, TCP, 8081, 16): ALLOW, Key(0, EG): ALLOW}))
    r = run(dp, "from_netdev", P.ipv4("10.244.251.2", A.ipv4, sport=48000, dport=8080))
    assert r.retval == OK and r.mark == (PEER << 16) | 0x8200 | 1, hex(r.mark)
    r = run(dp, "from_netdev", P.ipv4("10.244.251.2", A.ipv4, sport=48001, dport=8090))
    assert r.retval == OK and r.mark == to_proxy_mark(21000), hex(r.mark)
    upstream = P.ipv4("10.244.251.9", A.ipv4, sport=48002, dport=8081)
    assert run(dp, "to_container", upstream, mark=from_proxy_mark(IN, PEER)).retval == OK
    upstream = P.ipv4("10.244.251.9", A.ipv4, sport=48003, dport=8081)
    assert run(dp, "to_container", upstream, mark=from_proxy_mark(IN)).retval == SHOT


def test_ingress_redirect_after_an_egress_proxy_only(dp) -> None:  # type: ignore[no-untyped-def]
    """to-container: an ingress proxy's upstream packet (PROXY_INGRESS) is not
    redirected again; an egress proxy's (PROXY_EGRESS) still meets the
    destination's ingress L7 redirect (core.marks)."""
    from axoneme.datapath.ebpf import _packets as P

    dp.sync(A, MapState({Key(PEER, IN, TCP, 8080, 16): Entry(proxy_port=15002), Key(0, EG): ALLOW}))
    r = run(dp, "to_container", P.ipv4("10.244.251.2", A.ipv4, sport=44000, dport=8080),
            mark=MARK_MAGIC_PROXY_EGRESS)
    assert r.retval == OK and r.mark == to_proxy_identity_mark(15002, PEER)
    r = run(dp, "to_container", P.ipv4("10.244.251.2", A.ipv4, sport=44001, dport=8080),
            mark=MARK_MAGIC_PROXY_INGRESS)
    assert r.retval == OK and r.mark == MARK_MAGIC_PROXY_INGRESS
    r = run(dp, "to_container", P.ipv4("10.244.251.2", A.ipv4, sport=44002, dport=8081),
            mark=MARK_MAGIC_PROXY_INGRESS)
    assert r.retval == SHOT


def test_audit_entry_forwards_and_reports_audit(dp) -> None:  # type: ignore[no-untyped-def]
    """An allow entry with the audit flag (core.policy.audit) forwards; the new
    connection's verdict event says AUDIT; a plain allow says FORWARDED."""
    import time

    from axoneme.core.flow import FlowVerdict
    from axoneme.datapath.ebpf import _events
    from axoneme.datapath.ebpf import _packets as P

    dp.sync(A, MapState({Key(0, IN): Entry(audit=True), Key(PEER, IN, TCP, 80, 16): ALLOW,
                         Key(0, EG): ALLOW}))
    assert dp.dump(A)[Key(0, IN)].audit
    dp.bpf().ring_buffer_poll(0)
    dp._queue.clear()
    assert run(dp, "to_container", P.ipv4("10.244.251.2", A.ipv4, sport=45000, dport=22)).retval == OK
    assert run(dp, "to_container", P.ipv4("10.244.251.2", A.ipv4, sport=45001, dport=80)).retval == OK
    seen: dict[int, FlowVerdict] = {}
    deadline = time.monotonic() + 2
    while len(seen) < 2 and time.monotonic() < deadline:
        dp.bpf().ring_buffer_poll(50)
        while dp._queue:
            flow = _events.to_flow(dp._queue.popleft(), 0.0)
            seen[flow.ports()[1] or 0] = flow.verdict
    assert seen == {22: FlowVerdict.AUDIT, 80: FlowVerdict.FORWARDED}


def _record_flags(dp) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    """The flags of A's record in both endpoint maps."""
    import ctypes as ct

    from axoneme.datapath.ebpf import _bpf
    from axoneme.datapath.ebpf import _layout as L
    from axoneme.datapath.ebpf._datapath import lxc_key

    by_if, by_ip = L.Endpoint(), L.Endpoint()
    assert _bpf.map_lookup(dp.map_fd("ax_endpoints"), ct.c_uint32(LO), by_if)
    assert _bpf.map_lookup(dp.map_fd("ax_lxc"), lxc_key(A.ipv4), by_ip)
    return int(by_if.flags), int(by_ip.flags)


def test_lookups_are_skipped_only_while_no_such_key_exists(dp) -> None:  # type: ignore[no-untyped-def]
    """The NO_WILD_*/NO_ADDR flags (lib/endpoint.h) follow the endpoint's keys:
    cleared before the first wildcard/address key is written (the packet it
    allows passes at once), set again after the last one is deleted."""
    from axoneme.datapath.ebpf import _layout as L
    from axoneme.datapath.ebpf import _packets as P

    all_off = L.EP_F_NO_WILD_INGRESS | L.EP_F_NO_WILD_EGRESS | L.EP_F_NO_ADDR
    base = MapState({Key(PEER, EG, TCP, 80, 16): ALLOW})
    dp.sync(A, base)
    assert {f & all_off for f in _record_flags(dp)} == {all_off}
    to81 = P.ipv4(A.ipv4, "10.244.251.2", sport=46000, dport=81)
    to82 = P.ipv4(A.ipv4, "10.244.251.2", sport=46001, dport=82)
    assert run(dp, "from_container", to81).retval == SHOT
    # a wildcard egress key: NO_WILD_EGRESS goes, the others stay
    dp.sync(A, MapState({**base, Key(0, EG, TCP, 81, 16): ALLOW}))
    assert {f & all_off for f in _record_flags(dp)} == {L.EP_F_NO_WILD_INGRESS | L.EP_F_NO_ADDR}
    assert run(dp, "from_container", to81).retval == OK
    # an address key (the peer's address, port 82): NO_ADDR goes too
    addr_key = Key.for_address("10.244.251.2", EG, TCP, 82, 16)
    dp.sync(A, MapState({**base, Key(0, EG, TCP, 81, 16): ALLOW, addr_key: ALLOW}))
    assert {f & all_off for f in _record_flags(dp)} == {L.EP_F_NO_WILD_INGRESS}
    assert run(dp, "from_container", to82).retval == OK
    # a wildcard deny still wins over the identity's allow while it exists
    dp.sync(A, MapState({**base, Key(0, EG, TCP, 80, 16): DENY}))
    assert {f & all_off for f in _record_flags(dp)} == {L.EP_F_NO_WILD_INGRESS | L.EP_F_NO_ADDR}
    assert run(dp, "from_container", P.ipv4(A.ipv4, "10.244.251.2", sport=46002, dport=80)).retval == SHOT
    # back to identity keys only: every lookup is skipped again, same verdicts
    dp.sync(A, base)
    assert {f & all_off for f in _record_flags(dp)} == {all_off}
    assert run(dp, "from_container", P.ipv4(A.ipv4, "10.244.251.2", sport=46003, dport=80)).retval == OK
    assert run(dp, "from_container", P.ipv4(A.ipv4, "10.244.251.2", sport=46004, dport=81)).retval == SHOT
    assert run(dp, "from_container", P.ipv4(A.ipv4, "10.244.251.2", sport=46005, dport=82)).retval == SHOT


def test_every_key_shape_decides_from_its_map(dp) -> None:  # type: ignore[no-untyped-def]
    """Keys of prefix 72 and 96 live in the policy hash, the others in the trie
    (lib/policy.h): the longest match over both is what decides."""
    from axoneme.datapath.ebpf import _packets as P
    from axoneme.datapath.ebpf._datapath import policy_key_bytes, policy_map_of

    l3 = Key(PEER, EG)                       # prefix 72: hash
    port_range = Key(PEER, EG, TCP, 0x2000, 3)  # 0x2000-0x3fff: trie
    full = Key(PEER, EG, TCP, 0x2001, 16)   # prefix 96: hash
    assert [policy_map_of(policy_key_bytes(A.id, k)) for k in (l3, port_range, full)] == \
        ["ax_policy_hash", "ax_policy", "ax_policy_hash"]
    dp.sync(A, MapState({l3: DENY}))
    assert run(dp, "from_container", P.ipv4(A.ipv4, "10.244.251.2", sport=47000, dport=0x2001)).retval == SHOT
    dp.sync(A, MapState({l3: ALLOW, port_range: DENY, full: Entry(proxy_port=15003)}))
    r = run(dp, "from_container", P.ipv4(A.ipv4, "10.244.251.2", sport=47001, dport=0x2001))
    assert r.retval == OK and r.mark == to_proxy_identity_mark(15003, A.identity)  # longest
    assert run(dp, "from_container", P.ipv4(A.ipv4, "10.244.251.2", sport=47002, dport=0x2002)).retval == SHOT
    assert run(dp, "from_container", P.ipv4(A.ipv4, "10.244.251.2", sport=47003, dport=80)).retval == OK
    assert dp.policy_counters(A, full)[0] == 1 and dp.policy_counters(A, port_range)[0] == 1
    assert dp.policy_counters(A, l3)[0] == 1
    dp.sync(A, MapState())


def test_program_decides_as_mapstate_lookup_on_random_states(dp) -> None:  # type: ignore[no-untyped-def]
    """Differential: random states of every key shape (wildcard, identity and
    address keys; L3, protocol-only, port-range and full-port; allow, deny,
    proxy), reached by sync and by apply (so the NO_* flags and both policy
    maps change under the packets), decide every probe as MapState.lookup."""
    import random

    from axoneme.datapath.ebpf import _packets as P

    world_ip = "10.244.251.9"  # no ipcache entry: world
    ids = {"10.244.251.2": PEER, world_ip: 2}
    pool: list[Key] = []
    for peer in (0, PEER, 2):
        pool += [Key(peer, EG), Key(peer, EG, TCP), Key(peer, EG, Protocol.UDP, 80, 16),
                 Key(peer, EG, TCP, 80, 16), Key(peer, EG, TCP, 80, 15), Key(peer, EG, TCP, 82, 16)]
    for addr in ids:
        pool += [Key.for_address(addr, EG), Key.for_address(addr, EG, TCP, 81, 16),
                 Key.for_address(addr, EG, TCP, 80, 14)]
    entries = (ALLOW, ALLOW, DENY, Entry(proxy_port=15009))
    rng = random.Random(1701)
    held = MapState()
    sport = 48000
    for rnd in range(40):
        state = MapState({k: rng.choice(entries) for k in rng.sample(pool, rng.randrange(0, 7))})
        if rnd % 2:
            dp.apply(A, held.diff(state))
        else:
            dp.sync(A, state)
        held = state
        for addr, ident in ids.items():
            for proto, pname in ((TCP, "tcp"), (Protocol.UDP, "udp")):
                for port in (80, 81, 82, 83):
                    sport += 1
                    pkt = P.ipv4(A.ipv4, addr, sport=sport, dport=port, proto=6 if pname == "tcp" else 17)
                    got = run(dp, "from_container", pkt, mark=MARK_MAGIC_PROXY_INGRESS).retval == OK
                    want = state.lookup(ident, EG, proto, port, addr).allowed
                    assert got == want, f"round {rnd}: {addr} {pname}/{port}: {got} != {want}\n{state}"
    dp.sync(A, MapState())


@pytest.mark.parametrize("which", ["from_netdev", "from_overlay"])
def test_local_delivery_at_the_node_devices(dp, which: str) -> None:  # type: ignore[no-untyped-def]
    """A packet entering through a node device (from another node, from outside)
    to a local endpoint: its ingress policy decides there, before routing
    (lib/deliver.h): an L7 entry marks it for the proxy, an allow marks it
    CHECKED (to-container lets it through), no entry drops it; a packet to
    an address that is no local endpoint passes untouched. (No tunnel key in
    a test run: from-overlay falls back to the ipcache, as for VNI 0.)"""
    from axoneme.datapath.ebpf import _packets as P

    dp.sync(A, MapState({Key(PEER, IN, TCP, 8080, 16): Entry(proxy_port=15003),
                         Key(PEER, IN, TCP, 8081, 16): ALLOW, Key(0, EG): ALLOW}))
    r = run(dp, which, P.ipv4("10.244.251.2", A.ipv4, sport=45000, dport=8080))
    assert r.retval == OK and r.mark == to_proxy_identity_mark(15003, PEER)
    r = run(dp, which, P.ipv4("10.244.251.2", A.ipv4, sport=45001, dport=8081))
    assert r.retval == OK and r.mark == MARK_MAGIC_CHECKED
    assert run(dp, which, P.ipv4("10.244.251.2", A.ipv4, sport=45002, dport=8082)).retval == SHOT
    assert run(dp, which, P.ipv4("10.244.251.9", A.ipv4, sport=45003, dport=8081)).retval == SHOT
    r = run(dp, which, P.ipv4("10.244.251.2", "10.244.251.77", sport=45004, dport=8080))
    assert r.retval == OK and r.mark == 0
