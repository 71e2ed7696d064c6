"""Failpoints: named places where a test can make the agent fail on purpose.

The model is etcd's gofail: code calls ``failpoint("state.write")`` at a place
where the real world can fail (a datapath write, a state write, a proxy's
event loop); normally that is a dictionary lookup that finds nothing. A
fault test turns a failpoint on and checks that the agent fails closed,
recovers and says what is wrong.

They are off unless the process starts with ``AXONEME_FAILPOINTS`` in its
environment: ``1`` enables the registry with nothing armed, or a list such
as ``datapath.apply=error;state.write=2*error`` arms some at start. The
agent then serves ``GET/PUT /v1/debug/failpoints`` to change them while it
runs. Without the variable nothing can arm one: production agents have no
such API.

Actions:

1. ``off``: nothing happens (the same as never armed);
2. ``error``: every pass raises the exception the caller names (the kind
   of error the real failure would raise there);
3. ``N*error``: the next N passes raise, then the failpoint turns off.
"""

from __future__ import annotations

import os
import threading

__all__ = ["ENV", "FailpointError", "armed", "enabled", "failpoint", "set_failpoint",
           "configure"]

ENV = "AXONEME_FAILPOINTS"

_lock = threading.Lock()
_enabled = False
_armed: dict[str, int] = {}  # name -> passes left that fail (-1: every pass)


class FailpointError(ValueError):
    """A failpoint specification that cannot be understood."""


def _parse_action(action: str) -> int:
    action = action.strip()
    if action == "off":
        return 0
    if action == "error":
        return -1
    count, star, what = action.partition("*")
    if star and what == "error" and count.isascii() and count.isdigit() and len(count) <= 6:
        return int(count)
    raise FailpointError(f"unknown failpoint action {action[:40]!r} (off, error or N*error)")


def configure(spec: str | None) -> None:
    """Enable the registry from ``spec`` (the variable's value); None disables it."""
    global _enabled
    with _lock:
        _armed.clear()
        _enabled = spec is not None and spec != ""
        if spec is None or not _enabled or spec == "1":
            return
        for item in spec.split(";"):
            if not item.strip():
                continue
            name, eq, action = item.partition("=")
            if not eq or not name.strip():
                raise FailpointError(f"bad failpoint {item[:60]!r}: expected NAME=ACTION")
            left = _parse_action(action)
            if left:
                _armed[name.strip()] = left


def enabled() -> bool:
    return _enabled


def set_failpoint(name: str, action: str) -> None:
    """Arm or disarm ``name`` (only when the registry is enabled)."""
    if not _enabled:
        raise FailpointError(f"failpoints are disabled (start with {ENV}=1)")
    left = _parse_action(action)
    with _lock:
        if left:
            _armed[name] = left
        else:
            _armed.pop(name, None)


def armed() -> dict[str, str]:
    """What is armed, as actions."""
    with _lock:
        return {name: ("error" if left < 0 else f"{left}*error") for name, left in _armed.items()}


def failpoint(name: str, error: type[BaseException] | BaseException = RuntimeError) -> None:
    """Raise ``error`` if ``name`` is armed; otherwise do nothing (the normal case)."""
    if not _armed:
        return
    with _lock:
        left = _armed.get(name, 0)
        if not left:
            return
        if left > 0:
            if left == 1:
                del _armed[name]
            else:
                _armed[name] = left - 1
    if isinstance(error, BaseException):
        raise error
    raise error(f"failpoint {name}")


configure(os.environ.get(ENV))
