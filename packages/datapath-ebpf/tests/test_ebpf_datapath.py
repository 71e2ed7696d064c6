"""Kernel tests of the ebpf datapath: real tc programs on netns "pods"."""

from __future__ import annotations

import ipaddress
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from axoneme.core.datapath import DatapathConfig, IPCacheChanges
from axoneme.core.endpoint import Endpoint
from axoneme.core.flow import DropReason, Flow, FlowVerdict
from axoneme.core.labels import Labels
from axoneme.core.mapstate import (
    ALLOW,
    DENY,
    Direction,
    Entry,
    Key,
    MapChanges,
    MapState,
    Protocol,
    port_range_to_prefixes,
)

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
        holder = {"dp": dp}
        yield holder, eps, topology
    finally:
        holder_dp = locals().get("holder", {"dp": dp})["dp"]
        holder_dp.cleanup()
        if holder_dp is not dp:
            dp.stop()


def set_policy(dp, eps, states: dict[str, dict[Key, Entry]]) -> None:  # type: ignore[no-untyped-def]
    """Make each pod hold exactly ``states[name]`` (unlisted pods: allow all)."""
    for name, ep in eps.items():
        st = states.get(name, {**allow_all(IN), **allow_all(EG)})
        dp.sync(ep, MapState(st))
        assert dp.dump(ep) == MapState(st)


def test_allow_deny_per_identity_and_port(env) -> None:  # type: ignore[no-untyped-def]
    h, eps, topo = env
    dp = h["dp"]
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


def test_port_range_and_wildcard_identity(env) -> None:  # type: ignore[no-untyped-def]
    h, eps, topo = env
    dp = h["dp"]
    a, b, c = topo.pods["a"], topo.pods["b"], topo.pods["c"]
    rng = {Key(0, IN, TCP, port, plen): ALLOW for port, plen in port_range_to_prefixes(8080, 8081)}
    set_policy(dp, eps, {"b": {**rng, **allow_all(EG)}})
    tmp = topo.tmp
    # wildcard identity: every peer, only the range
    assert a.tcp(tmp, b.ip, 8080) and a.tcp(tmp, b.ip, 8081) and c.tcp(tmp, b.ip, 8081)
    assert not a.tcp(tmp, b.ip, 8443)
    assert not c.tcp(tmp, b.ip, 9000)


def test_deny_wins_over_allow(env) -> None:  # type: ignore[no-untyped-def]
    h, eps, topo = env
    dp = h["dp"]
    a, b, c = topo.pods["a"], topo.pods["b"], topo.pods["c"]
    set_policy(dp, eps, {"b": {
        Key(ID["a"], IN): ALLOW,                       # L3 allow of a
        Key(ID["a"], IN, TCP, 8081, 16): DENY,         # specific deny
        Key(ID["c"], IN, TCP, 8080, 16): ALLOW,        # specific allow of c ...
        Key(0, IN, TCP, 8080, 15): DENY,               # ... loses to a shorter wildcard deny
        **allow_all(EG)}})
    tmp = topo.tmp
    assert a.tcp(tmp, b.ip, 8443)
    assert not a.tcp(tmp, b.ip, 8081)
    assert not c.tcp(tmp, b.ip, 8080)
    assert not a.tcp(tmp, b.ip, 8080)


def test_egress_policy_and_local_destination_ingress(env) -> None:  # type: ignore[no-untyped-def]
    h, eps, topo = env
    dp = h["dp"]
    a, b, c = topo.pods["a"], topo.pods["b"], topo.pods["c"]
    set_policy(dp, eps, {
        "a": {Key(ID["b"], EG, TCP, 8080, 16): ALLOW, Key(ID["c"], EG): ALLOW, **allow_all(IN)},
        "c": {Key(ID["a"], IN, TCP, 9000, 16): ALLOW, **allow_all(EG)},
    })
    tmp = topo.tmp
    assert a.tcp(tmp, b.ip, 8080)
    assert not a.tcp(tmp, b.ip, 8081)       # a's egress denies
    assert a.tcp(tmp, c.ip, 9000)
    assert not a.tcp(tmp, c.ip, 8080)       # c's ingress denies (checked at a's from-container)
    assert b.tcp(tmp, c.ip, 8080) is False  # c's ingress, from b


