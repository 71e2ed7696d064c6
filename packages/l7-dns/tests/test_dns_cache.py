"""FQDNCache: TTLs, min TTL, expiry, CNAME chains, cap eviction, snapshot/restore."""

from __future__ import annotations

import json

import pytest
from axoneme.core.policy.api import FQDNPeer
from axoneme.l7.dns import FQDNCache, parse_answer, parse_query
from dnslib import CNAME, QTYPE, RR, A, DNSRecord


def test_record_lookup_and_ttl():
    c = FQDNCache()
    assert c.record("API.twitter.com", ["198.51.100.10"], 60, now=1000) == {"api.twitter.com."}
    assert c.lookup(FQDNPeer(match_name="api.twitter.com")) == {"198.51.100.10"}
    assert c.lookup_name("api.twitter.com.") == {"198.51.100.10"}
    (e,) = c.entries()
    assert e.expires == 1060
    assert c.expire(now=1059) == frozenset()
    assert c.expire(now=1060) == {"api.twitter.com."}
    assert c.lookup(FQDNPeer(match_name="api.twitter.com")) == frozenset()
    assert len(c) == 0


def test_min_ttl_raises_short_ttls():
    c = FQDNCache(min_ttl=3600)
    c.record("a.example.com", ["198.51.100.1"], 5, now=0)
    assert c.entries()[0].expires == 3600
    c.record("b.example.com", ["198.51.100.2"], 7200, now=0)
    assert {e.name: e.expires for e in c.entries()}["b.example.com."] == 7200


def test_refresh_extends_never_shortens_and_is_not_a_change():
    c = FQDNCache()
    c.record("x.example.com", ["198.51.100.1"], 100, now=0)
    assert c.record("x.example.com", ["198.51.100.1"], 10, now=50) == frozenset()
    assert c.entries()[0].expires == 100
    assert c.record("x.example.com", ["198.51.100.1"], 300, now=50) == frozenset()
    assert c.entries()[0].expires == 350
    assert c.entries()[0].learned == 0


def test_lookup_by_pattern():
    c = FQDNCache()
    c.record("sub.example.com", ["198.51.100.12"], 60, now=0)
    c.record("example.com", ["198.51.100.13"], 60, now=0)
    c.record("a.b.example.com", ["198.51.100.16"], 60, now=0)
    assert c.lookup(FQDNPeer(match_pattern="*.example.com")) == {"198.51.100.12"}
    assert c.lookup(FQDNPeer(match_pattern="**.example.com")) == {"198.51.100.12",
                                                                   "198.51.100.16"}
    assert c.lookup(FQDNPeer(match_pattern="*")) == {"198.51.100.12", "198.51.100.13",
                                                     "198.51.100.16"}
    assert c.names_matching(FQDNPeer(match_pattern="*.example.com")) == {"sub.example.com."}
    assert c.names_for_ip("198.51.100.13") == {"example.com."}


def _answer(qname: str, records: list[tuple[str, str, str, int]]):
    q = DNSRecord.question(qname)
    r = q.reply()
    for name, rtype, value, ttl in records:
        rdata = CNAME(value) if rtype == "CNAME" else A(value)
        r.add_answer(RR(name, getattr(QTYPE, rtype), rdata=rdata, ttl=ttl))
    return parse_answer(r.pack(), parse_query(q.pack()))


def test_cname_chain_ips_belong_to_every_name():
    ans = _answer("www.example.com", [
        ("edge.example.net", "A", "198.51.100.14", 45),      # order does not matter
        ("www.example.com", "CNAME", "cdn.example.org", 300),
        ("cdn.example.org", "CNAME", "edge.example.net", 200),
        ("edge.example.net", "A", "198.51.100.15", 50),
        ("unrelated.example", "A", "198.51.100.99", 999),     # not on the chain
    ])
    assert ans.names == ("www.example.com.", "cdn.example.org.", "edge.example.net.")
    assert ans.cnames == ("cdn.example.org.", "edge.example.net.")
    assert ans.ttl == 45
    c = FQDNCache()
    changed = c.record_answer(ans, now=0)
    assert changed == {"www.example.com.", "cdn.example.org.", "edge.example.net."}
    for name in changed:
        assert c.lookup_name(name) == {"198.51.100.14", "198.51.100.15"}
    assert c.lookup_name("unrelated.example") == frozenset()


def test_cname_loop_terminates():
    ans = _answer("a.example.com", [("a.example.com", "CNAME", "b.example.com", 60),
                                    ("b.example.com", "CNAME", "a.example.com", 60)])
    assert ans.names == ("a.example.com.", "b.example.com.")
    assert ans.ips == ()
    assert FQDNCache().record_answer(ans) == frozenset()


