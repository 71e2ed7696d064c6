"""``rules.dns[]`` items (Cilium ``FQDNSelector``), as the parser builds them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class DNSRule:
    match_name: str | None = None
    match_pattern: str | None = None


__all__ = ["DNSRule"]
