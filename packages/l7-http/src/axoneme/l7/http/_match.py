"""The HTTP rule matcher: one implementation for the proxy and ``policy trace``
(``HttpParser.match`` and ``HttpProxy`` both call ``match_rules``).

Semantics (Cilium rules.http[], enforced by Envoy there):

1. An empty rule list allows every request (visibility only).
2. A request is allowed if at least one rule matches; a request matching no
   rule is denied.
3. Within a rule every given field must match (AND):
   - ``method``, ``path``, ``host`` are RE2 regexes (``axoneme.core.regex``:
     linear time, no backreferences or lookaround, as Cilium/Envoy) matched
     against the WHOLE value: ``/public`` does not allow ``/public/x``.
     ``path`` is matched against the request-target exactly as the upstream
     receives it (origin-form, normalised as ``_wire`` says, query included,
     like Envoy's ``:path``);
     ``host`` against the Host header as sent (port included).
   - ``headers``: ``"Name"`` requires the header to be present,
     ``"Name: value"`` requires a header of that name with exactly that value.
   - ``headerMatches``: a header ``name`` with value ``value`` (or present when
     no value). On mismatch, ``mismatch`` "" makes the rule not match; LOG,
     ADD, DELETE, REPLACE keep it matching, and ADD/DELETE/REPLACE modify the
     forwarded request (``HttpVerdict.actions``).
4. The first matching rule decides (its index and actions are reported).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from axoneme.core.l7 import L7Request, L7Verdict
from axoneme.core.regex import fullmatch as regex_fullmatch
from axoneme.l7.http._rules import HeaderMatch, HTTPRule

LOG = logging.getLogger(__name__)

Headers = Sequence[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class HeaderAction:
    """A modification of the forwarded request: op is ADD | DELETE | REPLACE."""

    op: str
    name: str
    value: str = ""


@dataclass(frozen=True, slots=True)
class HttpVerdict(L7Verdict):
    """An L7Verdict plus the header modifications of the matching rule."""

    actions: tuple[HeaderAction, ...] = ()
    logs: tuple[str, ...] = ()  # LOG mismatches, for the access log


# Values up to this length have their match results cached: a keep-alive
# client repeats the same method/path/host, and one RE2 call through its
# Python wrapper costs more than parsing the whole request head. Bounded
# (entries x length), so distinct attacker paths only evict, never grow it.
_CACHED_VALUE = 256


@functools.lru_cache(maxsize=4096)
def _cached_fullmatch(pattern: str, value: str) -> bool:
    return regex_fullmatch(pattern, value)


def _full(pattern: str | None, value: str) -> bool:
    if not pattern:  # empty = any
        return True
    # RE2, linear in the value (the request comes from a pod); a pattern that
    # validation would refuse matches nothing, so it can only deny.
    if len(value) <= _CACHED_VALUE:
        return _cached_fullmatch(pattern, value)
    return regex_fullmatch(pattern, value)


def _values(headers: Headers, name: str) -> list[str]:
    lname = name.lower()
    return [v for n, v in headers if n.lower() == lname]


def _header_present(spec: str, headers: Headers) -> bool:
    name, sep, value = spec.partition(":")
    # OWS is SP/HTAB only (RFC 9110): str.strip() would also eat NEL etc.
    name = name.strip(" \t")
    if not sep:
        return any(n.lower() == name.lower() for n, _ in headers)
    return value.strip(" \t") in _values(headers, name)


def _header_match(hm: HeaderMatch, headers: Headers) -> tuple[bool, HeaderAction | None, str]:
    """(rule still matches, action, log line) for one headerMatches item."""
    present = any(n.lower() == hm.name.lower() for n, _ in headers)
    if hm.value is None:
        ok = present
    else:
        ok = hm.value in _values(headers, hm.name)
    if ok:
        return True, None, ""
    mismatch = (hm.mismatch or "").upper()
    if mismatch == "":
        return False, None, ""
    log = f"header {hm.name} mismatch ({mismatch})"
    if mismatch == "LOG":
        return True, None, log
    if mismatch in ("ADD", "REPLACE"):
        return True, HeaderAction(mismatch, hm.name, hm.value or ""), log
    if mismatch == "DELETE":
        return True, HeaderAction("DELETE", hm.name), log
    LOG.warning("unknown headerMatches mismatch action %r: treated as deny", hm.mismatch)
    return False, None, ""


def rule_matches(rule: HTTPRule, method: str, path: str, host: str, headers: Headers
                 ) -> tuple[bool, tuple[HeaderAction, ...], tuple[str, ...]]:
    if not _full(rule.method, method) or not _full(rule.path, path) or not _full(rule.host, host):
        return False, (), ()
    for spec in rule.headers:
        if not _header_present(spec, headers):
            return False, (), ()
    actions: list[HeaderAction] = []
    logs: list[str] = []
    for hm in rule.header_matches:
        ok, action, log = _header_match(hm, headers)
        if not ok:
            return False, (), ()
        if action is not None:
            actions.append(action)
        if log:
            logs.append(log)
    return True, tuple(actions), tuple(logs)


def apply_actions(headers: Headers, actions: Sequence[HeaderAction]) -> list[tuple[str, str]]:
    """The forwarded headers after a verdict's ADD/DELETE/REPLACE actions."""
    out = list(headers)
    for a in actions:
        lname = a.name.lower()
        if a.op == "ADD":
            out.append((a.name, a.value))
        elif a.op == "DELETE":
            out = [(n, v) for n, v in out if n.lower() != lname]
        elif a.op == "REPLACE":
            out = [(n, v) for n, v in out if n.lower() != lname]
            out.append((a.name, a.value))
    return out





def match_rules(rules: Sequence[Any], request: L7Request) -> HttpVerdict:
    """Decide one request (fields method, path, host, headers) against ``rules.http``."""
    f = request.fields
    method = str(f.get("method", ""))
    path = str(f.get("path", ""))
    host = str(f.get("host", ""))
    headers: Headers = f.get("headers", ())
    if not rules:
        return HttpVerdict(True, None, "no HTTP rules: all requests allowed")
    for i, rule in enumerate(rules):
        if not isinstance(rule, HTTPRule):
            LOG.warning("ignoring non-HTTP rule %r", rule)
            continue
        ok, actions, logs = rule_matches(rule, method, path, host, headers)
        if ok:
            return HttpVerdict(True, i, f"matched HTTP rule {i}", actions, logs)
    return HttpVerdict(False, None, "no HTTP rule matched")


__all__ = ["HeaderAction", "HttpVerdict", "apply_actions", "match_rules", "rule_matches"]
