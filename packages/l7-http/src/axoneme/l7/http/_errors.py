"""The error every HTTP refusal of the proxy raises (``_wire``, ``_target``)."""

from __future__ import annotations


class HttpError(Exception):
    """A request the proxy refuses: status, reason, and whether to close."""

    def __init__(self, status: int, reason: str, close: bool = True) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.close = close


__all__ = ["HttpError"]
