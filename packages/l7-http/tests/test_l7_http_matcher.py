"""The HTTP rule matcher (shared by the proxy and policy trace)."""

from __future__ import annotations

import pytest
from axoneme.core.l7 import L7Request
from axoneme.core.plugins import load_class
from axoneme.l7.http import HeaderAction, HeaderMatch, HttpParser, HTTPRule, apply_actions

P = HttpParser()


def req(method: str = "GET", path: str = "/", host: str = "svc",
        headers: list[tuple[str, str]] | None = None) -> L7Request:
    return L7Request({"method": method, "path": path, "host": host, "headers": headers or []})


def test_entry_point_loads_the_parser() -> None:
    cls = load_class("axoneme.l7", "http")
    assert cls is HttpParser
    assert cls().proxy_factory().__name__ == "HttpProxy"


def test_empty_rules_allow_all() -> None:
    assert P.match([], req("DELETE", "/anything")).allowed


def test_no_matching_rule_denies() -> None:
    v = P.match([HTTPRule(method="GET", path="/a")], req("GET", "/b"))
    assert not v.allowed and v.rule is None


@pytest.mark.parametrize("path,allowed", [
    ("/public", True), ("/public/x", False), ("/publicx", False), ("/x/public", False),
    ("/public?x=1", False),
])
def test_path_is_anchored(path: str, allowed: bool) -> None:
    assert P.match([HTTPRule(path="/public")], req(path=path)).allowed is allowed


def test_path_regex() -> None:
    rules = [HTTPRule(path="/public/.*")]
    assert P.match(rules, req(path="/public/a/b")).allowed
    assert not P.match(rules, req(path="/public")).allowed
    assert not P.match(rules, req(path="/private/public/")).allowed


@pytest.mark.parametrize("method,allowed", [("GET", True), ("HEAD", True), ("GETX", False),
                                            ("XGET", False), ("POST", False)])
def test_method_regex_full_match(method: str, allowed: bool) -> None:
    assert P.match([HTTPRule(method="GET|HEAD")], req(method)).allowed is allowed


def test_host_regex() -> None:
    rules = [HTTPRule(host="api\\.example\\.com")]
    assert P.match(rules, req(host="api.example.com")).allowed
    assert not P.match(rules, req(host="api.example.com.evil")).allowed
    assert not P.match(rules, req(host="apiXexample.com")).allowed


def test_fields_and_rules_or() -> None:
    rules = [HTTPRule(method="GET", path="/a"), HTTPRule(method="POST", path="/b")]
    assert P.match(rules, req("GET", "/a")).rule == 0
    assert P.match(rules, req("POST", "/b")).rule == 1
    assert not P.match(rules, req("GET", "/b")).allowed
    assert not P.match(rules, req("POST", "/a")).allowed


def test_headers_presence_and_value() -> None:
    rules = [HTTPRule(headers=("X-Token", "X-Env: prod"))]
    assert P.match(rules, req(headers=[("x-token", ""), ("X-Env", "prod")])).allowed
    assert not P.match(rules, req(headers=[("X-Env", "prod")])).allowed
    assert not P.match(rules, req(headers=[("X-Token", "1"), ("X-Env", "production")])).allowed


def test_header_matches_deny_on_mismatch() -> None:
    rules = [HTTPRule(header_matches=(HeaderMatch("X-Key", "s3cret"),))]
    assert P.match(rules, req(headers=[("X-Key", "s3cret")])).allowed
    assert not P.match(rules, req(headers=[("X-Key", "other")])).allowed
    assert not P.match(rules, req()).allowed


@pytest.mark.parametrize("mismatch", ["LOG", "ADD", "DELETE", "REPLACE"])
def test_header_matches_actions_still_allow(mismatch: str) -> None:
    rules = [HTTPRule(path="/x", header_matches=(HeaderMatch("X-Key", "v", mismatch),))]
    v = P.match(rules, req(path="/x", headers=[("X-Key", "bad")]))
    assert v.allowed
    assert not P.match(rules, req(path="/y", headers=[("X-Key", "bad")])).allowed
    out = apply_actions([("X-Key", "bad"), ("A", "1")], v.actions)
    expected = {"LOG": [("X-Key", "bad"), ("A", "1")],
                "ADD": [("X-Key", "bad"), ("A", "1"), ("X-Key", "v")],
                "DELETE": [("A", "1")],
                "REPLACE": [("A", "1"), ("X-Key", "v")]}[mismatch]
    assert out == expected
    if mismatch == "LOG":
        assert v.logs and not v.actions
    else:
        assert v.actions[0] == HeaderAction(mismatch, "X-Key", "" if mismatch == "DELETE" else "v")


def test_header_match_matching_value_has_no_action() -> None:
    rules = [HTTPRule(header_matches=(HeaderMatch("X-Key", "v", "REPLACE"),))]
    assert P.match(rules, req(headers=[("x-key", "v")])).actions == ()


def test_request_from_trace() -> None:
    r = P.request_from_trace({"http_method": "POST", "http_path": "/p", "http_host": "h",
                              "http_headers": ["X-A: 1", "X-B"]})
    assert r.fields == {"method": "POST", "path": "/p", "host": "h",
                        "headers": [("X-A", "1"), ("X-B", "")]}
    rules = [HTTPRule(method="POST", path="/p", headers=("X-A: 1",))]
    assert P.match(rules, r).allowed
    assert not P.match(rules, P.request_from_trace({"http_method": "GET", "http_path": "/p"})).allowed


def test_invalid_regex_denies() -> None:
    assert not P.match([HTTPRule(path="(")], req(path="(")).allowed


# Issue 13: with backtracking ``re`` 33 bytes of this path took 3.8 s and
# stalled every proxy of the agent; RE2 is linear in the path.
REDOS = r"/files/([a-z0-9]+/?)+\.txt"


@pytest.mark.timeout(10)
def test_redos_path_regex_returns_on_hostile_path() -> None:
    rules = [HTTPRule(path=REDOS), HTTPRule(host=r"(a|aa)+\.svc")]
    v = P.match(rules, req(path="/files/" + "a" * 10_000 + "!", host="a" * 10_000 + "!"))
    assert not v.allowed and v.rule is None
    assert P.match(rules, req(path="/files/a/b/c.txt")).rule == 0


def test_regex_outside_re2_matches_nothing() -> None:
    # Validation refuses these; a rule that bypassed it must deny, not allow.
    assert not P.match([HTTPRule(path=r"/(?=a).*")], req(path="/a")).allowed
    assert not P.match([HTTPRule(method=r"(GET)\1")], req(method="GETGET")).allowed


def test_header_spec_trims_only_ows() -> None:
    # "\x85" (NEL) is whitespace to str.strip(), not to HTTP
    rule = HTTPRule(headers=("X-A: \x85v",))
    assert not P.match([rule], req(headers=[("X-A", "v")])).allowed
    assert P.match([rule], req(headers=[("X-A", "\x85v")])).allowed


def test_trace_matches_the_normalised_path_like_the_proxy() -> None:
    rules = [HTTPRule(path="/public(/.*)?")]
    assert not P.match(rules, P.request_from_trace({"http_path": "/public/../admin"})).allowed
    assert P.match(rules, P.request_from_trace({"http_path": "/public/x/%2e%2e/y"})).allowed
