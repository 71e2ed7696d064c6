"""The forwarding guard: pod traffic must never leave through the host's uplink.

The agent turns IP forwarding on, so without this a pod could reach anything
the host can route to. ``install`` adds, in a chain we own (``AXON-GUARD``,
jumped to from ``FORWARD``), a DROP rule for the pod CIDR leaving through
the default route's device. Several agents (tests) share the chain: each
rule carries a comment naming its owner, ``remove`` deletes only the
owner's rules, and the chain goes away once empty. A file lock serialises
concurrent agents.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from axoneme.core.errors import AxonemeError

LOG = logging.getLogger(__name__)

CHAIN = "AXON-GUARD"
# in the directory the DaemonSet shares with the host (an agent in a container and
# one on the host serialise their guard edits on the same file)
LOCK_PATH = "/var/run/axoneme/guard.lock"

__all__ = ["CHAIN", "GuardError", "GuardRule", "install", "installed_rules", "remove", "uplinks"]


class GuardError(AxonemeError):
    """The guard could not be installed (the agent must not forward then)."""


@dataclass(frozen=True, slots=True)
class GuardRule:
    cidr: str
    uplink: str
    owner: str


def _iptables() -> str:
    path = shutil.which("iptables")
    if path is None:
        raise GuardError("iptables is not installed: cannot install the forwarding guard "
                         "(install iptables or run the agent with --no-guard)")
    return path


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([_iptables(), "-w", "5", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise GuardError(f"iptables {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def uplinks() -> list[str]:
    """Devices of the default routes (IPv4)."""
    out = subprocess.run(["ip", "-4", "route", "show", "default"], capture_output=True,
                         text=True).stdout
    devs: list[str] = []
    for line in out.splitlines():
        words = line.split()
        if "dev" in words:
            dev = words[words.index("dev") + 1]
            if dev not in devs:
                devs.append(dev)
    return devs


def owner_tag(owner: str) -> str:
    return "axoneme-guard:" + hashlib.sha256(owner.encode()).hexdigest()[:12]


@contextmanager
def _locked() -> Iterator[None]:
    os.makedirs(os.path.dirname(LOCK_PATH), exist_ok=True)
    fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def install(cidr: str, owner: str = "default") -> list[GuardRule]:
    """Drop forwarded traffic from ``cidr`` leaving through every uplink.

    Idempotent. ``owner`` names the agent (its state dir) so ``remove`` only
    removes its own rules."""
    tag = owner_tag(owner)
    rules = [GuardRule(cidr, dev, owner) for dev in uplinks()]
    with _locked():
        if _run("-S", CHAIN, check=False).returncode != 0:
            _run("-N", CHAIN)
        if _run("-C", "FORWARD", "-j", CHAIN, check=False).returncode != 0:
            _run("-I", "FORWARD", "1", "-j", CHAIN)
        for rule in rules:
            spec = ("-s", cidr, "-o", rule.uplink, "-m", "comment", "--comment", tag, "-j", "DROP")
            if _run("-C", CHAIN, *spec, check=False).returncode != 0:
                _run("-A", CHAIN, *spec)
    LOG.info("forwarding guard installed for %s on %s", cidr, ",".join(r.uplink for r in rules))
    return rules


def installed_rules() -> list[str]:
    """The guard chain's rules as ``iptables -S`` prints them (empty if none)."""
    if shutil.which("iptables") is None:
        return []
    proc = _run("-S", CHAIN, check=False)
    if proc.returncode != 0:
        return []
    return [line for line in proc.stdout.splitlines() if line.startswith("-A ")]


def remove(owner: str = "default") -> int:
    """Remove ``owner``'s guard rules (and the chain when it is empty). Idempotent."""
    if shutil.which("iptables") is None:
        return 0
    tag = owner_tag(owner)
    removed = 0
    with _locked():
        proc = _run("-S", CHAIN, check=False)
        if proc.returncode != 0:
            return 0
        remaining = 0
        for line in proc.stdout.splitlines():
            if not line.startswith("-A "):
                continue
            if tag in line:
                args = line.split()[2:]
                args = [a.strip('"') for a in args]
                if _run("-D", CHAIN, *args, check=False).returncode == 0:
                    removed += 1
            else:
                remaining += 1
        if remaining == 0:
            while _run("-D", "FORWARD", "-j", CHAIN, check=False).returncode == 0:
                pass
            _run("-F", CHAIN, check=False)
            _run("-X", CHAIN, check=False)
    return removed
