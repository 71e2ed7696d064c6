"""The TPROXY redirect plumbing (mirrors Cilium's CILIUM_PRE_mangle):

    iptables -t mangle -N AXON-PROXY;  -A PREROUTING -j AXON-PROXY
    -A AXON-PROXY -m socket --transparent -j MARK --set-xmark 0x200/0xf00
    -A AXON-PROXY -p tcp -m mark --mark <0x200|port<<16>/0xffff0f00 \
        -j TPROXY --on-port <port> --on-ip 127.0.0.1 --tproxy-mark 0x200/0xf00
    ip rule add fwmark 0x200/0xf00 lookup 2004 pref 9
    ip route add local 0.0.0.0/0 dev lo table 2004

1. The socket rule sends packets of connections a transparent socket already
   owns (the replies to the proxy's upstream connections, whose destination
   is the client's address) to the local stack instead of forwarding them.
2. One TPROXY rule per proxy port diverts a datapath-marked packet to the
   listener; TPROXY sets 0x200 in the magic nibble and the ip rule routes
   such packets locally.
The jump is appended to PREROUTING: a datapath marking in mangle/PREROUTING
must insert its rules before it (tc-based datapaths mark before netfilter).
"""

from __future__ import annotations

import logging
import shutil
import subprocess

from axoneme.core.errors import AxonemeError
from axoneme.core.marks import (
    MARK_TO_PROXY_MASK,
    PROXY_ROUTE_TABLE,
    TPROXY_MARK,
    TPROXY_MASK,
    to_proxy_mark,
)

LOG = logging.getLogger(__name__)

CHAIN = "AXON-PROXY"
RULE_PREF = 9


class ProxyRulesError(AxonemeError):
    """The redirect rules could not be installed."""


def _run(args: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise ProxyRulesError(f"{' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


class RedirectRules:
    """Installs/removes the TPROXY chain, the ip rule and the local route."""

    def __init__(self, chain: str = CHAIN, table: int = PROXY_ROUTE_TABLE, pref: int = RULE_PREF,
                 on_ip: str = "127.0.0.1") -> None:
        self.chain = chain
        self.table = table
        self.pref = pref
        self.on_ip = on_ip
        self.ports: dict[int, tuple[str, ...]] = {}
        ipt = shutil.which("iptables")
        if ipt is None:
            raise ProxyRulesError("iptables is not installed: cannot redirect to L7 proxies")
        self._ipt = [ipt, "-w", "5", "-t", "mangle"]

    def _ipt_ok(self, *args: str) -> bool:
        return _run([*self._ipt, *args], check=False).returncode == 0

    def _port_rule(self, port: int, proto: str) -> list[str]:
        return ["-p", proto, "-m", "mark", "--mark",
                f"{to_proxy_mark(port):#x}/{MARK_TO_PROXY_MASK:#x}",
                "-m", "comment", "--comment", f"axoneme proxy {port}",
                "-j", "TPROXY", "--on-port", str(port), "--on-ip", self.on_ip,
                "--tproxy-mark", f"{TPROXY_MARK:#x}/{TPROXY_MASK:#x}"]

    def _socket_rule(self) -> list[str]:
        return ["-m", "socket", "--transparent", "-m", "comment", "--comment",
                "axoneme: proxied connections to the local proxy",
                "-j", "MARK", "--set-xmark", f"{TPROXY_MARK:#x}/{TPROXY_MASK:#x}"]

    def install_base(self) -> None:
        """Chain, PREROUTING jump, socket rule, ip rule, local route (idempotent).

        The chain is flushed first: per-port rules left by a previous agent
        run are dropped, the current ports are re-added.
        """
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
        _run(["ip", "-4", "route", "replace", "local", "0.0.0.0/0", "dev", "lo",
              "table", str(self.table)])
        for port, protocols in list(self.ports.items()):
            self.add_port(port, protocols)

    def add_port(self, port: int, protocols: tuple[str, ...] = ("tcp",)) -> None:
        for proto in protocols:
            rule = self._port_rule(port, proto)
            if not self._ipt_ok("-C", self.chain, *rule):
                _run([*self._ipt, "-A", self.chain, *rule])
        self.ports[port] = protocols

    def remove_port(self, port: int) -> None:
        for proto in self.ports.pop(port, ("tcp", "udp")):
            rule = self._port_rule(port, proto)
            while self._ipt_ok("-C", self.chain, *rule):
                _run([*self._ipt, "-D", self.chain, *rule], check=False)

    def cleanup(self) -> None:
        """Remove everything (idempotent; also clears leftovers of a crashed agent)."""
        while self._ipt_ok("-C", "PREROUTING", "-j", self.chain):
            _run([*self._ipt, "-D", "PREROUTING", "-j", self.chain], check=False)
        if self._ipt_ok("-S", self.chain):
            _run([*self._ipt, "-F", self.chain], check=False)
            _run([*self._ipt, "-X", self.chain], check=False)
        mark = f"{TPROXY_MARK:#x}/{TPROXY_MASK:#x}"
        for _ in range(8):
            rules = _run(["ip", "-4", "rule", "list", "pref", str(self.pref)], check=False).stdout
            if f"lookup {self.table}" not in rules:
                break
            _run(["ip", "-4", "rule", "del", "fwmark", mark, "lookup", str(self.table),
                  "pref", str(self.pref)], check=False)
        _run(["ip", "-4", "route", "flush", "table", str(self.table)], check=False)
        self.ports.clear()

    def dump(self) -> list[str]:
        return _run([*self._ipt, "-S", self.chain], check=False).stdout.splitlines()


__all__ = ["RedirectRules", "ProxyRulesError", "CHAIN", "RULE_PREF"]
