"""DNS name matching with Cilium's ``matchName`` / ``matchPattern`` semantics.

Pure functions, shared by the DNS proxy (per query), ``axoneme policy trace``
and the FQDN cache (``toFQDNs`` selectors). Names are compared in Cilium's
normal form: lower-case, with a trailing dot (``API.Example.com`` and
``api.example.com.`` are the same name).

Pattern language (Cilium pkg/fqdn/matchpattern):

1. ``*`` alone matches every name (including the root ``.``).
2. ``**.`` as the *first* label (newer Cilium) matches one or more whole
   labels: ``**.example.com`` matches ``a.example.com`` and
   ``a.b.example.com`` but not ``example.com``.
3. Any other ``*`` matches zero or more DNS characters (``[-a-z0-9_]``) and
   never a ``.``: ``*.example.com`` matches ``sub.example.com`` but neither
   ``example.com`` nor ``a.b.example.com``; ``api-*.example.com`` matches
   ``api-.example.com`` and ``api-v2.example.com``.
4. Everything else is literal. A name without ``*`` is an exact match, so a
   pattern without wildcards behaves like ``matchName``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

from axoneme.core.l7 import L7Request, L7Verdict
from axoneme.core.regex import RegexError, compile_regex, escape

__all__ = [
    "ALLOWED_NAME_CHARS", "normalize_name", "validate_name", "validate_pattern",
    "compile_pattern", "match_name", "match_pattern", "match_exact", "match_query", "rule_matches",
]

# Cilium allowedDNSCharsREGroup, lower-case because names are normalised first.
_DNS_CHAR = "[-a-z0-9_]"
ALLOWED_NAME_CHARS = "a-z, 0-9, '-', '_', '.'"
_NAME_RE = re.compile(r"^(?:[-a-z0-9_]+\.)*[-a-z0-9_]*\.$|^\.$")
_PATTERN_RE = re.compile(r"^[-a-z0-9_.*]+$")
MAX_NAME_LEN = 255


def normalize_name(name: str) -> str:
    """Lower-case with exactly one trailing dot (``""`` and ``"."`` give ``"."``)."""
    name = name.strip().lower()
    if not name.endswith("."):
        name += "."
    return name


def validate_name(name: str) -> str:
    """Check a ``matchName``; returns it normalised or raises ValueError saying why."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError("matchName must be a non-empty string")
    norm = normalize_name(name)
    if len(norm) > MAX_NAME_LEN:
        raise ValueError(f"matchName \"{name}\" is longer than {MAX_NAME_LEN} characters")
    if ".." in norm or not _NAME_RE.match(norm):
        raise ValueError(f"invalid matchName \"{name}\" (allowed: {ALLOWED_NAME_CHARS})")
    return norm


def validate_pattern(pattern: str) -> str:
    """Check a ``matchPattern``; returns it normalised or raises ValueError saying why.

    Allowed: DNS characters, ``.`` and ``*``; ``**`` only as a whole leading
    ``**.`` label.
    """
    if not isinstance(pattern, str) or not pattern.strip():
        raise ValueError("matchPattern must be a non-empty string")
    norm = pattern.strip().lower()
    if norm == "*":
        return norm
    norm = normalize_name(norm)
    if len(norm) > MAX_NAME_LEN:
        raise ValueError(f"matchPattern \"{pattern}\" is longer than {MAX_NAME_LEN} characters")
    if not _PATTERN_RE.match(norm) or ".." in norm or norm == ".":
        raise ValueError(f"invalid matchPattern \"{pattern}\" "
                         f"(allowed: {ALLOWED_NAME_CHARS}, '*')")
    body = norm[3:] if norm.startswith("**.") else norm
    if "**" in body:
        raise ValueError(f"invalid matchPattern \"{pattern}\": '**' is only allowed as "
                         "a leading '**.' label")
    return norm


@functools.lru_cache(maxsize=4096)
def compile_pattern(pattern: str) -> Any:
    """The RE2 program for one (already lower-case or not) pattern, matched
    with ``fullmatch``. RE2 (``axoneme.core.regex``) like every policy regex:
    the query name comes from a pod, so matching must stay linear in it."""
    p = pattern.strip().lower()
    if p == "*":
        return compile_regex(r"(?s:.*)")
    p = normalize_name(p)
    prefix = ""
    if p.startswith("**."):
        # one or more whole labels in front of the rest
        prefix = rf"(?:{_DNS_CHAR}+\.)+"
        p = p[3:]
    body = "".join(f"{_DNS_CHAR}*" if c == "*" else escape(c) for c in p)
    return compile_regex(prefix + body)


def match_exact(name: str, qname: str) -> bool:
    """``matchName``: exact, case-insensitive, trailing-dot tolerant."""
    return normalize_name(name) == normalize_name(qname)


def match_pattern(pattern: str, qname: str) -> bool:
    """``matchPattern`` semantics (see the module docstring)."""
    try:
        return compile_pattern(pattern).fullmatch(normalize_name(qname)) is not None
    except (RegexError, UnicodeError):  # refused by validation / not a DNS name
        return False


def match_name(pattern_or_name: str, qname: str) -> bool:
    """Match a ``matchName`` or ``matchPattern`` value against a query name.

    A value without ``*`` is an exact name; with ``*`` it is a pattern. The two
    coincide for wildcard-free values, so one function serves both fields.
    """
    if "*" in pattern_or_name:
        return match_pattern(pattern_or_name, qname)
    return match_exact(pattern_or_name, qname)


def _fields(rule: Any) -> tuple[str | None, str | None]:
    if isinstance(rule, Mapping):
        return (rule.get("match_name", rule.get("matchName")),
                rule.get("match_pattern", rule.get("matchPattern")))
    return getattr(rule, "match_name", None), getattr(rule, "match_pattern", None)


def rule_matches(rule: Any, qname: str) -> bool:
    """Whether one ``DNSRule`` / ``FQDNPeer`` (or a ``{matchName|matchPattern}``
    mapping) selects ``qname``. A rule with neither field matches nothing."""
    name, pattern = _fields(rule)
    if name:
        return match_exact(name, qname)
    if pattern:
        return match_pattern(pattern, qname)
    return False


def match_query(rules: Sequence[Any], request: L7Request) -> L7Verdict:
    """Decide one query (field ``qname``, or ``query``) against ``rules.dns``: the
    proxy and ``DnsParser.match`` (``policy trace``) both call it."""
    raw = request.fields.get("qname", request.fields.get("query"))
    if raw is None:
        return L7Verdict(False, None, "dns request without a query name")
    qname = normalize_name(str(raw))
    if not rules:
        return L7Verdict(True, None, "no rules.dns entries: every query is allowed")
    for i, rule in enumerate(rules):
        if rule_matches(rule, qname):
            name, pattern = _fields(rule)
            what = f"matchName {name!r}" if name else f"matchPattern {pattern!r}"
            return L7Verdict(True, i, f"rules.dns[{i}] {what} matches {qname!r}")
    return L7Verdict(False, None, f"no rules.dns entry matches {qname!r}")
