"""toFQDNs selectors: their schema and Cilium's name matching.

``fqdn_selector`` parses a ``{matchName | matchPattern}`` item (toFQDNs, and
the DNS parser's rules, which share Cilium's ``FQDNSelector``).
``fqdn_matches`` decides whether a selector selects a name: offline tools use
an installed ``FQDNParser``'s matcher, this one when none is installed.
"""

from __future__ import annotations

import re
from typing import Any

from axoneme.core import yamlsafe
from axoneme.core.policy.walk import Walker, join
from axoneme.core.regex import escape, fullmatch

_q = yamlsafe.excerpt
_FQDN_NAME = re.compile(r"^[-a-zA-Z0-9_.]+$")
_FQDN_PATTERN = re.compile(r"^[-a-zA-Z0-9_.*]+$")


def fqdn_selector(w: Walker, value: object, path: str) -> tuple[str | None, str | None] | None:
    """(matchName, matchPattern), normalized, of a toFQDNs item or a DNS rule
    (Cilium ``FQDNSelector``); problems recorded on ``w``."""
    m = w.mapping(value, path, ("matchName", "matchPattern"))
    if m is None:
        return None
    name = w.opt_string(m, "matchName", path)
    pattern = w.opt_string(m, "matchPattern", path)
    if "matchName" in m and m["matchName"] is not None and name is None:
        return None
    if "matchPattern" in m and m["matchPattern"] is not None and pattern is None:
        return None
    if name and pattern:
        w.problem(path, "only one of matchName and matchPattern may be set")
        return None
    if not name and not pattern:
        w.problem(path, "one of matchName or matchPattern is required")
        return None
    if name:
        norm = name.lower().rstrip(".")
        if not norm or not _FQDN_NAME.match(norm):
            w.problem(join(path, "matchName"), f"invalid matchName \"{_q(name)}\" (allowed: a-z, 0-9, '-', '_', '.')")
            return None
        return norm, None
    assert pattern
    norm = pattern.lower()
    if norm != "*":
        norm = norm.rstrip(".")
    if not norm or not _FQDN_PATTERN.match(norm):
        w.problem(join(path, "matchPattern"),
                  f"invalid matchPattern \"{_q(pattern)}\" (allowed: a-z, 0-9, '-', '_', '.', '*')")
        return None
    return None, norm


def fqdn_matches(peer: Any, name: str) -> bool:
    """Cilium toFQDNs matching of ``name`` (lower-case, no trailing dot):
    ``matchName`` exact; ``matchPattern`` ``*`` alone matches everything, else
    ``*`` stands for ``[-a-z0-9_]*`` inside one label and a leading ``**.``
    for one or more labels."""
    if peer.match_name is not None:
        return bool(peer.match_name.lower().rstrip(".") == name)
    pattern = (peer.match_pattern or "").lower().rstrip(".")
    if pattern == "*":
        return True
    prefix = ""
    if pattern.startswith("**."):
        prefix, pattern = r"(?:[-a-z0-9_]+\.)+", pattern[3:]
    regex = prefix + r"[-a-z0-9_]*".join(escape(part) for part in pattern.split("*"))
    return fullmatch(regex, name)


__all__ = ["fqdn_matches", "fqdn_selector"]
