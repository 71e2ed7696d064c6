"""The http parser (not implemented yet: every request is refused)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from axoneme.core.l7 import L7Parser, L7Request, L7Verdict


class HttpParser(L7Parser):
    name = "http"

    def match(self, rules: Sequence[Any], request: L7Request) -> L7Verdict:
        return L7Verdict(False, None, "the http parser is not implemented yet")
