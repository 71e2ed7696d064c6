"""Typed access to untrusted YAML/JSON structures that records problems (public:
L7 parsers validate their rules with it, see ``axoneme.core.l7``).

Every accessor takes the value and its field path and returns the value (or
``None``) after recording a ``Problem`` for anything wrong, so one pass over
a document reports every problem instead of stopping at the first.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from axoneme.core.errors import Problem
from axoneme.core.yamlsafe import excerpt

# Bounds on what one problem and one document may report: values are shown
# as excerpts, and a document with a million bad items (aliases make that
# cheap to write) reports the first MAX_PROBLEMS and a count of the rest.
MAX_PROBLEMS = 100
MAX_FIELD_CHARS = 300
MAX_MESSAGE_CHARS = 600


def printable(text: str) -> str:
    """``text`` with control characters escaped, so a problem stays one line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def make_problem(file: str, document: int | None, field: str, message: str) -> Problem:
    # excerpt before escaping (bounded work), and after (escapes lengthen)
    return Problem(printable(file), document,
                   excerpt(printable(excerpt(field, MAX_FIELD_CHARS)), MAX_FIELD_CHARS),
                   excerpt(printable(excerpt(message, MAX_MESSAGE_CHARS)), MAX_MESSAGE_CHARS))


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def item(path: str, i: int) -> str:
    return f"{path}[{i}]"


def type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, Mapping):
        return "mapping"
    return type(value).__name__


# The parsers name a mapping's fields as tuple constants: their sets are made once
# (bounded: a caller building tuples on the fly only misses the cache).
_FIELD_SETS: dict[tuple[str, ...], frozenset[str]] = {}


def _field_set(allowed: Iterable[str]) -> frozenset[str]:
    if type(allowed) is not tuple:
        return frozenset(allowed)
    got = _FIELD_SETS.get(allowed)
    if got is None:
        got = frozenset(allowed)
        if len(_FIELD_SETS) < 1024:
            _FIELD_SETS[allowed] = got
    return got


class Walker:
    """Collects the problems of one document."""

    def __init__(self, file: str, index: int | None) -> None:
        self.file = file
        self.index = index
        self.problems: list[Problem] = []
        self.dropped = 0  # problems beyond MAX_PROBLEMS, only counted

    def problem(self, path: str, message: str) -> None:
        if len(self.problems) >= MAX_PROBLEMS:
            self.dropped += 1
            return
        self.problems.append(make_problem(self.file, self.index, path, message))

    def all_problems(self) -> list[Problem]:
        """The problems recorded, then one saying how many more were found."""
        if not self.dropped:
            return list(self.problems)
        return [*self.problems, make_problem(self.file, self.index, "",
                                             f"... and {self.dropped} more problems")]

    def wrong_type(self, path: str, expected: str, value: object) -> None:
        self.problem(path, f"expected {expected}, got {type_name(value)}")

    # --- containers ------------------------------------------------------------

    def mapping(
        self,
        value: object,
        path: str,
        allowed: Iterable[str] | None = None,
        unsupported: Mapping[str, str] | None = None,
    ) -> dict[str, Any] | None:
        """A mapping with string keys; reports unknown and unsupported fields.

        ``None`` (YAML ``null`` / an empty value) is treated like ``{}``, as
        Kubernetes' JSON decoding does for optional struct fields.
        """
        if value is None:
            return {}
        if type(value) is not dict and not isinstance(value, Mapping):  # dict: no ABC check
            self.wrong_type(path, "a mapping", value)
            return None
        out: dict[str, Any] = {}
        allowed_set = _field_set(allowed) if allowed is not None else None
        for key, sub in value.items():
            if not isinstance(key, str):
                self.problem(path, f"field names must be strings, got {type_name(key)} {excerpt(key)}")
                continue
            if unsupported and key in unsupported:
                self.problem(join(path, key), unsupported[key])
                continue
            if allowed_set is not None and key not in allowed_set:
                self.problem(join(path, key), f"unknown field \"{excerpt(key)}\"")
                continue
            out[key] = sub
        return out

    def list(self, value: object, path: str) -> list[Any]:
        """A list; ``None`` is an empty list (an absent optional field)."""
        if value is None:
            return []
        if not isinstance(value, list):
            self.wrong_type(path, "a list", value)
            return []
        return value

    # --- scalars ---------------------------------------------------------------

    def string(self, value: object, path: str, *, allow_empty: bool = True) -> str | None:
        if not isinstance(value, str):
            self.wrong_type(path, "a string", value)
            return None
        if not allow_empty and not value:
            self.problem(path, "must not be empty")
            return None
        return value

    def opt_string(self, mapping: Mapping[str, Any], key: str, path: str) -> str | None:
        if key not in mapping or mapping[key] is None:
            return None
        return self.string(mapping[key], join(path, key))

    def boolean(self, value: object, path: str) -> bool | None:
        if not isinstance(value, bool):
            self.wrong_type(path, "a boolean", value)
            return None
        return value

    def integer(self, value: object, path: str) -> int | None:
        # bool is an int subclass in Python; YAML `true` is not a number.
        if isinstance(value, bool) or not isinstance(value, int):
            self.wrong_type(path, "an integer", value)
            return None
        return value

    def string_map(self, value: object, path: str) -> dict[str, str] | None:
        m = self.mapping(value, path)
        if m is None:
            return None
        out: dict[str, str] = {}
        for k, v in m.items():
            if isinstance(v, bool) or not isinstance(v, str | int | float):
                self.wrong_type(join(path, k), "a string", v)
                continue
            if not isinstance(v, str):
                # Kubernetes rejects unquoted numbers in labels; so do we,
                # but the message says how to fix it.
                self.problem(join(path, k), f"expected a string, got {type_name(v)} (quote the value)")
                continue
            out[k] = v
        return out
