"""matchName / matchPattern semantics, validation and the DnsParser verdicts."""

from __future__ import annotations

import pytest
from axoneme.core.l7 import L7Verdict
from axoneme.core.policy.api import FQDNPeer
from axoneme.l7.dns import (
    DnsParser,
    DNSRule,
    match_exact,
    match_name,
    match_pattern,
    normalize_name,
    rule_matches,
    validate_name,
    validate_pattern,
)
from hypothesis import given
from hypothesis import strategies as st


@pytest.mark.parametrize("name,qname,expected", [
    ("example.com", "example.com.", True),
    ("example.com.", "example.com", True),
    ("Example.COM", "example.com.", True),
    ("example.com", "EXAMPLE.com.", True),
    ("example.com", "sub.example.com.", False),
    ("sub.example.com", "example.com.", False),
    ("example.com", "example.co.", False),
    ("example.com", "example.com.evil.", False),
])
def test_match_exact(name, qname, expected):
    assert match_exact(name, qname) is expected
    assert match_name(name, qname) is expected
    assert rule_matches(DNSRule(match_name=name), qname) is expected


@pytest.mark.parametrize("pattern,qname,expected", [
    ("*.example.com", "sub.example.com.", True),
    ("*.example.com", "SUB.Example.com", True),
    ("*.example.com.", "sub.example.com", True),
    ("*.example.com", "example.com.", False),
    ("*.example.com", "a.b.example.com.", False),
    ("*.example.com", "subexample.com.", False),
    ("*.example.com", "sub.example.com.evil.", False),
    ("*", "anything.at.all.", True),
    ("*", "com.", True),
    ("*", ".", True),
    ("api-*.example.com", "api-v2.example.com.", True),
    ("api-*.example.com", "api-.example.com.", True),
    ("api-*.example.com", "api.example.com.", False),
    ("*.*.svc.cluster.local", "web.default.svc.cluster.local.", True),
    ("*.*.svc.cluster.local", "default.svc.cluster.local.", False),
    ("**.example.com", "a.example.com.", True),
    ("**.example.com", "a.b.c.example.com.", True),
    ("**.example.com", "example.com.", False),
    ("**.example.com", "a.example.org.", False),
    ("kubernetes.io", "kubernetes.io.", True),  # no wildcard: exact
    ("kubernetes.io", "xkubernetes.io.", False),
    ("a.b", "axb.", False),  # '.' is literal, not a regex dot
])
def test_match_pattern(pattern, qname, expected):
    assert match_pattern(pattern, qname) is expected
    assert match_name(pattern, qname) is expected
    assert rule_matches(DNSRule(match_pattern=pattern), qname) is expected
    assert rule_matches(FQDNPeer(match_pattern=pattern), qname) is expected


def test_rule_with_nothing_matches_nothing():
    assert not rule_matches(DNSRule(), "example.com.")
    assert rule_matches({"matchPattern": "*"}, "example.com.")
    assert rule_matches({"matchName": "example.com"}, "example.com.")


@given(st.from_regex(r"[-a-z0-9_]{1,20}", fullmatch=True))
def test_star_label_matches_any_single_label(label):
    assert match_pattern("*.example.com", f"{label}.example.com.")
    assert not match_pattern("*.example.com", f"{label}.x.example.com.")
    assert match_pattern("**.example.com", f"{label}.x.example.com.")


def test_normalize_name():
    assert normalize_name("Example.COM") == "example.com."
    assert normalize_name("example.com.") == "example.com."
    assert normalize_name("") == "."


@pytest.mark.parametrize("value,expected", [
    ("Example.com", "example.com."),
    ("example.com.", "example.com."),
    ("my_host-1.example.com", "my_host-1.example.com."),
])
def test_validate_name_ok(value, expected):
    assert validate_name(value) == expected


@pytest.mark.parametrize("value", ["", "   ", "exa mple.com", "a..b", "*.example.com",
                                   "ex@mple.com", "a" * 300])
def test_validate_name_rejects(value):
    with pytest.raises(ValueError):
        validate_name(value)


@pytest.mark.parametrize("value,expected", [
    ("*", "*"),
    ("*.Example.com", "*.example.com."),
    ("**.example.com", "**.example.com."),
    ("api-*.example.com.", "api-*.example.com."),
])
def test_validate_pattern_ok(value, expected):
    assert validate_pattern(value) == expected


@pytest.mark.parametrize("value", ["", "a..b", "ex@mple.com", "a.**.com", "*.ex/ample.com",
                                   "x**.example.com", "."])
def test_validate_pattern_rejects(value):
    with pytest.raises(ValueError):
        validate_pattern(value)


# --- DnsParser ----------------------------------------------------------------

RULES = (DNSRule(match_name="kubernetes.io"), DNSRule(match_pattern="*.example.com"))


@pytest.mark.parametrize("qname,allowed,rule", [
    ("kubernetes.io.", True, 0),
    ("KUBERNETES.IO", True, 0),
    ("sub.example.com.", True, 1),
    ("example.com.", False, None),
    ("a.b.example.com.", False, None),
    ("api.twitter.com.", False, None),
])
def test_parser_match(qname, allowed, rule):
    v = DnsParser().match(RULES, DnsParser().request_from_trace({"dns_query": qname}))
    assert isinstance(v, L7Verdict)
    assert v.allowed is allowed
    assert v.rule == rule
    assert v.reason


def test_parser_empty_rules_allow_all():
    v = DnsParser().match((), DnsParser().request_from_trace({"dns_query": "whatever.org"}))
    assert v.allowed


def test_parser_qtype_does_not_matter():
    p = DnsParser()
    for qtype in ("A", "AAAA", "TXT", "MX"):
        req = p.request_from_trace({"dns_query": "kubernetes.io", "dns_qtype": qtype})
        assert req.fields["qtype"] == qtype
        assert p.match(RULES, req).allowed
        req = p.request_from_trace({"dns_query": "evil.io", "dns_qtype": qtype})
        assert not p.match(RULES, req).allowed


def test_parser_request_without_name_is_denied():
    assert not DnsParser().match(RULES, DnsParser().request_from_trace({})).allowed


def test_parser_entry_point_and_factory():
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="axoneme.l7") if e.name == "dns"]
    assert ep.load() is DnsParser
    assert DnsParser.name == "dns"
    factory = DnsParser().proxy_factory()
    assert callable(factory)