def test_reply_passes_when_only_one_direction_allows(env) -> None:  # type: ignore[no-untyped-def]
    h, eps, topo = env
    dp = h["dp"]
    a, b = topo.pods["a"], topo.pods["b"]
    # a: may only send to b:8080, accepts nothing; b: accepts a:8080, may send nothing
    set_policy(dp, eps, {
        "a": {Key(ID["b"], EG, TCP, 8080, 16): ALLOW, Key(ID["b"], EG, UDP, 5353, 16): ALLOW},
        "b": {Key(ID["a"], IN, TCP, 8080, 16): ALLOW, Key(ID["a"], IN, UDP, 5353, 16): ALLOW},
    })
    tmp = topo.tmp
    assert a.tcp(tmp, b.ip, 8080)
    assert a.udp(tmp, b.ip, 5353)
    assert not b.tcp(tmp, a.ip, 8080)


def test_cidr_world_and_except_via_ipcache(env) -> None:  # type: ignore[no-untyped-def]
    h, eps, topo = env
    dp = h["dp"]
    a, out = topo.pods["a"], topo.outside
    tmp = topo.tmp
    cidr = ipaddress.ip_network("198.51.100.0/24")
    host32 = ipaddress.ip_network(f"{out.ip}/32")
    set_policy(dp, eps, {"a": {Key(WORLD, EG, TCP, 8080, 16): ALLOW, **allow_all(IN)}})
    assert a.tcp(tmp, out.ip, 8080)          # no ipcache entry: world
    try:
        dp.ipcache_apply(IPCacheChanges(upserts={cidr: CIDR_ID}))
        assert not a.tcp(tmp, out.ip, 8080)  # now the CIDR identity, not allowed
        set_policy(dp, eps, {"a": {Key(CIDR_ID, EG, TCP, 8080, 16): ALLOW, **allow_all(IN)}})
        assert a.tcp(tmp, out.ip, 8080)
        # toCIDRSet except: the agent maps the excepted prefix to another identity
        dp.ipcache_apply(IPCacheChanges(upserts={host32: CIDR_ID + 1}))
        assert dp.dump_ipcache()[host32] == CIDR_ID + 1
        assert not a.tcp(tmp, out.ip, 8080)
        dp.ipcache_apply(IPCacheChanges(deletes=frozenset({host32})))
        assert a.tcp(tmp, out.ip, 8080)
        assert host32 not in dp.dump_ipcache()
    finally:
        dp.ipcache_apply(IPCacheChanges(deletes=frozenset({cidr, host32})))


def test_icmp_type_rules(env) -> None:  # type: ignore[no-untyped-def]
    h, eps, topo = env
    dp = h["dp"]
    a, b = topo.pods["a"], topo.pods["b"]
    set_policy(dp, eps, {"b": {Key(ID["a"], IN, ICMP, 8, 16): ALLOW, **allow_all(EG)}})
    assert a.ping(b.ip)                     # echo request allowed, reply via CT
    assert not topo.pods["c"].ping(b.ip)
    set_policy(dp, eps, {"b": {Key(ID["a"], IN, ICMP, 13, 16): ALLOW, **allow_all(EG)}})
    assert not a.ping(b.ip)


def test_default_deny_vs_allow_all(env) -> None:  # type: ignore[no-untyped-def]
    h, eps, topo = env
    dp = h["dp"]
    a, b = topo.pods["a"], topo.pods["b"]
    set_policy(dp, eps, {"b": {**allow_all(EG)}})   # ingress enforced, nothing allowed
    assert not a.tcp(topo.tmp, b.ip, 8080)
    assert not a.ping(b.ip)
    set_policy(dp, eps, {})                          # allow-all both ways
    assert a.tcp(topo.tmp, b.ip, 8080)
    assert a.ping(b.ip)
    assert b.tcp(topo.tmp, topo.outside.ip, 8080)


