"""The iptables datapath against the real kernel, in both modes.

Pods are netns behind veths (see conftest); the datapath is driven directly
(no agent) with hand-built MapStates and probed with real traffic.
"""

from __future__ import annotations

import ipaddress
import queue
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import pytest
from axoneme.core.datapath import DatapathConfig, IPCacheChanges
from axoneme.core.endpoint import Endpoint
from axoneme.core.errors import DatapathProgramError
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
from axoneme.core.marks import MARK_TO_PROXY_MASK, to_proxy_mark
from axoneme.datapath.iptables import IptablesDatapath
from axoneme.datapath.iptables import _readback as rb
from axoneme.datapath.iptables import _render as rd

if TYPE_CHECKING:
    from conftest import Pod, Topology

pytestmark = pytest.mark.privileged

IN, OUT = Direction.INGRESS, Direction.EGRESS
TCP, UDP, ICMP = Protocol.TCP, Protocol.UDP, Protocol.ICMP
ID = {"a": 1001, "b": 1002, "c": 1003}
CIDR_ID, EXCEPT_ID = 2000, 2001
ALLOW_ALL_OUT = {Key(0, OUT): ALLOW}


def k(ident: int, d: Direction, proto: Protocol = Protocol.ANY, port: int = 0, plen: int | None = None) -> Key:
    if plen is None:
        plen = 0 if proto is Protocol.ANY else 16
    return Key(ident, d, proto, port, plen)


def endpoint(pod: Pod) -> Endpoint:
    return Endpoint(pod.ep_id, pod.identity, Labels(), ipv4=pod.ip, ipv6=pod.ip6 or None,
                    host_ifname=pod.host_if, namespace="default", pod_name=f"pod-{pod.name}")


class Env:
    def __init__(self, topo: Topology, dp: IptablesDatapath, config: DatapathConfig) -> None:
        self.topo, self.dp, self.config = topo, dp, config
        self.a, self.b, self.c = (topo.pods[n] for n in "abc")
        self.w = topo.world
        self.ipcache: dict[ipaddress.IPv4Network | ipaddress.IPv6Network, int] = {}

    def set(self, pod: Pod, state: dict[Key, Entry]) -> MapState:
        ms = MapState(state)
        self.dp.sync(endpoint(pod), ms)
        assert self.dp.dump(endpoint(pod)) == ms
        return ms

    def tcp(self, src: Pod, dst: Pod | str, port: int) -> bool:
        return self.topo.tcp(src, dst if isinstance(dst, str) else dst.ip, port)


@pytest.fixture(scope="module", params=["plain", "ipset"])
def env(request: pytest.FixtureRequest, topology: Topology) -> Iterator[Env]:
    group = 7000 + int(topology.suffix, 16) % 500 + (0 if request.param == "plain" else 500)
    # the pods' host veths (axh<sfx><name>) are "our" pod interfaces here; the
    # outside host's one matches the prefix too but carries no pod address
    config = DatapathConfig(mode=request.param, options={
        "nflog_group": group, "host_ifname_prefix": f"axh{topology.suffix}"})
    dp = IptablesDatapath(config)
    dp.probe()
    try:
        dp.start()
        for i, name in enumerate("abc", start=1):
            pod = topology.pods[name]
            pod.ep_id, pod.identity = 100 + i, ID[name]
        w = topology.world
        upserts: dict[ipaddress.IPv4Network | ipaddress.IPv6Network, int] = {
            ipaddress.ip_network(f"{p.ip}/32"): p.identity for p in topology.pods.values()}
        upserts.update({ipaddress.ip_network(f"{p.ip6}/128"): p.identity
                        for p in topology.pods.values()})
        upserts[ipaddress.ip_network(f"{w.ips[0]}/30")] = CIDR_ID
        upserts[ipaddress.ip_network(f"{w.ips[1]}/32")] = EXCEPT_ID
        dp.ipcache_apply(IPCacheChanges(upserts))
        for pod in topology.pods.values():
            dp.endpoint_added(endpoint(pod), True, True)
        e = Env(topology, dp, config)
        e.ipcache = upserts
        yield e
    finally:
        dp.cleanup()
        _assert_clean()