def test_cap_evicts_the_oldest():
    c = FQDNCache(max_ips_per_name=3)
    for i in range(3):
        c.record("many.example.com", [f"198.51.100.{i}"], 100 + i, now=0)
    assert c.record("many.example.com", ["198.51.100.50"], 1000, now=10) == {"many.example.com."}
    assert c.lookup_name("many.example.com") == {"198.51.100.1", "198.51.100.2",
                                                 "198.51.100.50"}
    # one answer bigger than the cap keeps only cap entries
    c2 = FQDNCache(max_ips_per_name=5)
    c2.record("big.example.com", [f"198.51.100.{i}" for i in range(20)], 60, now=0)
    assert len(c2.lookup_name("big.example.com")) == 5


def test_change_notifications():
    seen: list[frozenset[str]] = []
    c = FQDNCache(on_change=seen.append)
    more: list[frozenset[str]] = []
    unsubscribe = c.subscribe(more.append)
    c.record("a.example.com", ["198.51.100.1"], 10, now=0)
    c.record("a.example.com", ["198.51.100.1"], 20, now=0)  # refresh only: no event
    c.expire(now=100)
    unsubscribe()
    c.record("b.example.com", ["198.51.100.2"], 10, now=0)
    assert seen == [{"a.example.com."}, {"a.example.com."}, {"b.example.com."}]
    assert more == [{"a.example.com."}, {"a.example.com."}]


def test_a_failing_subscriber_does_not_break_the_cache():
    def boom(names):
        raise RuntimeError("subscriber bug")
    c = FQDNCache(on_change=boom)
    assert c.record("a.example.com", ["198.51.100.1"], 10, now=0) == {"a.example.com."}
    assert c.lookup_name("a.example.com") == {"198.51.100.1"}


def test_snapshot_restore_roundtrip_through_json():
    c = FQDNCache(min_ttl=10, max_ips_per_name=7)
    c.record("a.example.com", ["198.51.100.1", "2001:db8::1"], 100, now=0)
    c.record("b.example.com", ["198.51.100.2"], 5, now=0)  # -> 10 by min_ttl
    data = json.loads(json.dumps(c.snapshot()))
    seen: list[frozenset[str]] = []
    r = FQDNCache.from_snapshot(data, now=50, on_change=seen.append)
    assert r.min_ttl == 10 and r.max_ips_per_name == 7
    assert r.lookup_name("a.example.com") == {"198.51.100.1", "2001:db8::1"}
    assert r.lookup_name("b.example.com") == frozenset()  # expired meanwhile
    assert seen == [{"a.example.com."}]
    assert [e.expires for e in r.entries()] == [100, 100]


def test_restore_rejects_garbage_and_skips_bad_entries():
    c = FQDNCache()
    with pytest.raises(ValueError):
        c.restore({"version": 99})
    changed = c.restore({"version": 1, "entries": [
        {"name": "ok.example.com", "ip": "198.51.100.1", "expires": 100},
        {"name": "bad.example.com", "ip": "not-an-ip", "expires": 100},
        {"ip": "198.51.100.2"},
    ]}, now=0)
    assert changed == {"ok.example.com."}


def test_non_noerror_answers_teach_nothing():
    q = DNSRecord.question("nx.example.com")
    r = q.reply()
    r.header.rcode = 3
    ans = parse_answer(r.pack(), parse_query(q.pack()))
    assert FQDNCache().record_answer(ans) == frozenset()


def test_next_expiry_and_forget():
    c = FQDNCache()
    assert c.next_expiry() is None
    c.record("a.example.com", ["198.51.100.1"], 30, now=0)
    c.record("b.example.com", ["198.51.100.2"], 10, now=0)
    assert c.next_expiry() == 10
    assert c.forget("B.example.com") == {"b.example.com."}
    assert c.names() == {"a.example.com."}
    assert c.clear() == {"a.example.com."}


def test_run_expiry_task_expires_due_entries():
    import asyncio

    async def scenario():
        seen: list[frozenset[str]] = []
        c = FQDNCache(on_change=seen.append)
        c.record("short.example.com", ["198.51.100.1"], 0)  # due at once
        c.record("long.example.com", ["198.51.100.2"], 3600)
        task = asyncio.create_task(c.run_expiry(max_interval=0.05, min_interval=0.01))
        for _ in range(200):
            if c.names() == {"long.example.com."}:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        return c.names(), seen

    names, seen = asyncio.run(scenario())
    assert names == {"long.example.com."}
    assert frozenset({"short.example.com."}) in seen