def test_revocation_hits_established_connection(env) -> None:  # type: ignore[no-untyped-def]
    h, eps, topo = env
    dp = h["dp"]
    a, b = topo.pods["a"], topo.pods["b"]
    allow = Key(ID["a"], IN, TCP, 8080, 16)
    set_policy(dp, eps, {"b": {allow: ALLOW, **allow_all(EG)}})
    cl = a.client(topo.tmp, b.ip, 8080)
    try:
        assert cl.stdout is not None and cl.stdout.readline().strip() == "connected"
        assert topo.client_send(cl)
        dp.apply(eps["b"], MapChanges(deletes=frozenset({allow})))
        assert not topo.client_send(cl)
    finally:
        cl.kill()
        cl.wait()


def test_host_entity(env) -> None:  # type: ignore[no-untyped-def]
    """Traffic the node itself sends is the host identity (1)."""
    import subprocess
    import sys as _sys

    h, eps, topo = env
    dp = h["dp"]
    a, b = topo.pods["a"], topo.pods["b"]
    set_policy(dp, eps, {"b": {Key(HOST, IN, TCP, 8080, 16): ALLOW, **allow_all(EG)}})
    probe = ("import socket, sys\n"
             "try:\n"
             f"    s = socket.create_connection(('{b.ip}', int(sys.argv[1])), timeout=1)\n"
             "    s.sendall(b'h'); s.settimeout(1); sys.exit(0 if s.recv(4) == b'h' else 1)\n"
             "except OSError:\n"
             "    sys.exit(1)\n")
    run = subprocess.run
    assert run([_sys.executable, "-c", probe, "8080"], capture_output=True).returncode == 0
    assert run([_sys.executable, "-c", probe, "8081"], capture_output=True).returncode != 0
    assert not a.tcp(topo.tmp, b.ip, 8080)