def _assert_clean() -> None:
    save = subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout
    owned = [ln for ln in save.splitlines()
             if ln.startswith(":") and rb.OWNED_CHAIN_RE.match(ln[1:].split()[0])]
    hooks = [ln for ln in save.splitlines() if rd.HOOK_COMMENT in ln]
    sets = subprocess.run(["ipset", "list", "-n"], capture_output=True, text=True,
                          check=True).stdout.split()
    assert not owned and not hooks, (owned, hooks)
    assert not [s for s in sets if rb.OWNED_SET_RE.match(s)], sets


def test_identity_and_port(env: Env) -> None:
    env.set(env.a, ALLOW_ALL_OUT)
    env.set(env.c, ALLOW_ALL_OUT)
    env.set(env.b, {k(ID["a"], IN, TCP, 80): ALLOW})
    t = env.topo
    got = t.probe([("tcp", env.a, env.b.ip, 80), ("tcp", env.a, env.b.ip, 8080),
                   ("tcp", env.c, env.b.ip, 80), ("tcp", env.a, env.c.ip, 80)])
    # a->c: c's ingress holds nothing and is enforced: default deny
    assert got == [True, False, False, False]


def test_port_range_udp_and_wildcard(env: Env) -> None:
    env.set(env.a, ALLOW_ALL_OUT)
    env.set(env.c, ALLOW_ALL_OUT)
    state = {Key(ID["a"], IN, TCP, p, plen): ALLOW for p, plen in port_range_to_prefixes(8080, 8081)}
    state[k(0, IN, TCP, 443)] = ALLOW  # wildcard identity
    state[k(ID["a"], IN, UDP, 53)] = ALLOW
    env.set(env.b, state)
    t = env.topo
    got = t.probe([("tcp", env.a, env.b.ip, 8080), ("tcp", env.a, env.b.ip, 8081),
                   ("tcp", env.a, env.b.ip, 9000), ("tcp", env.c, env.b.ip, 443),
                   ("tcp", env.a, env.b.ip, 443), ("udp", env.a, env.b.ip, 53),
                   ("udp", env.a, env.b.ip, 5353), ("udp", env.c, env.b.ip, 53)])
    assert got == [True, True, False, True, True, True, False, False]


def test_deny_wins_over_allow(env: Env) -> None:
    env.set(env.a, ALLOW_ALL_OUT)
    env.set(env.c, ALLOW_ALL_OUT)
    # L3 allow for a, wildcard deny on 443 (nested in a's L3 block), specific
    # deny for c on everything even though a wildcard allows port 80
    env.set(env.b, {k(ID["a"], IN): ALLOW, k(0, IN, TCP, 443): DENY,
                    k(ID["c"], IN): DENY, k(0, IN, TCP, 80): ALLOW})
    got = env.topo.probe([("tcp", env.a, env.b.ip, 80), ("tcp", env.a, env.b.ip, 443),
                          ("tcp", env.a, env.b.ip, 9000), ("tcp", env.c, env.b.ip, 80)])
    assert got == [True, False, True, False]


def test_cidr_except_and_world(env: Env) -> None:
    w = env.w.ips  # w[0], w[2] in the /30 (CIDR_ID); w[1] is the except; w[3] is world
    env.set(env.a, {k(CIDR_ID, OUT, TCP, 80): ALLOW})
    got = env.topo.probe([("tcp", env.a, ip, 80) for ip in w])
    assert got == [True, False, True, False]
    env.set(env.a, {k(CIDR_ID, OUT, TCP, 80): ALLOW, k(2, OUT, TCP, 80): ALLOW})
    got = env.topo.probe([("tcp", env.a, ip, 80) for ip in w])
    assert got == [True, False, True, True]
    # the except moves: w[1] joins the CIDR identity, so it becomes reachable
    env.dp.ipcache_apply(IPCacheChanges(deletes=frozenset({ipaddress.ip_network(f"{w[1]}/32")})))
    try:
        assert env.tcp(env.a, w[1], 80)
    finally:
        env.dp.ipcache_apply(IPCacheChanges({ipaddress.ip_network(f"{w[1]}/32"): EXCEPT_ID}))
    assert not env.tcp(env.a, w[1], 80)


