"""RedirectRules against the real kernel: idempotent install, per-port rules, cleanup."""

from __future__ import annotations

import os
import random
import shutil
import subprocess

import pytest
from axoneme.agent.proxy import RedirectRules
from axoneme.core.marks import to_proxy_mark

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
        assert any(f"--mark {to_proxy_mark(15123):#x}/0xffff0f00" in r and "--on-port 15123" in r
                   and "--tproxy-mark 0x200/0xf00" in r for r in tproxy)
        assert sum("--socket" in r or "-m socket" in r for r in dump) == 1
        prerouting = _out("iptables", "-w", "5", "-t", "mangle", "-S", "PREROUTING")
        assert prerouting.count(f"-j {rules.chain}") == 1
        rule_list = _out("ip", "rule", "list")
        assert rule_list.count(f"lookup {rules.table}") == 1
        assert "fwmark 0x200/0xf00" in rule_list
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
    assert _out("ip", "route", "show", "table", str(rules.table)).strip() == ""
    assert f"axoneme {rules.chain}:" not in _out("iptables", "-w", "5", "-S", "FORWARD")
    rules.cleanup()  # idempotent
