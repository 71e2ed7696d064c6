"""One iptables datapath per network namespace.

Chain names (``AXON-*``) and the NFLOG group are per netns, so a second agent
there would share them (and run "Ok" with no events). The lock is a pid file
per netns; it is per process: instances of one process (tests, adoption)
share it, counted.

The lock lives in /var/run/axoneme, the directory the DaemonSet mounts from
the host (on the host /var/run is /run): an agent in a container and one run
on the host must see the same lock file, or each would take "its own" lock
and the second one's cleanup would remove the first one's chains.
"""

from __future__ import annotations

import os
import threading

from axoneme.core.lockfile import PidLock

HOST_LOCK_DIR = "/var/run/axoneme"
_host_locks: dict[str, tuple[PidLock, int]] = {}
_host_locks_guard = threading.Lock()


def _netns_id() -> str:
    for path in ("/proc/thread-self/ns/net", "/proc/self/ns/net"):
        try:
            return str(os.stat(path).st_ino)
        except OSError:
            continue
    return "host"


def host_lock_path(lock_dir: str = HOST_LOCK_DIR) -> str:
    """The lock of the iptables datapath of the calling thread's network namespace."""
    return os.path.join(lock_dir, f"iptables-netns-{_netns_id()}.lock")


def acquire_host_lock(path: str, info: str) -> None:
    with _host_locks_guard:
        lock, refs = _host_locks.get(path, (PidLock(path), 0))
        if refs == 0:
            os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
            lock.acquire(info)
        _host_locks[path] = (lock, refs + 1)


def release_host_lock(path: str) -> None:
    with _host_locks_guard:
        lock, refs = _host_locks.get(path, (None, 0))
        if lock is None:
            return
        if refs <= 1:
            lock.release()
            del _host_locks[path]
        else:
            _host_locks[path] = (lock, refs - 1)
