"""RedirectRules against the real kernel: idempotent install, per-port rules, cleanup."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys

import pytest
from axoneme.agent.proxy import RedirectRules
from axoneme.core.marks import to_proxy_mark
from axoneme.testing.netns import add_netns, del_netns

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: iptables mangle, ip rule"),
    pytest.mark.skipif(shutil.which("iptables") is None, reason="needs iptables"),
]


def _out(*args: str) -> str:
    return subprocess.run(list(args), capture_output=True, text=True).stdout


def test_rules_install_idempotent_and_cleanup() -> None:
    sfx = f"{random.randrange(0x10000):04x}"
    rules = RedirectRules(chain=f"AXT-R{sfx}", table=random.randrange(3000, 3999),
                          pref=random.randrange(200, 300))
    try:
        rules.install_base()
        rules.install_base()
        rules.add_port(15123)
        rules.add_port(15123)
        rules.add_port(15124, ("tcp", "udp"))
        dump = rules.dump()
        tproxy = [r for r in dump if "TPROXY" in r]
        assert len(tproxy) == 3
        # the plain rule's mask holds the identity flag: an identity mark never matches it
        assert any(f"--mark {to_proxy_mark(15123):#x}/0xffff8f00" in r and "--on-port 15123" in r
                   and "--tproxy-mark 0x200/0xf00" in r for r in tproxy)
        assert sum("--socket" in r or "-m socket" in r for r in dump) == 1
        prerouting = _out("iptables", "-w", "5", "-t", "mangle", "-S", "PREROUTING")
        assert prerouting.count(f"-j {rules.chain}") == 1
        rule_list = _out("ip", "rule", "list")
        assert rule_list.count(f"lookup {rules.table}") == 1
        assert "fwmark 0x200/0xf00" in rule_list
        assert f"{rules.pref - 1}:\tfrom all fwmark 0x200/0xf00 iif lo lookup main" in rule_list
        assert "local default dev lo" in _out("ip", "route", "show", "table", str(rules.table))
        # fail closed: a marked packet that reaches FORWARD lost its redirect
        forward = _out("iptables", "-w", "5", "-S", "FORWARD")
        assert sum(f"axoneme {rules.chain}: L7 redirect failed closed" in r and "-j DROP" in r
                   and "0x200/0xf00" in r for r in forward.splitlines()) == 1
        # a restarted agent: stale per-port rules go, current ports stay
        fresh = RedirectRules(chain=rules.chain, table=rules.table, pref=rules.pref)
        fresh.install_base()
        assert not any("TPROXY" in r for r in fresh.dump())
        rules.install_base()
        assert sum("TPROXY" in r for r in rules.dump()) == 3
        rules.remove_port(15123)
        assert not any("--on-port 15123" in r for r in rules.dump())
        assert any("--on-port 15124" in r for r in rules.dump())
    finally:
        rules.cleanup()
    assert subprocess.run(["iptables", "-w", "5", "-t", "mangle", "-S", rules.chain],
                          capture_output=True).returncode != 0
    assert f"-j {rules.chain}" not in _out("iptables", "-w", "5", "-t", "mangle", "-S", "PREROUTING")
    assert f"lookup {rules.table}" not in _out("ip", "rule", "list")
    assert f"{rules.pref - 1}:" not in _out("ip", "rule", "list")
    assert _out("ip", "route", "show", "table", str(rules.table)).strip() == ""
    assert f"axoneme {rules.chain}:" not in _out("iptables", "-w", "5", "-S", "FORWARD")
    rules.cleanup()  # idempotent


IDENTITY_RULES = """
import sys
from axoneme.agent.proxy import RedirectRules
from axoneme.core.marks import identity_port_match

def sysctl():
    return open("/proc/sys/net/ipv4/tcp_fwmark_accept").read().strip()

rules = RedirectRules(chain="AXT-ID", identity_marks=True)
rules.install_base()
rules.add_port(15001)
rules.add_port(21000)  # outside the offset window: the plain rule only
dump = rules.dump()
print("sysctl", sysctl())
print("identity", sum(f"--mark {identity_port_match(15001):#x}/0xffff" in r for r in dump))
print("tproxy", sum("TPROXY" in r for r in dump))
rules.cleanup()
print("after", sysctl())
"""


def test_identity_marks_let_the_accepted_socket_inherit_the_mark(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """identity_marks (eBPF): a second TPROXY rule per port matches the identity
    layout, tcp_fwmark_accept is 1 while the rules are installed and its old
    value comes back with the cleanup. In a network namespace of ours (the
    sysctl is per namespace): nothing on the host changes."""
    ns = f"axt-idm-{os.getpid()}"
    add_netns(ns)
    try:
        out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", IDENTITY_RULES],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        got = dict(line.split() for line in out.stdout.splitlines())
        assert got == {"sysctl": "1", "identity": "1", "tproxy": "3", "after": "0"}, out.stdout
    finally:
        del_netns(ns)
