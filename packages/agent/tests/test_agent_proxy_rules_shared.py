"""Two agents on one host: each owns its redirect chain, neither drops the other's."""

from __future__ import annotations

import os
import random
import shutil
import subprocess

import pytest
from axoneme.agent.proxy import CHAIN, RedirectRules, chain_for_state_dir


def _out(*args: str) -> str:
    return subprocess.run(list(args), capture_output=True, text=True).stdout


def test_chain_for_state_dir() -> None:
    assert chain_for_state_dir("/var/lib/axoneme") == CHAIN
    assert chain_for_state_dir("") == CHAIN
    a, b = chain_for_state_dir("/tmp/a/state"), chain_for_state_dir("/tmp/b/state")
    assert a != b and a.startswith(CHAIN + "-") and len(a) <= 28
    assert chain_for_state_dir("/tmp/a/state") == a  # stable across restarts


@pytest.mark.privileged
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: iptables mangle, ip rule")
@pytest.mark.skipif(shutil.which("iptables") is None, reason="needs iptables")
def test_agents_keep_each_others_rules() -> None:
    table, pref = random.randrange(3000, 3999), random.randrange(200, 300)
    sfx = f"{random.randrange(0x10000):04x}"
    a = RedirectRules(chain=f"{CHAIN}-ta{sfx}", table=table, pref=pref)
    b = RedirectRules(chain=f"{CHAIN}-tb{sfx}", table=table, pref=pref)
    try:
        a.install_base()
        a.add_port(15931)
        b.install_base()  # another agent starting: flushes only its own chain
        b.add_port(15932)
        assert any("--on-port 15931" in r for r in a.dump())
        b.cleanup()  # another agent's cleanup: ours and the shared routing stay
        assert any("--on-port 15931" in r for r in a.dump())
        assert f"-j {a.chain}" in _out("iptables", "-w", "5", "-t", "mangle", "-S", "PREROUTING")
        assert f"lookup {table}" in _out("ip", "rule", "list")
        assert subprocess.run(["iptables", "-w", "5", "-t", "mangle", "-S", b.chain],
                              capture_output=True).returncode != 0
    finally:
        b.cleanup()
        a.cleanup()
        # other agents on this host may keep the shared rule: remove our private table's
        subprocess.run(["ip", "-4", "rule", "del", "fwmark", "0x200/0xf00", "lookup", str(table),
                        "pref", str(pref)], capture_output=True)
        subprocess.run(["ip", "-4", "rule", "del", "fwmark", "0x200/0xf00", "iif", "lo", "lookup",
                        "main", "pref", str(pref - 1)], capture_output=True)
        subprocess.run(["ip", "-4", "route", "flush", "table", str(table)], capture_output=True)
    assert f"{pref - 1}:" not in _out("ip", "rule", "list")
    assert subprocess.run(["iptables", "-w", "5", "-t", "mangle", "-S", a.chain],
                          capture_output=True).returncode != 0
