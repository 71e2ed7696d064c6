"""The TPROXY redirect plumbing (mirrors Cilium's CILIUM_PRE_mangle):

    iptables -t mangle -N AXON-PROXY;  -A PREROUTING -j AXON-PROXY
    -A AXON-PROXY -m socket --transparent -j MARK --set-xmark 0x200/0xf00
    -A AXON-PROXY -p tcp -m mark --mark <0x200|port<<16>/0xffff8f00 \
        -j TPROXY --on-port <port> --on-ip 127.0.0.1 --tproxy-mark 0x200/0xf00
    -A AXON-PROXY -p tcp -m mark --mark <identity_port_match(port)>/0xffff \
        -j TPROXY --on-port <port> ...     (identity marks only)
    ip rule add fwmark 0x200/0xf00 iif lo lookup main pref 8
    ip rule add fwmark 0x200/0xf00 lookup 2004 pref 9
    ip route add local 0.0.0.0/0 dev lo table 2004
    iptables -I FORWARD -m mark --mark 0x200/0xf00 -j DROP
    sysctl net.ipv4.tcp_fwmark_accept=1                   (identity marks only)

1. The socket rule sends packets of connections a transparent socket already
   owns (the replies to the proxy's upstream connections, whose destination
   is the client's address) to the local stack instead of forwarding them.
2. One TPROXY rule per proxy port diverts a datapath-marked packet to the
   listener; TPROXY sets 0x200 in the magic nibble and the ip rule routes
   such packets locally.
3. The FORWARD drop makes a broken redirect fail closed: a redirected packet
   is delivered locally (the ip rule), so one that reaches FORWARD still
   carrying the to-proxy mark lost its TPROXY rule or route (another agent's
   cleanup, a crash half-way): it is dropped instead of reaching the pod
   without its L7 check.
4. Identity marks (``identity_marks=True``, a datapath with the capability
   ``proxy_identity_mark``: eBPF): the datapath's to-proxy mark carries the
   source identity (``axoneme.core.marks``), a second rule per port matches
   that layout. ``tcp_fwmark_accept=1`` makes the accepted socket inherit the
   SYN's mark, where the proxy reads the identity (SO_MARK). Without it the
   accepted socket's mark is the listener's, 0 (checked on Linux 6.18).
5. The pref-8 rule: a socket that inherited a to-proxy mark (step 4) would
   route its own SYN-ACK through table 2004 back to itself (seen on 6.18:
   the handshake never completes); packets this node sends (iif lo) use the
   main table instead. Harmless without step 4: no local socket sends 0x200.
The jump is appended to PREROUTING: a datapath marking in mangle/PREROUTING
must insert its rules before it (tc-based datapaths mark before netfilter).

Several agents on one host (tests, one per state dir) each own a chain
(``chain_for_state_dir``): an agent's start flushes and its cleanup removes
only its own chain; the shared socket rule target, ip rule and local route go
with the last AXON-PROXY* chain (under a host-wide lock), so one agent never
drops another agent's redirects (which would forward marked traffic unproxied).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator

from axoneme.core.errors import AxonemeError
from axoneme.core.marks import (
    MARK_IDENTITY_PORT_MASK,
    MARK_TO_PROXY_PORT_MATCH,
    PROXY_ROUTE_TABLE,
    TPROXY_MARK,
    TPROXY_MASK,
    identity_port_match,
    to_proxy_mark,
)

LOG = logging.getLogger(__name__)

CHAIN = "AXON-PROXY"
RULE_PREF = 9
DEFAULT_STATE_DIR = "/var/lib/axoneme"
# shared with the host by the DaemonSet, as the guard's lock (agent.guard)
LOCK_PATH = "/var/run/axoneme/proxy-rules.lock"
FWMARK_ACCEPT = "/proc/sys/net/ipv4/tcp_fwmark_accept"


def chain_for_state_dir(state_dir: str) -> str:
    """The redirect chain of the agent using ``state_dir`` (CHAIN for the default one)."""
    if not state_dir or os.path.abspath(state_dir) == DEFAULT_STATE_DIR:
        return CHAIN
    digest = hashlib.sha1(os.path.abspath(state_dir).encode()).hexdigest()[:8]
    return f"{CHAIN}-{digest}"


@contextlib.contextmanager
def _host_lock() -> Iterator[None]:
    """Serialize base-rule changes of all agents on the host (best effort without /run)."""
    try:
        os.makedirs(os.path.dirname(LOCK_PATH), exist_ok=True)
        fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class ProxyRulesError(AxonemeError):
    """The redirect rules could not be installed."""


def _fwmark_saved_path() -> str:
    """Where the value we replaced is kept: one file per network namespace."""
    try:
        ns = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        ns = 0
    return os.path.join(os.path.dirname(LOCK_PATH), f"tcp_fwmark_accept.{ns}.saved")


def _fwmark_accept_on() -> None:
    """tcp_fwmark_accept=1 in this network namespace (identity marks, step 4),
    remembering the value it had so the last cleanup puts it back."""
    try:
        with open(FWMARK_ACCEPT, encoding="ascii") as f:
            old = f.read().strip()
        if old == "1":
            return
        os.makedirs(os.path.dirname(LOCK_PATH), exist_ok=True)
        with open(_fwmark_saved_path(), "w", encoding="ascii") as f:
            f.write(old)
        with open(FWMARK_ACCEPT, "w", encoding="ascii") as f:
            f.write("1")
    except OSError as e:
        # the proxies still work: without the mark they name the source by the ipcache
        LOG.warning("cannot set %s (%s): the L7 proxies name their sources by the ipcache, "
                    "not by the identity the datapath put in the mark", FWMARK_ACCEPT, e)


def _fwmark_accept_restore() -> None:
    """The value ``_fwmark_accept_on`` replaced, back (nothing when it replaced none)."""
    path = _fwmark_saved_path()
    try:
        with open(path, encoding="ascii") as f:
            old = f.read().strip()
        with open(FWMARK_ACCEPT, "w", encoding="ascii") as f:
            f.write(old)
        os.unlink(path)
    except FileNotFoundError:
        return
    except OSError:
        LOG.warning("could not restore %s", FWMARK_ACCEPT, exc_info=True)


def _run(args: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise ProxyRulesError(f"{' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


class RedirectRules:
    """Installs/removes the TPROXY chain, the ip rule and the local route."""

    def __init__(self, chain: str = CHAIN, table: int = PROXY_ROUTE_TABLE, pref: int = RULE_PREF,
                 on_ip: str = "127.0.0.1", identity_marks: bool = False) -> None:
        self.chain = chain
        self.identity_marks = identity_marks
        self.table = table
        self.pref = pref
        self.on_ip = on_ip
        self.ports: dict[int, tuple[str, ...]] = {}
        ipt = shutil.which("iptables")
        if ipt is None:
            raise ProxyRulesError("iptables is not installed: cannot redirect to L7 proxies")
        self._ipt = [ipt, "-w", "5", "-t", "mangle"]
        self._filter = [ipt, "-w", "5"]

    def _ipt_ok(self, *args: str) -> bool:
        return _run([*self._ipt, *args], check=False).returncode == 0

    def _port_rule(self, port: int, proto: str, match: str | None = None) -> list[str]:
        match = match or f"{to_proxy_mark(port):#x}/{MARK_TO_PROXY_PORT_MATCH:#x}"
        return ["-p", proto, "-m", "mark", "--mark", match,
                "-m", "comment", "--comment", f"axoneme proxy {port}",
                "-j", "TPROXY", "--on-port", str(port), "--on-ip", self.on_ip,
                "--tproxy-mark", f"{TPROXY_MARK:#x}/{TPROXY_MASK:#x}"]

    def _port_rules(self, port: int, proto: str) -> list[list[str]]:
        """The plain rule, and the identity layout's when it is on and fits the port."""
        rules = [self._port_rule(port, proto)]
        low = identity_port_match(port) if self.identity_marks else None
        if low is not None:
            rules.append(self._port_rule(port, proto, f"{low:#x}/{MARK_IDENTITY_PORT_MASK:#x}"))
        return rules

    def _local_output_rule(self) -> list[str]:
        return ["fwmark", f"{TPROXY_MARK:#x}/{TPROXY_MASK:#x}", "iif", "lo", "lookup", "main",
                "pref", str(self.pref - 1)]

    def _socket_rule(self) -> list[str]:
        return ["-m", "socket", "--transparent", "-m", "comment", "--comment",
                "axoneme: proxied connections to the local proxy",
                "-j", "MARK", "--set-xmark", f"{TPROXY_MARK:#x}/{TPROXY_MASK:#x}"]

    def _fail_closed_rule(self) -> list[str]:
        # one per agent (the chain in the comment): an agent's cleanup removes only its own
        return ["-m", "mark", "--mark", f"{TPROXY_MARK:#x}/{TPROXY_MASK:#x}",
                "-m", "comment", "--comment", f"axoneme {self.chain}: L7 redirect failed closed",
                "-j", "DROP"]

    def install_base(self) -> None:
        """Chain, PREROUTING jump, socket rule, ip rule, local route (idempotent).

        The chain is flushed first: per-port rules left by a previous agent
        run are dropped, the current ports are re-added.
        """
        with _host_lock():
            self._install_base()

    def _install_base(self) -> None:
        if not self._ipt_ok("-S", self.chain):
            _run([*self._ipt, "-N", self.chain])
        else:
            _run([*self._ipt, "-F", self.chain])
        if not self._ipt_ok("-C", self.chain, *self._socket_rule()):
            _run([*self._ipt, "-I", self.chain, "1", *self._socket_rule()])
        if not self._ipt_ok("-C", "PREROUTING", "-j", self.chain):
            _run([*self._ipt, "-A", "PREROUTING", "-j", self.chain])
        mark = f"{TPROXY_MARK:#x}/{TPROXY_MASK:#x}"
        rules = _run(["ip", "-4", "rule", "list", "pref", str(self.pref)], check=False).stdout
        if f"lookup {self.table}" not in rules:
            _run(["ip", "-4", "rule", "add", "fwmark", mark, "lookup", str(self.table),
                  "pref", str(self.pref)])
        local_out = _run(["ip", "-4", "rule", "list", "pref", str(self.pref - 1)], check=False).stdout
        if "iif lo" not in local_out:
            _run(["ip", "-4", "rule", "add", *self._local_output_rule()])
        _run(["ip", "-4", "route", "replace", "local", "0.0.0.0/0", "dev", "lo",
              "table", str(self.table)])
        if self.identity_marks:
            _fwmark_accept_on()
        if _run([*self._filter, "-C", "FORWARD", *self._fail_closed_rule()], check=False).returncode:
            _run([*self._filter, "-I", "FORWARD", "1", *self._fail_closed_rule()])
        for port, protocols in list(self.ports.items()):
            self.add_port(port, protocols)

    def add_port(self, port: int, protocols: tuple[str, ...] = ("tcp",)) -> None:
        for proto in protocols:
            for rule in self._port_rules(port, proto):
                if not self._ipt_ok("-C", self.chain, *rule):
                    _run([*self._ipt, "-A", self.chain, *rule])
        self.ports[port] = protocols

    def remove_port(self, port: int) -> None:
        for proto in self.ports.pop(port, ("tcp", "udp")):
            for rule in self._port_rules(port, proto):
                while self._ipt_ok("-C", self.chain, *rule):
                    _run([*self._ipt, "-D", self.chain, *rule], check=False)

    def cleanup(self) -> None:
        """Remove our chain, and the shared ip rule and route when no other agent's
        chain is left (idempotent; also clears leftovers of a crashed agent)."""
        with _host_lock():
            self._cleanup()

    def _other_chains(self) -> list[str]:
        """Chains of other agents sharing our ip rule and route (AXON-PROXY*)."""
        if not self.chain.startswith(CHAIN):  # a private chain/table (tests): nobody shares
            return []
        out = _run([*self._ipt, "-S"], check=False).stdout
        return [line.split()[1] for line in out.splitlines()
                if line.startswith(f"-N {CHAIN}") and line.split()[1] != self.chain]

    def _cleanup(self) -> None:
        while self._ipt_ok("-C", "PREROUTING", "-j", self.chain):
            _run([*self._ipt, "-D", "PREROUTING", "-j", self.chain], check=False)
        if self._ipt_ok("-S", self.chain):
            _run([*self._ipt, "-F", self.chain], check=False)
            _run([*self._ipt, "-X", self.chain], check=False)
        while _run([*self._filter, "-C", "FORWARD", *self._fail_closed_rule()], check=False).returncode == 0:
            _run([*self._filter, "-D", "FORWARD", *self._fail_closed_rule()], check=False)
        self.ports.clear()
        if self._other_chains():  # another agent still redirects: keep the shared routing
            return
        mark = f"{TPROXY_MARK:#x}/{TPROXY_MASK:#x}"
        for _ in range(8):
            rules = _run(["ip", "-4", "rule", "list", "pref", str(self.pref)], check=False).stdout
            if f"lookup {self.table}" not in rules:
                break
            _run(["ip", "-4", "rule", "del", "fwmark", mark, "lookup", str(self.table),
                  "pref", str(self.pref)], check=False)
        for _ in range(8):
            if "iif lo" not in _run(["ip", "-4", "rule", "list", "pref", str(self.pref - 1)],
                                    check=False).stdout:
                break
            _run(["ip", "-4", "rule", "del", *self._local_output_rule()], check=False)
        _run(["ip", "-4", "route", "flush", "table", str(self.table)], check=False)
        _fwmark_accept_restore()
        self.ports.clear()

    def dump(self) -> list[str]:
        return _run([*self._ipt, "-S", self.chain], check=False).stdout.splitlines()


__all__ = ["RedirectRules", "ProxyRulesError", "CHAIN", "RULE_PREF", "chain_for_state_dir"]
