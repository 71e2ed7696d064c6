"""The dns parser (not implemented yet: every request is refused)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from axoneme.core.l7 import L7Parser, L7Request, L7Verdict


class DnsParser(L7Parser):
    name = "dns"

    def match(self, rules: Sequence[Any], request: L7Request) -> L7Verdict:
        return L7Verdict(False, None, "the dns parser is not implemented yet")
