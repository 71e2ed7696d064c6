"""Exclusive ``flock`` lock files that name their holder.

One agent per state dir, one iptables datapath per network namespace: the
second one must fail fast and say who is in the way, instead of running
next to the first and silently breaking it. The kernel drops an ``flock``
when its holder dies (even on SIGKILL), so a crashed agent never leaves a
stale lock behind; the pid written into the file is only for the message.
"""

from __future__ import annotations

import fcntl
import os

__all__ = ["LockHeld", "PidLock"]


class LockHeld(OSError):
    """Someone else holds the lock; ``pid`` and ``info`` say who (when known)."""

    def __init__(self, path: str, pid: int | None, info: str) -> None:
        self.path = path
        self.pid = pid
        self.info = info
        who = f"pid {pid}" if pid else "another process"
        if info:
            who += f" ({info})"
        super().__init__(f"{path} is locked by {who}")


class PidLock:
    """``acquire()`` takes the lock without waiting (LockHeld if taken) and
    writes ``pid`` and ``info`` into the file; ``release()`` drops it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, info: str = "") -> None:
        if self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid, holder_info = self.holder(self.path)
            raise LockHeld(self.path, pid, holder_info) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n{info}\n".encode(), 0)
        except OSError:
            pass  # the lock is what counts; the pid is only for messages
        self._fd = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the last descriptor drops the flock

    @staticmethod
    def holder(path: str) -> tuple[int | None, str]:
        """(pid, info) written by the holder; (None, "") if unknown."""
        try:
            with open(path, "rb") as f:
                raw = f.read(4096)
        except OSError:
            return None, ""
        first, _, rest = raw.decode("utf-8", "replace").partition("\n")
        pid = int(first) if first.isascii() and first.isdigit() and len(first) < 10 else None
        return pid, rest.strip()[:300]
