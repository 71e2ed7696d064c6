"""Policy regexes go through RE2 (``axoneme.core.regex``): linear time, and
what RE2 cannot express is refused when the policy is parsed."""

from __future__ import annotations

from typing import Any

import pytest
from axoneme.core.errors import InvalidRule
from axoneme.core.policy.parse import parse_policy_obj
from axoneme.core.regex import MAX_PATTERN_LEN, compile_regex, fullmatch, regex_problem

# Issue 13: 33 bytes of this took 3.8 s with Python's re, x4 per two more.
REDOS = r"/files/([a-z0-9]+/?)+\.txt"


@pytest.mark.timeout(10)
def test_redos_pattern_matches_hostile_input_in_bounded_time() -> None:
    hostile = "/files/" + "a" * 10_000 + "!"
    assert fullmatch(REDOS, hostile) is False
    assert fullmatch(REDOS, "/files/" + "a/" * 5_000 + "x.txt") is True


@pytest.mark.timeout(10)
@pytest.mark.parametrize("pattern", [r"(x+x+)+y", r"(a|aa)+$", r"(.*a){20}", r"^(\w+\s?)*$"])
def test_classic_redos_patterns_are_linear(pattern: str) -> None:
    assert fullmatch(pattern, "x" * 50_000 + "!") is False
    assert fullmatch(pattern, "a" * 50_000 + "!") is False


@pytest.mark.parametrize(("pattern", "value", "expected"), [
    ("/public", "/public", True),
    ("/public", "/public/x", False),  # whole value, as Cilium/Envoy
    ("/public", "x/public", False),
    ("/public.*", "/public/x?y=1", True),
    ("GET|HEAD", "HEAD", True),
    ("GET|HEAD", "GETX", False),
    (r"/v\d+/", "/v12/", True),
    ("(?i)/Admin", "/aDMIN", True),
    ("/a$", "/a\n", False),  # Python's $ would allow a trailing newline
    ("h.t", "h\u00e9t", True),  # one codepoint, as Python: "é" is not two bytes
    ("h..t", "h\u00e9t", False),
])
def test_fullmatch_semantics(pattern: str, value: str, expected: bool) -> None:
    assert fullmatch(pattern, value) is expected


@pytest.mark.parametrize(("pattern", "why"), [
    (r"(a)\1", "invalid escape sequence"),  # backreference
    (r"(?=a)a", "invalid perl operator"),  # lookahead
    (r"(?!a)b", "invalid perl operator"),
    (r"(?<=a)b", "invalid perl operator"),  # lookbehind
    (r"a++", "bad repetition operator"),  # possessive
    (r"(?>a)", "invalid perl operator"),  # atomic group
    (r"/x\Z", "invalid escape sequence"),  # RE2 spells it \z
    (r"a{1001}", "invalid repetition size"),
    ("[^x]{1000}" * 15, "pattern too large"),  # max_mem bound
    ("a" * (MAX_PATTERN_LEN + 1), "longer than"),
    ("a\x00", "NUL"),
    ("\ud800", "not valid Unicode"),
    ("/a[b", "missing ]"),
])
def test_what_re2_cannot_express_is_a_problem(pattern: str, why: str) -> None:
    problem = regex_problem(pattern)
    assert problem is not None and why in problem
    # ... and a rule that somehow carries it matches nothing (deny).
    assert fullmatch(pattern, "a") is False


def test_compiled_programs_are_cached() -> None:
    assert compile_regex("/cached/.*") is compile_regex("/cached/.*")


def _cnp(http: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": "re", "namespace": "default"},
            "spec": {"endpointSelector": {}, "ingress": [{"toPorts": [{
                "ports": [{"port": "80", "protocol": "TCP"}],
                "rules": {"http": [{"path": "/ok"}, http]}}]}]}}


@pytest.mark.parametrize(("field", "pattern"), [
    ("path", r"/(a)\1"), ("path", r"/(?=admin)"), ("host", r"(?<!evil)\.example\.com"),
    ("method", r"GET++"),
])
def test_parse_refuses_non_re2_regex_with_the_field_path(field: str, pattern: str) -> None:
    with pytest.raises(InvalidRule) as e:
        parse_policy_obj(_cnp({field: pattern}))
    fields = [p.field for p in e.value.problems]
    assert fields == [f"spec.ingress[0].toPorts[0].rules.http[1].{field}"]
    assert "RE2" in e.value.problems[0].message


def test_parse_accepts_the_redos_pattern_which_re2_runs_linearly() -> None:
    pol = parse_policy_obj(_cnp({"path": REDOS}))
    assert pol.ref.name == "re"
