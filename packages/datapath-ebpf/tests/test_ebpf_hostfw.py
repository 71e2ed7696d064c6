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


def _proc_tcp(rows: list[tuple[str, int, str, int, str]]) -> str:
    """/proc/net/tcp text: (local, lport, remote, rport, state) rows."""
    import socket

    def a(ip: str, port: int) -> str:
        return f"{socket.inet_aton(ip)[::-1].hex().upper()}:{port:04X}"

    head = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid\n"
    return head + "".join(f"   {i}: {a(loc, lp)} {a(r, rp)} {st} 00000000:00000000 00:00000000 "
                          f"00000000     0        0 {1000 + i} 1\n"
                          for i, (loc, lp, r, rp, st) in enumerate(rows))


def test_connections_from_before_the_attach_are_tracked(dp, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The node's own connections opened before the host firewall attached (an API
    watch that only receives) get their replies in; inbound ones stay policed."""
    from axoneme.datapath.ebpf import _packets as P
    from axoneme.datapath.ebpf._hostct import seed_host_connections

    dp.sync(HOST, MapState({Key(PEER, IN, TCP, 30080, 16): ALLOW, Key(0, EG): ALLOW}))
    watch = P.ipv4(WORLD_IP, NODE, sport=6443, dport=45000, flags=P.TCP_ACK)
    inbound = P.ipv4(WORLD_IP, NODE, sport=45001, dport=22, flags=P.TCP_ACK)
    assert run(dp, "from_netdev", watch).retval == SHOT  # untracked: a new packet from world
    (tmp_path / "tcp").write_text(_proc_tcp([
        (NODE, 45000, WORLD_IP, 6443, "01"),  # the node opened it
        ("0.0.0.0", 22, "0.0.0.0", 0, "0A"),  # sshd listens ...
        (NODE, 22, WORLD_IP, 45001, "01"),  # ... and accepted this one
        ("127.0.0.1", 45002, "127.0.0.1", 8080, "01")]))  # loopback: never on a device
    assert seed_host_connections(dp._fds["ax_ct"], tmp_path) == 2
    assert seed_host_connections(dp._fds["ax_ct"], tmp_path) == 0  # kept, not rewritten
    assert run(dp, "from_netdev", watch).retval == OK  # a reply of the node's connection
    assert run(dp, "from_netdev", inbound).retval == SHOT  # forward: the policy decides


def test_the_namespace_sockets_are_read(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import socket

    from axoneme.datapath.ebpf._hostct import tcp_sockets

    srv = socket.create_server(("127.0.0.1", 0))
    cli = socket.create_connection(srv.getsockname())
    acc, _ = srv.accept()
    try:
        established, listening = tcp_sockets()
        port = srv.getsockname()[1]
        lo = socket.inet_aton("127.0.0.1")
        assert (lo, port) in listening
        assert (socket.AF_INET, lo, cli.getsockname()[1], lo, port) in established
    finally:
        for s in (cli, acc, srv):
            s.close()
