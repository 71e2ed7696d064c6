"""Policy regexes: compiled and matched with RE2, never with Python's ``re``.

Every regular expression that comes from a policy (``rules.http[].method``,
``path``, ``host``; DNS ``matchPattern`` once translated) is matched on the
packet path against attacker-chosen input. Python's backtracking ``re`` takes
exponential time on patterns such as ``/files/([a-z0-9]+/?)+\\.txt`` and holds
the GIL meanwhile, which stalls every proxy and the agent's API. RE2 matches in
time linear in the input, which is also what Cilium (Go ``regexp``) and Envoy
(``safe_regex``) use, so the accepted syntax is theirs:

1. No backreferences, lookahead/lookbehind, possessive quantifiers, atomic
   groups or conditionals: such a pattern is refused at validation with the
   field path (``InvalidRule``, exit code 2), never at match time.
2. ``\\Z`` is spelled ``\\z``; ``\\d``, ``\\w``, ``\\s`` are ASCII classes.
3. A pattern is at most ``MAX_PATTERN_LEN`` characters and its compiled
   program may use at most ``MAX_MEM`` bytes, so a huge policy cannot take the
   agent's memory; counted repetitions above 1000 are refused by RE2 itself.

Matching is always anchored at both ends by the callers that need it
(``fullmatch``): ``/public`` does not allow ``/public/x``.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import re2  # type: ignore[import-untyped]

LOG = logging.getLogger(__name__)

MAX_PATTERN_LEN = 16 * 1024
# Per compiled program (RE2's own default is 8 MiB): bounds the DFA cache too,
# and at most _CACHE_SIZE programs are kept.
MAX_MEM = 2 * 1024 * 1024
_CACHE_SIZE = 1024

__all__ = ["RegexError", "compile_regex", "regex_problem", "fullmatch", "escape",
           "MAX_PATTERN_LEN", "MAX_MEM"]


class RegexError(ValueError):
    """A pattern RE2 cannot (or will not, by the bounds above) compile."""


def _options() -> Any:
    opts = re2.Options()
    opts.max_mem = MAX_MEM
    # RE2 would also print each parse error to stderr; the caller reports it.
    opts.log_errors = False
    return opts


_OPTIONS = _options()


def _reason(e: Exception) -> str:
    msg = e.args[0] if e.args else str(e)
    if isinstance(msg, bytes):
        msg = msg.decode("utf-8", "replace")
    return str(msg) or "invalid pattern"


@functools.lru_cache(maxsize=_CACHE_SIZE)
def compile_regex(pattern: str) -> Any:
    """The compiled RE2 program for ``pattern``; raises RegexError saying why not.

    Cached: the proxies ask for the same few patterns on every request.
    """
    if not isinstance(pattern, str):
        raise RegexError(f"expected a string, got {type(pattern).__name__}")
    if len(pattern) > MAX_PATTERN_LEN:
        raise RegexError(f"pattern is longer than {MAX_PATTERN_LEN} characters")
    if "\x00" in pattern:
        raise RegexError("NUL character in pattern")
    try:
        return re2.compile(pattern, _OPTIONS)
    except re2.error as e:
        raise RegexError(_reason(e)) from None
    except UnicodeError:  # e.g. a lone surrogate from a JSON escape
        raise RegexError("pattern is not valid Unicode text") from None


def regex_problem(pattern: str) -> str | None:
    """None when ``pattern`` is a valid policy regex, else the reason (for validation)."""
    try:
        compile_regex(pattern)
    except RegexError as e:
        return str(e)
    return None


def fullmatch(pattern: str, value: str) -> bool:
    """Whether ``pattern`` matches the WHOLE ``value``, in linear time.

    An invalid pattern matches nothing: validation refuses it, so one can only
    get here through a bypass, and then it must deny rather than allow.
    """
    try:
        rx = compile_regex(pattern)
    except RegexError as e:
        LOG.warning("invalid policy regex %r: %s", pattern[:200], e)
        return False
    try:
        return rx.fullmatch(value) is not None
    except (UnicodeError, TypeError) as e:  # a value RE2 cannot take: no match
        LOG.debug("policy regex %r cannot match %r: %s", pattern[:200], value[:200], e)
        return False


def escape(text: str) -> str:
    """``text`` as an RE2 literal."""
    return str(re2.escape(text))