def test_events_drop_and_verdict(env) -> None:  # type: ignore[no-untyped-def]
    h, eps, topo = env
    dp = h["dp"]
    a, b = topo.pods["a"], topo.pods["b"]
    set_policy(dp, eps, {"b": {Key(ID["a"], IN, TCP, 8080, 16): ALLOW, **allow_all(EG)}})
    flows: list[Flow] = []
    t = threading.Thread(target=lambda: flows.extend(dp.events()), daemon=True)
    t.start()
    t0 = time.time() - 0.05
    try:
        assert not a.tcp(topo.tmp, b.ip, 8443, timeout=0.5)
        suppressed0 = dp.metrics()["events_suppressed"]
        flood = ("import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                 f"for _ in range(20): s.sendto(b'x', ('{b.ip}', 5999))")
        assert a.exec(sys.executable, "-c", flood).returncode == 0
        assert a.tcp(topo.tmp, b.ip, 8080)

        def find(pred):  # type: ignore[no-untyped-def]
            return next((f for f in list(flows) if f.time >= t0 and pred(f)), None)

        drop = topo.wait_for(lambda: find(lambda f: f.verdict is FlowVerdict.DROPPED
                                          and f.ports()[1] == 8443))
        assert drop is not None, flows
        assert drop.drop_reason is DropReason.POLICY_DENIED
        assert drop.event_type == "drop" and drop.traffic_direction == "INGRESS"
        assert (drop.ip_source, drop.ip_destination) == (a.ip, b.ip)
        assert drop.source.identity == ID["a"] and drop.destination.identity == ID["b"]
        assert drop.l4["TCP"]["flags"].get("SYN")
        fwd = topo.wait_for(lambda: find(lambda f: f.verdict is FlowVerdict.FORWARDED
                                         and f.ports()[1] == 8080
                                         and f.traffic_direction == "INGRESS"))
        assert fwd is not None, flows
        assert fwd.event_type == "policy-verdict" and fwd.match_type == "L3_L4"
        # monitor aggregation: a flood on one flow is reported once per second
        assert topo.wait_for(lambda: find(lambda f: f.ports()[1] == 5999))
        flooded = [f for f in flows if f.time >= t0 and f.ports()[1] == 5999]
        assert len(flooded) == 1, flooded
        assert flooded[0].drop_reason is DropReason.POLICY_DENIED and "UDP" in flooded[0].l4
        assert dp.metrics()["events_suppressed"] >= suppressed0 + 19
    finally:
        # events() ends with stop(); restart the same instance for later tests
        dp.stop()
        t.join(timeout=5)
        dp.start()
    assert not t.is_alive()
    assert not [f for f in flows if f.time >= t0 and f.verdict is FlowVerdict.FORWARDED
                and f.ports()[1] == 8443]


def test_restart_adopts_pinned_state(env) -> None:  # type: ignore[no-untyped-def]
    from axoneme.datapath.ebpf import EbpfDatapath

    h, eps, topo = env
    dp = h["dp"]
    a, b = topo.pods["a"], topo.pods["b"]
    state = {Key(ID["a"], IN, TCP, 8080, 16): ALLOW, **allow_all(EG)}
    set_policy(dp, eps, {"b": state})
    cl = a.client(topo.tmp, b.ip, 8080)
    try:
        assert cl.stdout is not None and cl.stdout.readline().strip() == "connected"
        assert topo.client_send(cl)
        dp.stop()  # agent down: programs stay attached, maps pinned
        assert not a.tcp(topo.tmp, b.ip, 8081)
        assert a.tcp(topo.tmp, b.ip, 8080)
        assert topo.client_send(cl)
        new = EbpfDatapath(dp.config)
        new.start()
        h["dp"] = new
        assert new.dump(eps["b"]) == MapState(state)
        for ep in eps.values():
            new.endpoint_added(ep, True, True)      # replaces the filter in place
        assert topo.client_send(cl)                 # established connection survived
        assert not a.tcp(topo.tmp, b.ip, 8081)
        assert new.dump(eps["b"]) == MapState(state)
        assert any(str(n) == f"{a.ip}/32" for n in new.dump_ipcache())
    finally:
        cl.kill()
        cl.wait()


def test_address_keys_decide_per_peer_address_and_survive_restart(env) -> None:  # type: ignore[no-untyped-def]
    """Address keys (an ipBlock over pods): a and c get one identity, only a's
    address is allowed; the address's slot is adopted after a restart and
    removed with its last key."""
    from axoneme.datapath.ebpf import EbpfDatapath

    h, eps, topo = env
    dp = h["dp"]
    a, b, c = topo.pods["a"], topo.pods["b"], topo.pods["c"]
    shared = {ipaddress.ip_network(f"{p.ip}/32"): ID["a"] for p in (a, c)}
    dp.ipcache_apply(IPCacheChanges(upserts=shared))
    try:
        state = {Key.for_address(a.ip, IN, TCP, 8080, 16): ALLOW,
                 Key.for_address(c.ip, IN, TCP, 8081, 16): ALLOW, **allow_all(EG)}
        set_policy(dp, eps, {"b": state})
        assert a.tcp(topo.tmp, b.ip, 8080)
        assert not c.tcp(topo.tmp, b.ip, 8080)  # same identity, other address
        assert c.tcp(topo.tmp, b.ip, 8081) and not a.tcp(topo.tmp, b.ip, 8081)
        # an identity deny beats the address allow; an address deny beats the wildcard allow
        set_policy(dp, eps, {"b": {**state, Key(ID["a"], IN): DENY}})
        assert not a.tcp(topo.tmp, b.ip, 8080)
        set_policy(dp, eps, {"b": {Key(0, IN): ALLOW, Key.for_address(c.ip, IN): DENY, **allow_all(EG)}})
        assert a.tcp(topo.tmp, b.ip, 8080) and not c.tcp(topo.tmp, b.ip, 8080)
        dp.stop()
        new = EbpfDatapath(dp.config)
        new.start()
        h["dp"] = new
        for ep in eps.values():
            new.endpoint_added(ep, True, True)
        assert new.dump(eps["b"]) == MapState({Key(0, IN): ALLOW, Key.for_address(c.ip, IN): DENY,
                                               **allow_all(EG)})
        assert not c.tcp(topo.tmp, b.ip, 8080)
        new.sync(eps["b"], MapState({**allow_all(IN), **allow_all(EG)}))
        assert c.tcp(topo.tmp, b.ip, 8080)
        from axoneme.datapath.ebpf import _bpf
        from axoneme.datapath.ebpf import _layout as L
        assert not list(_bpf.map_keys(new._fds["ax_paddr"], L.PolicyAddrKey)), "a slot outlived its keys"
    finally:
        h["dp"].ipcache_apply(IPCacheChanges(upserts={ipaddress.ip_network(f"{c.ip}/32"): ID["c"]}))
