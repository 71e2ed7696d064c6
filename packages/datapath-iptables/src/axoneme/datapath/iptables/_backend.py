"""The iptables/ipset binaries: backend detection, restore, save.

All writes go through ``iptables-restore --noflush`` (one transaction per
call: a failing restore applies nothing) and ``ipset restore``.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from dataclasses import dataclass

from axoneme.core.errors import DatapathProgramError, DatapathUnavailable

LOG = logging.getLogger(__name__)

_TIMEOUT = 120


def _run(argv: list[str], data: str | None = None, op: str = "") -> str:
    try:
        proc = subprocess.run(argv, input=data, capture_output=True, text=True, timeout=_TIMEOUT,
                              check=False)
    except OSError as e:
        raise DatapathProgramError(op or argv[0], e.errno, str(e)) from e
    except subprocess.TimeoutExpired as e:
        raise DatapathProgramError(op or argv[0], None, "timed out") from e
    if proc.returncode != 0:
        raise DatapathProgramError(op or argv[0], None,
                                   (proc.stderr or proc.stdout).strip()[:2000])
    return proc.stdout


def _count_rules(save_bin: str) -> tuple[int, int]:
    """(rules, AXON- chains) currently held by one backend."""
    try:
        out = subprocess.run([save_bin], capture_output=True, text=True, timeout=30,
                             check=False).stdout
    except OSError:
        return 0, 0
    rules = sum(1 for line in out.splitlines() if line.startswith("-A "))
    axon = sum(1 for line in out.splitlines() if line.startswith(":AXON-"))
    return rules, axon


@dataclass(frozen=True, slots=True)
class Backend:
    """The iptables flavour in use (``nft`` or ``legacy``) and why."""

    kind: str
    reason: str
    ipv6: bool = True

    def _bin(self, family: int, what: str) -> str:
        base = "iptables" if family == 4 else "ip6tables"
        specific = f"{base}-{self.kind}-{what}" if what else f"{base}-{self.kind}"
        if shutil.which(specific):
            return specific
        return f"{base}-{what}" if what else base

    def save(self, family: int, table: str = "filter") -> str:
        return _run([self._bin(family, "save"), "-t", table], op=f"ip{'6' if family == 6 else ''}tables-save")

    def restore(self, family: int, payload: str) -> None:
        argv = [self._bin(family, "restore"), "--noflush"]
        if self.kind == "legacy":
            argv += ["-w", "10"]
        LOG.debug("restore (%s, %d lines)", argv[0], payload.count("\n"))
        _run(argv, payload, op=f"ip{'6' if family == 6 else ''}tables-restore")

    def drop_packets(self, family: int, chain: str) -> int:
        """Packets counted by the DROP rules of one filter chain (0 if it is absent)."""
        argv = [self._bin(family, ""), "-t", "filter", "-L", chain, "-n", "-v", "-x"]
        if self.kind == "legacy":
            argv += ["-w", "10"]
        try:
            out = _run(argv, op=f"ip{'6' if family == 6 else ''}tables -L")
        except DatapathProgramError as e:
            if "No chain" in str(e) or "does not exist" in str(e):
                return 0
            raise
        total = 0
        for line in out.splitlines()[2:]:  # chain header, column header
            cols = line.split()
            if len(cols) > 2 and cols[0].isdigit() and cols[2] == "DROP":
                total += int(cols[0])
        return total

    @staticmethod
    def ipset_save() -> str:
        return _run(["ipset", "save"], op="ipset save")

    @staticmethod
    def ipset_restore(payload: str) -> None:
        if payload.strip():
            _run(["ipset", "restore", "-exist"], payload, op="ipset restore")

    @staticmethod
    def ipset(*args: str) -> None:
        _run(["ipset", *args], op="ipset " + args[0])


def detect(mode: str) -> Backend:
    """Pick the backend; raise DatapathUnavailable when we cannot run.

    1. a backend that already holds AXON- chains (a previous run) wins;
    2. else legacy if only legacy holds rules (the host uses it: mixing the
       two makes rules invisible to each other's tools);
    3. else nf_tables.
    """
    if os.geteuid() != 0:
        raise DatapathUnavailable("the iptables datapath needs root (CAP_NET_ADMIN)")
    for binary in ("iptables", "iptables-save", "iptables-restore"):
        if not shutil.which(binary):
            raise DatapathUnavailable(f"{binary} not found (apt-get install iptables)")
    if mode == "ipset" and not shutil.which("ipset"):
        raise DatapathUnavailable("ipset not found (apt-get install ipset)")
    version = _run(["iptables", "-V"], op="iptables -V")
    default = "legacy" if "legacy" in version else "nft"
    have = {k: shutil.which(f"iptables-{k}-save") for k in ("nft", "legacy")}
    if have["nft"] and have["legacy"]:
        nft_rules, nft_axon = _count_rules("iptables-nft-save")
        leg_rules, leg_axon = _count_rules("iptables-legacy-save")
        if nft_axon or leg_axon:
            kind = "nft" if nft_axon >= leg_axon else "legacy"
            reason = f"existing AXON- chains in the {kind} backend"
        elif leg_rules and not nft_rules:
            kind, reason = "legacy", f"host rules are in the legacy backend ({leg_rules} rules)"
        else:
            kind, reason = "nft", f"nf_tables (default; {nft_rules} nft rules, {leg_rules} legacy)"
    else:
        kind, reason = default, f"only one backend installed: {version.strip()}"
    ipv6 = bool(shutil.which("ip6tables-restore"))
    return Backend(kind, reason, ipv6)