def test_icmp_types_and_default_deny(env: Env) -> None:
    env.set(env.a, ALLOW_ALL_OUT)
    env.set(env.b, {k(ID["a"], IN, ICMP, 8): ALLOW})
    assert env.topo.ping(env.a, env.b.ip)
    assert not env.tcp(env.a, env.b, 80)
    env.set(env.b, {k(ID["a"], IN, ICMP, 0): ALLOW})  # echo reply only: echo request dropped
    assert not env.topo.ping(env.a, env.b.ip)
    env.set(env.b, {})  # enforced, nothing allowed
    assert env.topo.probe([("icmp", env.a, env.b.ip, 0), ("tcp", env.a, env.b.ip, 80)]) == [False, False]
    env.set(env.b, {k(0, IN): ALLOW})  # allow-all key (an unenforced direction)
    assert env.topo.probe([("icmp", env.a, env.b.ip, 0), ("tcp", env.a, env.b.ip, 80)]) == [True, True]


def test_unenforced_direction_without_keys(env: Env) -> None:
    env.set(env.a, ALLOW_ALL_OUT)
    env.set(env.b, {})
    assert not env.tcp(env.a, env.b, 80)
    env.dp.endpoint_added(endpoint(env.b), False, True)
    try:
        assert env.tcp(env.a, env.b, 80)
    finally:
        env.dp.endpoint_added(endpoint(env.b), True, True)
    assert not env.tcp(env.a, env.b, 80)


