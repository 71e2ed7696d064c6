"""``rules.http[]`` items (Cilium ``PortRuleHTTP``), as the parser builds them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    name: str
    value: str | None = None
    mismatch: str = ""  # "" (deny) | LOG | ADD | DELETE | REPLACE


@dataclass(frozen=True, slots=True)
class HTTPRule:
    """rules.http[] item: regexes are matched against the whole value."""

    method: str | None = None
    path: str | None = None
    host: str | None = None
    headers: tuple[str, ...] = ()
    header_matches: tuple[HeaderMatch, ...] = ()


__all__ = ["HTTPRule", "HeaderMatch"]
