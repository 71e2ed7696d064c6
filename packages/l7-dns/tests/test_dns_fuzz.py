"""Hypothesis fuzzing of the DNS proxy: random datagrams and random queries.

Properties: the proxy never crashes (it still answers afterwards) and no
query the rules refuse ever reaches the upstream.
"""

from __future__ import annotations

import socket

import pytest
from axoneme.l7.dns import DnsProxy, DnsProxyConfig, DNSRule, FQDNCache, match_name, parse_query
from dnslib import RCODE, DNSLabel, DNSQuestion, DNSRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

RULES = (DNSRule(match_name="api.twitter.com"), DNSRule(match_pattern="*.example.com"))
FUZZ = settings(max_examples=120, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture
def proxy(dns_loop, upstream):
    p = DnsProxy(DnsProxyConfig(upstream=upstream.addr, upstream_timeout=0.5),
                 policy_for=lambda *a: RULES, cache=FQDNCache())
    dns_loop.run(p.start())
    try:
        yield p
    finally:
        dns_loop.run(p.stop())


def _allowed(name: str) -> bool:
    return any(match_name(r.match_name or r.match_pattern, name) for r in RULES)


def _check_still_serving(proxy, upstream, dnsutil) -> None:
    # retry like a stub resolver: a burst of junk can overflow the socket's
    # receive buffer, and the kernel then drops the canary itself
    for _ in range(5):
        r = dnsutil.udp_ask(proxy.address, "api.twitter.com", timeout=1)
        if r is not None:
            break
    assert r is not None and r.header.rcode == RCODE.NOERROR
    assert proxy.stats.malformed > 0
    for name in upstream.resolver.names():
        assert _allowed(name), f"refused name {name!r} reached the upstream"


label = st.one_of(
    st.sampled_from([b"api", b"twitter", b"com", b"example", b"sub", b"a", b"b",
                     b"kubernetes", b"io", b"EXAMPLE", b"Sub", b"sub.example", b"*"]),
    st.text(st.characters(max_codepoint=127), min_size=1, max_size=12).map(str.encode),
    st.binary(min_size=1, max_size=12),
)


@FUZZ
@given(st.binary(max_size=600))
def test_random_datagrams(proxy, upstream, dnsutil, data):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(data, proxy.address)
        s.settimeout(0.02)
        try:
            reply = s.recvfrom(65535)[0]
            DNSRecord.parse(reply)  # whatever comes back is a DNS message
        except TimeoutError:
            pass
    for name in upstream.resolver.names():
        assert _allowed(name), f"refused name {name!r} reached the upstream"


@FUZZ
@given(st.lists(label, min_size=0, max_size=5),
       st.sampled_from(["A", "AAAA", "TXT", "MX", "ANY", "CNAME"]),
       st.integers(0, 65535))
def test_random_queries(proxy, upstream, dnsutil, labels, qtype, ident):
    from dnslib import QTYPE, DNSHeader
    q = DNSRecord(DNSHeader(id=ident, rd=1),
                  q=DNSQuestion(DNSLabel(labels), getattr(QTYPE, qtype)))
    try:
        data = q.pack()
    except Exception:  # dnslib cannot encode it (e.g. label too long): nothing to send
        return
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        # dnslib cannot parse some labels it encodes (non-UTF-8): those
        # queries are dropped, so don't wait long for an answer
        s.settimeout(0.15)
        s.sendto(data, proxy.address)
        try:
            reply = DNSRecord.parse(s.recvfrom(65535)[0])
        except TimeoutError:
            reply = None
    if reply is not None:
        assert reply.header.id == ident
        name = parse_query(data).qname
        if _allowed(name):
            assert reply.header.rcode in (RCODE.NOERROR, RCODE.NXDOMAIN), name
        else:
            assert reply.header.rcode == RCODE.REFUSED, name
    for name in upstream.resolver.names():
        assert _allowed(name), f"refused name {name!r} reached the upstream"


@FUZZ
@given(st.binary(min_size=1, max_size=300))
def test_random_tcp_streams(proxy, upstream, dnsutil, data):
    with socket.create_connection(proxy.address, timeout=2) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        s.settimeout(0.15)
        try:
            while s.recv(65535):
                pass
        except (TimeoutError, ConnectionError):
            pass
    for name in upstream.resolver.names():
        assert _allowed(name), f"refused name {name!r} reached the upstream"


def test_after_fuzzing_the_proxy_still_serves(proxy, upstream, dnsutil):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for n in range(300):
            s.sendto(bytes((n * 7 + i) % 256 for i in range(n % 64)), proxy.address)
    _check_still_serving(proxy, upstream, dnsutil)