def test_revocation_hits_established_and_replies_pass(env: Env) -> None:
    env.set(env.a, ALLOW_ALL_OUT)
    allow = k(ID["a"], IN, TCP, 9000)
    env.set(env.b, {allow: ALLOW})
    s = env.topo.socket(env.a, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect((env.b.ip, 9000))
        # b's egress has no allow for a: the echo comes back as a reply only
        env.set(env.b, {allow: ALLOW, k(ID["c"], OUT): ALLOW})
        s.sendall(b"one")
        assert s.recv(16) == b"one"
        env.dp.apply(endpoint(env.b), MapChanges(deletes=frozenset({allow})))
        assert env.dp.dump(endpoint(env.b)) == MapState({k(ID["c"], OUT): ALLOW})
        s.sendall(b"two")
        with pytest.raises(TimeoutError):
            s.recv(16)
    finally:
        s.close()


def test_failed_restore_is_rolled_back(env: Env) -> None:
    env.set(env.a, ALLOW_ALL_OUT)
    before = env.set(env.b, {k(ID["a"], IN, TCP, 80): ALLOW})
    env.dp.fault_injection = f"-A {rd.ep_chain(env.b.ep_id, IN)} -j AXON-NO-SUCH-CHAIN"
    with pytest.raises(DatapathProgramError):
        env.dp.apply(endpoint(env.b), MapChanges({k(ID["a"], IN, TCP, 8080): ALLOW},
                                                 frozenset({k(ID["a"], IN, TCP, 80)})))
    assert env.dp.dump(endpoint(env.b)) == before
    assert env.topo.probe([("tcp", env.a, env.b.ip, 80), ("tcp", env.a, env.b.ip, 8080)]) == [True, False]
    # the next change goes through
    env.dp.apply(endpoint(env.b), MapChanges({k(ID["a"], IN, TCP, 8080): ALLOW}))
    assert env.topo.probe([("tcp", env.a, env.b.ip, 80), ("tcp", env.a, env.b.ip, 8080)]) == [True, True]


def test_restart_adopts_state(env: Env) -> None:
    env.set(env.a, ALLOW_ALL_OUT)
    applied = env.set(env.b, {k(ID["a"], IN, TCP, 80): ALLOW, k(ID["c"], IN): DENY,
                              k(0, IN, TCP, 1024, 6): Entry(proxy_port=15001)})
    env.dp.stop()
    # the agent is down: enforcement stays
    assert env.topo.probe([("tcp", env.a, env.b.ip, 80), ("tcp", env.a, env.b.ip, 443),
                           ("tcp", env.c, env.b.ip, 80)]) == [True, False, False]
    fresh = IptablesDatapath(env.config)
    fresh.start()
    try:
        assert fresh.dump(endpoint(env.b)) == applied
        assert env.b.ep_id in fresh._refs  # adopted from the hook chain
        assert fresh.dump_ipcache() == env.dp.dump_ipcache()
        fresh.endpoint_added(endpoint(env.b), True, True)
        assert not fresh.sync(endpoint(env.b), applied)
        assert env.topo.probe([("tcp", env.a, env.b.ip, 80), ("tcp", env.a, env.b.ip, 443)]) == [True, False]
        changes = fresh.sync(endpoint(env.b), MapState({k(ID["a"], IN, TCP, 443): ALLOW}))
        assert set(changes.deletes) == set(applied) and list(changes.adds) == [k(ID["a"], IN, TCP, 443)]
        assert env.topo.probe([("tcp", env.a, env.b.ip, 80), ("tcp", env.a, env.b.ip, 443)]) == [False, True]
    finally:
        fresh.stop()
        env.dp.start()  # the fixture's instance adopts again
    assert env.dp.dump(endpoint(env.b)) == MapState({k(ID["a"], IN, TCP, 443): ALLOW})


def _collect(env: Env, probe: Callable[[], object],
             done: Callable[[list[Flow]], bool]) -> list[Flow]:
    """Run ``probe`` while reading NFLOG events until ``done(seen)`` (or 5 s
    without one); the datapath is restarted to end the reader."""
    flows: queue.Queue[Flow] = queue.Queue()

    def collect() -> None:
        for flow in env.dp.events():
            flows.put(flow)

    reader = threading.Thread(target=collect, daemon=True)
    reader.start()
    seen: list[Flow] = []
    try:
        probe()
        while not done(seen):
            try:
                seen.append(flows.get(timeout=5))
            except queue.Empty:
                break
    finally:
        env.dp.stop()
        reader.join(5)
        env.dp.start()
    assert not reader.is_alive()
    return seen


def _first(seen: list[Flow], pred: Callable[[Flow], bool]) -> Flow | None:
    return next((f for f in seen if pred(f)), None)


def test_events(env: Env) -> None:
    env.set(env.a, ALLOW_ALL_OUT)
    env.set(env.c, ALLOW_ALL_OUT)
    env.set(env.b, {k(ID["a"], IN, TCP, 80): ALLOW, k(ID["c"], IN, TCP, 443): DENY})
    preds: list[Callable[[Flow], bool]] = [
        lambda f: f.drop_reason is DropReason.POLICY_DENIED and f.ports()[1] == 8080
        and f.traffic_direction == "INGRESS",
        lambda f: f.drop_reason is DropReason.POLICY_DENY and f.ports()[1] == 443,
        lambda f: f.verdict is FlowVerdict.FORWARDED and f.ports()[1] == 80
        and f.traffic_direction == "INGRESS"]

    def probe() -> None:
        assert env.topo.probe([("tcp", env.a, env.b.ip, 8080), ("tcp", env.c, env.b.ip, 443),
                               ("tcp", env.a, env.b.ip, 80)]) == [False, False, True]

    seen = _collect(env, probe, lambda got: all(_first(got, p) for p in preds))
    denied, deny, fwd = (_first(seen, p) for p in preds)
    assert denied is not None, seen
    assert denied.verdict is FlowVerdict.DROPPED
    assert (denied.source.identity, denied.destination.identity) == (ID["a"], ID["b"])
    assert denied.destination.pod_name == "pod-b" and denied.destination.id == env.b.ep_id
    assert denied.l4["TCP"]["flags"].get("SYN") is True
    assert denied.to_json()["drop_reason_desc"] == "POLICY_DENIED"
    assert deny is not None and deny.source.identity == ID["c"], seen
    assert fwd is not None and fwd.event_type == "policy-verdict", seen
    assert fwd.match_type == "L3_L4" and deny.match_type == "L3_L4"
    assert denied.match_type == ""  # nothing matched: default deny


def test_status_and_metrics(env: Env) -> None:
    env.set(env.b, {k(ID["a"], IN, TCP, 80): ALLOW})
    st = env.dp.status()
    assert st.healthy and st.mode == env.config.mode and "backend=" in st.detail
    m = env.dp.metrics()
    assert m["endpoints"] == 3 and m["rules"] > 0


def test_cleanup_removes_everything(env: Env) -> None:
    env.set(env.b, {k(ID["a"], IN, TCP, 80): ALLOW})
    env.dp.cleanup()
    _assert_clean()
    # no enforcement left: b's port is reachable again (nothing drops)
    assert env.tcp(env.a, env.b, 8080)
    env.dp.start()
    for pod in (env.a, env.b, env.c):
        env.dp.endpoint_added(endpoint(pod), True, True)
    env.dp.ipcache_apply(IPCacheChanges(env.ipcache))
    assert env.dp.dump_ipcache() == env.ipcache


def test_ipv6(env: Env) -> None:
    env.set(env.a, ALLOW_ALL_OUT)
    env.set(env.c, ALLOW_ALL_OUT)
    env.set(env.b, {k(ID["a"], IN, TCP, 80): ALLOW, k(ID["c"], IN, Protocol.ICMPV6, 128): ALLOW})
    got = env.topo.probe([("tcp", env.a, env.b.ip6, 80), ("tcp", env.a, env.b.ip6, 8080),
                          ("tcp", env.c, env.b.ip6, 80), ("icmp", env.c, env.b.ip6, 0),
                          ("icmp", env.a, env.b.ip6, 0)])
    assert got == [True, False, False, True, False]


def _marked_packets(chain: str) -> int:
    save = subprocess.run(["iptables-save", "-c", "-t", "mangle"], capture_output=True, text=True,
                          check=True).stdout
    line = next(ln for ln in save.splitlines() if f"-A {chain} " in ln)
    return int(line.split("]")[0].strip("[").split(":")[0])


def test_redirect_entries_mark_packets_before_routing(env: Env) -> None:
    port = 15001
    chain = f"AXIM-{env.topo.suffix}"
    mark = f"{to_proxy_mark(port):#x}/{MARK_TO_PROXY_MASK:#x}"
    subprocess.run(["iptables", "-t", "mangle", "-N", chain], check=True)
    try:
        subprocess.run(["iptables", "-t", "mangle", "-A", chain, "-m", "mark", "--mark", mark,
                        "-j", "RETURN"], check=True)
        subprocess.run(["iptables", "-t", "mangle", "-I", "FORWARD", "1", "-s", env.a.ip,
                        "-j", chain], check=True)
        env.set(env.a, {k(ID["b"], OUT, TCP, 80): Entry(proxy_port=port),
                        k(ID["b"], OUT, TCP, 443): ALLOW})
        env.set(env.b, {k(ID["a"], IN, TCP, 80): ALLOW, k(ID["a"], IN, TCP, 443): ALLOW})
        before = _marked_packets(chain)
        assert env.tcp(env.a, env.b, 443)  # allowed, not redirected: no mark
        assert _marked_packets(chain) == before
        # no TPROXY rule here: the marked packet is forwarded, still allowed
        assert env.tcp(env.a, env.b, 80)
        assert _marked_packets(chain) > before
        # the redirect goes away: so do the mangle chains
        env.set(env.a, {k(ID["b"], OUT, TCP, 80): ALLOW})
        mangle = subprocess.run(["iptables-save", "-t", "mangle"], capture_output=True, text=True,
                                check=True).stdout
        assert f":{rd.ep_chain(env.a.ep_id, OUT)} " not in mangle
    finally:
        subprocess.run(["iptables", "-t", "mangle", "-D", "FORWARD", "-s", env.a.ip, "-j", chain],
                       check=False)
        subprocess.run(["iptables", "-t", "mangle", "-F", chain], check=False)
        subprocess.run(["iptables", "-t", "mangle", "-X", chain], check=False)


def test_endpoint_removed_and_readded(env: Env) -> None:
    env.set(env.a, ALLOW_ALL_OUT)
    env.set(env.c, {k(ID["a"], IN, TCP, 80): ALLOW})
    assert env.topo.probe([("tcp", env.a, env.c.ip, 80), ("tcp", env.a, env.c.ip, 443)]) == [True, False]
    env.dp.endpoint_removed(endpoint(env.c))
    try:
        save = subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout
        assert f"AXON-EP-{env.c.ep_id}-" not in save and env.c.host_if not in save
        assert env.dp.dump(endpoint(env.c)) == MapState()
        # c's interface has no endpoint any more: it passes nothing (issue 13)
        assert env.topo.probe([("tcp", env.a, env.c.ip, 443), ("tcp", env.c, env.a.ip, 80)]) \
            == [False, False]
        env.dp.endpoint_removed(endpoint(env.c))  # unknown endpoints are fine
    finally:
        env.dp.endpoint_added(endpoint(env.c), True, True)
    assert not env.tcp(env.a, env.c, 443)  # back, enforced, empty


def _drops(env: Env, probe: Callable[[], object], reason: DropReason, ip: str) -> list[Flow]:
    """The drop flows with ``reason`` to or from ``ip`` seen while ``probe`` ran
    (earlier tests' events may still be queued)."""
    def match(f: Flow) -> bool:
        return f.drop_reason is reason and ip in (f.ip_source, f.ip_destination)
    return [f for f in _collect(env, probe, lambda got: any(map(match, got))) if match(f)]


def test_pod_interface_without_endpoint_drops(env: Env, stray_pod: Pod) -> None:
    """Issue 13: a pod interface (our host veth prefix, a pod address) whose
    endpoint chains are not there (yet) passes nothing, both ways, counted
    and logged with NO_MATCHING_LOCAL_CONTAINER_FOUND; once its endpoint is
    added its policy decides; endpoints with chains are not affected."""
    d = stray_pod
    env.set(env.a, {k(0, IN): ALLOW, k(0, OUT): ALLOW})
    env.set(env.b, ALLOW_ALL_OUT)
    before = env.dp.metrics()["packets_unknown_endpoint"]

    def probe() -> None:
        got = env.topo.probe([("tcp", d, env.a.ip, 80), ("tcp", env.a, d.ip, 80),
                              ("tcp", env.b, env.a.ip, 80), ("tcp", env.a, env.w.ips[3], 80)])
        assert got == [False, False, True, True]

    flows = _drops(env, probe, DropReason.NO_MATCHING_LOCAL_CONTAINER_FOUND, d.ip)
    assert flows and {flows[0].ip_source, flows[0].ip_destination} == {d.ip, env.a.ip}, flows
    assert flows[0].to_json()["drop_reason_desc"] == "NO_MATCHING_LOCAL_CONTAINER_FOUND"
    assert env.dp.metrics()["packets_unknown_endpoint"] > before
    d.ep_id, d.identity = 104, 1004
    env.dp.endpoint_added(endpoint(d), True, True)
    try:
        env.set(d, {k(0, IN): ALLOW, k(0, OUT): ALLOW})
        assert env.topo.probe([("tcp", d, env.a.ip, 80), ("tcp", env.a, d.ip, 80)]) == [True, True]
    finally:
        env.dp.endpoint_removed(endpoint(d))
    assert env.topo.probe([("tcp", d, env.a.ip, 80), ("tcp", env.a, d.ip, 80)]) == [False, False]


def test_endpoint_fail_closed(env: Env) -> None:
    """Issue 13: while failing closed in a direction, everything the
    endpoint's policy decides there is dropped (DROP_EP_NOT_READY), the
    established connection's next packet included; the other direction, a
    re-add and a restart keep to it; an empty set ends it."""
    env.set(env.a, {k(0, IN): ALLOW, k(0, OUT): ALLOW})
    env.set(env.b, {k(0, IN): ALLOW, k(0, OUT): ALLOW})
    s = env.topo.socket(env.a, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect((env.b.ip, 9000))
        s.sendall(b"one")
        assert s.recv(16) == b"one"
        env.dp.endpoint_fail_closed(endpoint(env.b), frozenset({IN}))
        assert env.dp.dump(endpoint(env.b)) == MapState({k(0, IN): ALLOW, k(0, OUT): ALLOW})
        s.sendall(b"two")
        with pytest.raises(TimeoutError):
            s.recv(16)
    finally:
        s.close()

    def probe() -> None:
        got = env.topo.probe([("tcp", env.a, env.b.ip, 80), ("tcp", env.b, env.a.ip, 80),
                              ("tcp", env.a, env.b.ip6, 80)])
        assert got == [False, True, False]

    flows = _drops(env, probe, DropReason.DROP_EP_NOT_READY, env.b.ip)
    assert flows and flows[0].traffic_direction == "INGRESS", flows
    assert flows[0].destination.id == env.b.ep_id
    env.dp.endpoint_fail_closed(endpoint(env.b), frozenset({IN}))  # idempotent
    env.dp.endpoint_added(endpoint(env.b), True, False)
    assert not env.tcp(env.a, env.b, 80)
    env.dp.stop()
    fresh = IptablesDatapath(env.config)
    fresh.start()
    try:
        fresh.endpoint_added(endpoint(env.b), True, True)
        fresh.sync(endpoint(env.b), MapState({k(0, IN): ALLOW, k(0, OUT): ALLOW}))
        assert not env.tcp(env.a, env.b, 80)  # adopted from the kernel
        fresh.endpoint_fail_closed(endpoint(env.b), frozenset())
        assert env.tcp(env.a, env.b, 80)
    finally:
        fresh.stop()
        env.dp.start()
    assert env.dp.dump(endpoint(env.b)) == MapState({k(0, IN): ALLOW, k(0, OUT): ALLOW})
