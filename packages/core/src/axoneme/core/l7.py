"""The L7 parser contract (``axoneme.l7`` entry points: http, kafka, dns)."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class L7Request:
    """What the matcher sees of one request; parser-specific fields in ``fields``."""

    fields: dict[str, Any] = field(default_factory=dict, hash=False)


@dataclass(frozen=True, slots=True)
class L7Verdict:
    allowed: bool
    rule: int | None = None  # index of the matching rule
    reason: str = ""


class L7Parser(abc.ABC):
    """A protocol parser + rule matcher + proxy factory.

    The matcher is shared by the proxy and ``axoneme policy trace`` so both
    give the same verdict.
    """

    name: str = "abstract"

    @abc.abstractmethod
    def match(self, rules: Sequence[Any], request: L7Request) -> L7Verdict:
        """Decide one request against the rules of one entry (empty = allow all)."""

    def request_from_trace(self, options: dict[str, Any]) -> L7Request:
        """Build a request from ``policy trace`` flags (e.g. http_method)."""
        return L7Request(dict(options))

    def proxy_factory(self) -> Any:
        """Return a callable building the proxy server for this parser, or None."""
        return None
