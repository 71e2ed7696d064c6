"""The DNS proxy on loopback against a real dnslib upstream (UDP and TCP)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest
from axoneme.core.flow import Flow, FlowEndpoint, FlowVerdict
from axoneme.core.l7proxy import ProxyConfig, ProxyPolicy
from axoneme.core.mapstate import Direction
from axoneme.core.policy.api import FQDNPeer
from axoneme.l7.dns import DnsParser, DnsProxy, DnsProxyConfig, DNSRule, FQDNCache
from dnslib import RCODE

RULES = (DNSRule(match_name="api.twitter.com"), DNSRule(match_pattern="*.example.com"),
         DNSRule(match_name="www.example.com"), DNSRule(match_name="big.example.com"))


class Harness:
    def __init__(self, loop, upstream, *, rules=RULES, **cfg):
        self.loop = loop
        self.upstream = upstream
        self.rules = rules
        self.flows: list[Flow] = []
        self.policy_calls: list[tuple[str, str, int]] = []
        self.answers: list[tuple[str, frozenset[str], int]] = []
        self.cache = FQDNCache()
        self.cache_seen_at_answer: list[frozenset[str]] = []

        def policy_for(src_ip, dst_ip, dst_port):
            self.policy_calls.append((src_ip, dst_ip, dst_port))
            return self.rules

        async def on_answer(name, ips, ttl):
            # the cache already has the IPs when the hook runs
            self.cache_seen_at_answer.append(self.cache.lookup_name(name))
            self.answers.append((name, ips, ttl))

        config = DnsProxyConfig(upstream=upstream.addr, upstream_timeout=1.0, **cfg)
        self.proxy = DnsProxy(config, policy_for=policy_for, cache=self.cache,
                              on_answer=on_answer, flow_sink=self.flows.append)

    def __enter__(self):
        self.loop.run(self.proxy.start())
        return self

    def __exit__(self, *exc):
        self.loop.run(self.proxy.stop())

    @property
    def addr(self):
        return self.proxy.address


@pytest.fixture
def harness(dns_loop, upstream):
    with Harness(dns_loop, upstream) as h:
        yield h


def test_allowed_query_is_relayed_with_the_upstream_answer(harness, upstream, dnsutil):
    direct = dnsutil.udp_ask(upstream.addr, "api.twitter.com")
    via = dnsutil.udp_ask(harness.addr, "api.twitter.com")
    assert via is not None and via.header.rcode == RCODE.NOERROR
    assert [str(r.rdata) for r in via.rr] == [str(r.rdata) for r in direct.rr] == [
        "198.51.100.10"]
    assert upstream.resolver.names().count("api.twitter.com.") == 2
    assert harness.policy_calls == [("127.0.0.1", "127.0.0.1", upstream.port)]


def test_answer_lands_in_the_cache_before_the_client_gets_it(harness, dnsutil):
    via = dnsutil.udp_ask(harness.addr, "sub.example.com")
    assert via is not None
    assert harness.cache.lookup(FQDNPeer(match_pattern="*.example.com")) == {"198.51.100.12"}
    (e,) = harness.cache.entries()
    assert e.expires - time.time() <= 30 and e.expires - time.time() > 20  # zone TTL 30
    assert harness.answers == [("sub.example.com.", frozenset({"198.51.100.12"}), 30)]
    assert harness.cache_seen_at_answer == [frozenset({"198.51.100.12"})]


def test_cname_chain_is_learned_for_every_name(harness, dnsutil):
    via = dnsutil.udp_ask(harness.addr, "www.example.com")
    assert via is not None and len(via.rr) == 3
    for name in ("www.example.com", "edge.example.net"):
        assert harness.cache.lookup_name(name) == {"198.51.100.14", "198.51.100.15"}
    assert {a[0] for a in harness.answers} == {"www.example.com.", "edge.example.net."}
    assert {a[2] for a in harness.answers} == {45}


@pytest.mark.parametrize("name", ["kubernetes.io", "example.com", "a.b.example.com",
                                  "KUBERNETES.IO."])
def test_refused_query_never_reaches_upstream(harness, upstream, dnsutil, name):
    via = dnsutil.udp_ask(harness.addr, name)
    assert via is not None
    assert via.header.rcode == RCODE.REFUSED
    assert str(via.q.qname).lower().rstrip(".") == name.lower().rstrip(".")
    assert upstream.resolver.names() == []
    assert len(harness.cache) == 0
    (flow,) = harness.flows
    assert flow.verdict is FlowVerdict.DROPPED and flow.type == "L7"
    assert flow.l7["dns"]["query"] == name.lower().rstrip(".") + "."
    assert flow.l7["dns"]["rcode"] == RCODE.REFUSED


def test_nxdomain_reject_code(dns_loop, upstream, dnsutil):
    with Harness(dns_loop, upstream, reject_rcode="nameError") as h:
        via = dnsutil.udp_ask(h.addr, "kubernetes.io")
        assert via is not None and via.header.rcode == RCODE.NXDOMAIN
        assert upstream.resolver.names() == []
        assert h.flows[0].l7["dns"]["rcode"] == RCODE.NXDOMAIN


def test_empty_rules_allow_all_and_none_refuses(dns_loop, upstream, dnsutil):
    with Harness(dns_loop, upstream, rules=()) as h:
        via = dnsutil.udp_ask(h.addr, "kubernetes.io")
        assert via is not None and via.header.rcode == RCODE.NOERROR
        h.rules = None  # policy changes apply to the very next query
        via = dnsutil.udp_ask(h.addr, "kubernetes.io")
        assert via is not None and via.header.rcode == RCODE.REFUSED
    assert upstream.resolver.names() == ["kubernetes.io."]


def test_flows_for_an_allowed_query(harness, upstream, dnsutil):
    dnsutil.udp_ask(harness.addr, "api.twitter.com")
    req, resp = harness.flows
    assert (req.verdict, req.l7["type"], req.is_reply) == (FlowVerdict.FORWARDED, "REQUEST",
                                                           False)
    assert req.ip_source == "127.0.0.1" and req.l4["UDP"]["destination_port"] == upstream.port
    assert (resp.verdict, resp.l7["type"], resp.is_reply) == (FlowVerdict.FORWARDED,
                                                              "RESPONSE", True)
    dns = resp.l7["dns"]
    assert dns["query"] == "api.twitter.com."
    assert dns["ips"] == ["198.51.100.10"] and dns["ttl"] == 60 and dns["rcode"] == 0
    assert dns["qtypes"] == ["A"] and dns["rrtypes"] == ["A"]
    assert dns["observation_source"] == "proxy"
    assert resp.l4["UDP"]["source_port"] == upstream.port
    j = resp.to_json()
    assert j["Type"] == "L7" and j["l7"]["dns"]["ips"] == ["198.51.100.10"]
    assert "198.51.100.10" in j["Summary"]


def test_nxdomain_from_upstream_is_relayed_not_cached(harness, dnsutil):
    via = dnsutil.udp_ask(harness.addr, "nothere.example.com")
    assert via is not None and via.header.rcode == RCODE.NXDOMAIN
    assert len(harness.cache) == 0
    assert harness.flows[-1].l7["dns"]["rcode"] == RCODE.NXDOMAIN


def test_aaaa(harness, dnsutil):
    via = dnsutil.udp_ask(harness.addr, "api.twitter.com", "AAAA")
    assert [str(r.rdata) for r in via.rr] == ["2001:db8::10"]
    assert harness.cache.lookup_name("api.twitter.com") == {"2001:db8::10"}


def test_tcp_allowed_and_refused(harness, upstream, dnsutil):
    via = dnsutil.tcp_ask(harness.addr, "sub.example.com")
    assert via is not None and [str(r.rdata) for r in via.rr] == ["198.51.100.12"]
    assert harness.cache.lookup_name("sub.example.com") == {"198.51.100.12"}
    assert harness.flows[0].l4 == {"TCP": {"source_port": harness.flows[0].l4["TCP"][
        "source_port"], "destination_port": upstream.port}}
    via = dnsutil.tcp_ask(harness.addr, "kubernetes.io")
    assert via is not None and via.header.rcode == RCODE.REFUSED
    assert upstream.resolver.names() == ["sub.example.com."]


def test_tcp_several_queries_on_one_connection(harness, dnsutil):
    import struct

    from dnslib import DNSRecord
    with socket.create_connection(harness.addr, timeout=3) as s:
        for name, rcode in (("sub.example.com", 0), ("kubernetes.io", 5),
                            ("api.twitter.com", 0)):
            q = DNSRecord.question(name).pack()
            s.sendall(struct.pack("!H", len(q)) + q)
            (n,) = struct.unpack("!H", s.recv(2, socket.MSG_WAITALL))
            r = DNSRecord.parse(s.recv(n, socket.MSG_WAITALL))
            assert r.header.rcode == rcode


def test_upstream_timeout_gives_servfail(dns_loop, dnsutil):
    # a UDP socket that never answers
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as dead:
        dead.bind(("127.0.0.1", 0))

        class Dead:
            addr = dead.getsockname()
        with Harness(dns_loop, Dead(), rules=()) as h:
            via = dnsutil.udp_ask(h.addr, "api.twitter.com", timeout=5)
            assert via is not None and via.header.rcode == RCODE.SERVFAIL
            assert h.flows[-1].verdict is FlowVerdict.ERROR
            assert h.proxy.stats.upstream_errors == 1


def test_spoofed_answer_is_ignored(dns_loop, dnsutil):
    """An upstream datagram that does not match the query (ID/question) is not relayed."""
    from dnslib import DNSRecord
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as fake:
        fake.bind(("127.0.0.1", 0))
        fake.settimeout(5)

        def serve():
            data, peer = fake.recvfrom(4096)
            q = DNSRecord.parse(data)
            bogus = DNSRecord.question("evil.example.com").reply()
            fake.sendto(bogus.pack(), peer)  # wrong id and question
            good = q.reply()
            fake.sendto(good.pack(), peer)
        t = threading.Thread(target=serve, daemon=True)
        t.start()

        class Fake:
            addr = fake.getsockname()
        with Harness(dns_loop, Fake, rules=()) as h:
            via = dnsutil.udp_ask(h.addr, "api.twitter.com")
            assert via is not None and str(via.q.qname) == "api.twitter.com."
        t.join(5)


def test_slow_on_answer_hook_is_bounded(dns_loop, upstream, dnsutil):
    async def slow(name, ips, ttl):
        await asyncio.sleep(30)

    proxy = DnsProxy(DnsProxyConfig(upstream=upstream.addr, response_max_delay=0.2),
                     policy_for=lambda *a: (), on_answer=slow)
    dns_loop.run(proxy.start())
    try:
        via = dnsutil.udp_ask(proxy.address, "kubernetes.io", timeout=5)
        assert via is not None and via.header.rcode == RCODE.NOERROR
    finally:
        dns_loop.run(proxy.stop())


def test_malformed_packets_are_dropped(harness, upstream, dnsutil):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.3)
        for junk in (b"", b"\x00", b"\xff" * 11, b"\x12\x34" + b"\x80" * 30):
            s.sendto(junk, harness.addr)
            with pytest.raises(TimeoutError):
                s.recvfrom(4096)
    assert harness.proxy.stats.malformed >= 3
    # still serving
    assert dnsutil.udp_ask(harness.addr, "api.twitter.com").header.rcode == 0
    assert upstream.resolver.names() == ["api.twitter.com."]


def test_inflight_cap_drops_excess(dns_loop, upstream, dnsutil):
    gate = asyncio.Event()

    async def blocked(*a):
        await gate.wait()
        return ()

    proxy = DnsProxy(DnsProxyConfig(upstream=upstream.addr, max_inflight=2),
                     policy_for=blocked)
    dns_loop.run(proxy.start())
    try:
        socks = []
        for _ in range(5):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            from dnslib import DNSRecord
            s.sendto(DNSRecord.question("kubernetes.io").pack(), proxy.address)
            socks.append(s)
        deadline = time.time() + 5
        while proxy.stats.overloaded < 3 and time.time() < deadline:
            time.sleep(0.01)
        assert proxy.stats.overloaded == 3
        dns_loop.loop.call_soon_threadsafe(gate.set)
        answered = 0
        for s in socks:
            s.settimeout(2 if answered < 2 else 0.2)
            try:
                s.recvfrom(4096)
                answered += 1
            except TimeoutError:
                pass
            s.close()
        assert answered == 2
    finally:
        dns_loop.run(proxy.stop())


def test_core_factory_contract(dns_loop, upstream, dnsutil):
    """``proxy_factory()`` follows axoneme.core.l7proxy.ProxyFactory: the agent's
    TCP listener in, the UDP twin opened on the same port, ProxyPolicy out."""
    flows: list[Flow] = []
    calls = []
    src_ep = FlowEndpoint(identity=4242, namespace="default", pod_name="client")
    dst_ep = FlowEndpoint(identity=2)

    def policy_for(src_ip, src_port, dst_ip, dst_port, direction):
        calls.append((src_ip, src_port, dst_ip, dst_port, direction))
        return ProxyPolicy(rules=(DNSRule(match_pattern="*.example.com"),),
                           source=src_ep, destination=dst_ep)

    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(16)
    cache = FQDNCache()
    factory = DnsParser().proxy_factory()
    proxy = factory(lsock, direction=Direction.EGRESS, policy_for=policy_for,
                    flow_sink=flows.append, config=ProxyConfig(upstream=upstream.addr),
                    cache=cache)
    dns_loop.run(proxy.start())
    try:
        addr = lsock.getsockname()
        assert dnsutil.udp_ask(addr, "sub.example.com").header.rcode == 0
        assert dnsutil.tcp_ask(addr, "sub.example.com").header.rcode == 0
        assert dnsutil.udp_ask(addr, "kubernetes.io").header.rcode == RCODE.REFUSED
    finally:
        dns_loop.run(proxy.stop())
        lsock.close()
    assert cache.lookup_name("sub.example.com") == {"198.51.100.12"}
    assert all(c[0] == "127.0.0.1" and c[1] > 0 and c[3] == upstream.port
               and c[4] is Direction.EGRESS for c in calls)
    assert flows[0].source.identity == 4242 and flows[0].destination.identity == 2
    resp = [f for f in flows if f.is_reply][0]
    assert resp.source.identity == 2 and resp.destination.identity == 4242
    assert flows[-1].verdict is FlowVerdict.DROPPED


def test_dot_inside_a_label_cannot_pass_for_a_subdomain(harness, upstream):
    """Labels ``sub.example`` + ``com`` are NOT ``sub.example.com.``: refused."""
    from dnslib import DNSLabel, DNSQuestion, DNSRecord
    q = DNSRecord(q=DNSQuestion(DNSLabel([b"sub.example", b"com"])))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(3)
        s.sendto(q.pack(), harness.addr)
        r = DNSRecord.parse(s.recvfrom(4096)[0])
    assert r.header.rcode == RCODE.REFUSED
    assert upstream.resolver.names() == []
    assert harness.flows[0].l7["dns"]["query"] == "sub\\.example.com."


def test_ipv6_listener(dns_loop, upstream):
    from dnslib import DNSRecord
    flows: list[Flow] = []
    proxy = DnsProxy(DnsProxyConfig(listen_host="::1", upstream=upstream.addr),
                     policy_for=lambda *a: RULES, flow_sink=flows.append)
    try:
        dns_loop.run(proxy.start())
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    try:
        q = DNSRecord.question("api.twitter.com", "AAAA")
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.settimeout(3)
            s.sendto(q.pack(), ("::1", proxy.port))
            r = DNSRecord.parse(s.recvfrom(4096)[0])
        assert [str(x.rdata) for x in r.rr] == ["2001:db8::10"]
        assert flows[0].ip_source == "::1" and flows[0].ip_version == "IPv6"
    finally:
        dns_loop.run(proxy.stop())


def test_agent_upstream_connectors_are_used(dns_loop, upstream, dnsutil):
    calls: list[tuple[str, tuple, tuple]] = []

    async def udp(client, server):
        calls.append(("udp", client, server))
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setblocking(False)
        s.connect(server)
        return s

    async def tcp(client, server):
        calls.append(("tcp", client, server))
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        await asyncio.get_running_loop().sock_connect(s, server)
        return s

    proxy = DnsProxy(DnsProxyConfig(upstream=upstream.addr), policy_for=lambda *a: (),
                     connect_upstream=tcp, connect_upstream_udp=udp)
    dns_loop.run(proxy.start())
    try:
        assert dnsutil.udp_ask(proxy.address, "kubernetes.io").header.rcode == 0
        assert dnsutil.tcp_ask(proxy.address, "kubernetes.io").header.rcode == 0
    finally:
        dns_loop.run(proxy.stop())
    assert [c[0] for c in calls] == ["udp", "tcp"]
    assert all(c[1][0] == "127.0.0.1" and c[2] == upstream.addr for c in calls)


def test_tcp_connection_cap(dns_loop, upstream, dnsutil):
    proxy = DnsProxy(DnsProxyConfig(upstream=upstream.addr, max_tcp_connections=1),
                     policy_for=lambda *a: ())
    dns_loop.run(proxy.start())
    try:
        with socket.create_connection(proxy.address, timeout=3) as idle:
            deadline = time.time() + 5
            while proxy._tcp_clients < 1 and time.time() < deadline:
                time.sleep(0.01)
            try:  # closed at once (a FIN, or an RST if our query raced the close)
                refused = dnsutil.tcp_ask(proxy.address, "kubernetes.io")
            except ConnectionError:
                refused = None
            assert refused is None
            assert proxy.stats.overloaded == 1
            idle.close()
            deadline = time.time() + 5
            while proxy._tcp_clients > 0 and time.time() < deadline:
                time.sleep(0.01)
        assert dnsutil.tcp_ask(proxy.address, "kubernetes.io").header.rcode == 0
    finally:
        dns_loop.run(proxy.stop())


def test_bad_config_is_rejected():
    with pytest.raises(ValueError):
        DnsProxy(DnsProxyConfig(), policy_for=lambda *a: ())  # no upstream, not transparent
    with pytest.raises(ValueError):
        DnsProxy(DnsProxyConfig(upstream=("127.0.0.1", 53), reject_rcode="BOGUS"),
                 policy_for=lambda *a: ())
    with pytest.raises(ValueError):
        DnsProxy(DnsProxyConfig(upstream=("127.0.0.1", 53)))  # no policy callback
