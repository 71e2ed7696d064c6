"""TPROXY redirect end to end: real netns pods, the http proxy in between.

client netns --veth--> host (test MARK rule = what a datapath does,
AXON-PROXY TPROXY rule, proxy) --veth--> server netns (python http.server).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from axoneme.agent.proxy import ProxyManager, RedirectRules
from axoneme.core.flow import Flow, FlowVerdict
from axoneme.core.l7proxy import ProxyPolicy
from axoneme.core.mapstate import Direction
from axoneme.core.marks import MARK_MAGIC_HOST_MASK, from_proxy_mark, to_proxy_mark
from axoneme.l7.http import HTTPRule

# the repository's netns helpers (tests/_testnet.py): own resolv.conf, servers that accept
sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))
import _testnet  # noqa: E402

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: netns, veth, iptables TPROXY"),
    pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl"),
    pytest.mark.skipif(shutil.which("iptables") is None, reason="needs iptables"),
]


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(args), capture_output=True, text=True)
    if check and proc.returncode:
        raise RuntimeError(f"{' '.join(args)}: {proc.stderr.strip()}")
    return proc


@dataclass
class Topo:
    sfx: str
    cli_ns: str
    srv_ns: str
    cli_ip: str
    srv_ip: str
    host_cli_if: str
    log_path: str


def _uplink() -> str:
    out = sh("ip", "-4", "route", "show", "default").stdout.split()
    return out[out.index("dev") + 1] if "dev" in out else "eth0"


@pytest.fixture
def topo() -> Iterator[Topo]:
    sfx = f"{random.randrange(0x10000):04x}"
    r = random.randrange(100, 250)
    cli_ns, srv_ns = f"axtc{sfx}", f"axts{sfx}"
    hc, hs = f"axhc{sfx}", f"axhs{sfx}"
    guard = f"AXT-G{sfx}"
    docroot = tempfile.mkdtemp(prefix="axt-www-")
    log_path = os.path.join(docroot, "server.log")
    server: subprocess.Popen[bytes] | None = None
    try:
        # Guard first: nothing from the pod CIDR may leave through the uplink.
        sh("iptables", "-w", "5", "-N", guard)
        sh("iptables", "-w", "5", "-A", guard, "-s", "10.244.0.0/16", "-o", _uplink(), "-j", "DROP")
        sh("iptables", "-w", "5", "-I", "FORWARD", "1", "-j", guard)
        for ns in (cli_ns, srv_ns):
            # never the host's resolver: the pods resolve against their own loopback
            _testnet.add_netns(ns)
        cli_ip, srv_ip = f"10.244.{r}.2", f"10.244.{r}.6"
        for host_if, ns, ip, gw in ((hc, cli_ns, cli_ip, f"10.244.{r}.1"),
                                    (hs, srv_ns, srv_ip, f"10.244.{r}.5")):
            sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "addr", "add", f"{gw}/30", "dev", host_if)
            sh("ip", "link", "set", host_if, "up")
            sh("ip", "-n", ns, "addr", "add", f"{ip}/30", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "route", "add", "default", "via", gw)
        # the path to the server must be the server veth, never the uplink
        assert hs in sh("ip", "route", "get", srv_ip).stdout
        for name, body in (("public", "public data"), ("private", "secret data")):
            with open(os.path.join(docroot, name), "w") as f:
                f.write(body)
        with open(log_path, "wb") as log:
            server = subprocess.Popen(
                ["ip", "netns", "exec", srv_ns, "python3",
                 *_testnet.http_server_argv(srv_ip, 80, docroot)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        _testnet.wait_accepting(srv_ip, 80, srv_ns, server, log_path)
        # forget the readiness probe in the log
        with open(log_path, "r+b") as f:
            f.truncate(0)
        yield Topo(sfx, cli_ns, srv_ns, cli_ip, srv_ip, hc, log_path)
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(5)
        for ns in (cli_ns, srv_ns):
            _testnet.del_netns(ns)
        for host_if in (hc, hs):
            sh("ip", "link", "del", host_if, check=False)
        while sh("iptables", "-w", "5", "-D", "FORWARD", "-j", guard, check=False).returncode == 0:
            pass
        sh("iptables", "-w", "5", "-F", guard, check=False)
        sh("iptables", "-w", "5", "-X", guard, check=False)
        shutil.rmtree(docroot, ignore_errors=True)


def curl(t: Topo, path: str) -> tuple[str, str]:
    out = sh("ip", "netns", "exec", t.cli_ns, "curl", "-s", "-m", "5", "-w", "\n%{http_code}",
             f"http://{t.srv_ip}{path}", check=False).stdout
    body, _, code = out.rpartition("\n")
    return code, body


@pytest.mark.parametrize("engine", ["python", "native"])
@pytest.mark.parametrize("direction", [Direction.EGRESS, Direction.INGRESS])
def test_tproxy_redirect_enforces_http_rules(topo: Topo, direction: Direction, engine: str) -> None:
    """Both HTTP engines (the native one: axoneme-l7-http given the listener,
    connecting upstream from the client's address with the from-proxy mark)."""
    t = topo
    flows: list[Flow] = []
    seen: list[tuple[str, str]] = []

    def policy_for(sip: str, sport: int, dip: str, dport: int, d: Direction) -> ProxyPolicy | None:
        seen.append((sip, dip))
        if sip == t.cli_ip and dip == t.srv_ip and dport == 80 and d is direction:
            return ProxyPolicy((HTTPRule(method="GET", path="/public"),))
        return None

    rules = RedirectRules(chain=f"AXT-P{t.sfx}", table=random.randrange(3000, 3999),
                          pref=random.randrange(100, 200))
    from axoneme.l7.http._native import http_proxy_factory

    if engine == "native" and http_proxy_factory("auto")[1] != "native":
        pytest.skip("axoneme-l7-http is not built (scripts/l7-build: no Go toolchain here)")
    pm = ProxyManager(policy_for, flows.append, rules=rules,
                      factories={"http": http_proxy_factory(engine)[0]})
    mark_chain = f"AXT-M{t.sfx}"
    try:
        port = pm.acquire("http", direction)
        assert any(f"--on-port {port}" in r for r in rules.dump())
        # What a datapath does for a redirected entry: mark the pod's packets.
        sh("iptables", "-w", "5", "-t", "mangle", "-N", mark_chain)
        sh("iptables", "-w", "5", "-t", "mangle", "-A", mark_chain, "-i", t.host_cli_if, "-p", "tcp",
           "--dport", "80", "-j", "MARK", "--set-mark", hex(to_proxy_mark(port)))
        sh("iptables", "-w", "5", "-t", "mangle", "-I", "PREROUTING", "1", "-j", mark_chain)
        # Count upstream packets carrying the proxy's from-proxy mark (SO_MARK).
        sh("iptables", "-w", "5", "-t", "mangle", "-A", mark_chain, "-d", t.srv_ip, "-p", "tcp",
           "--dport", "80", "-m", "mark", "--mark",
           f"{from_proxy_mark(direction):#x}/{MARK_MAGIC_HOST_MASK:#x}")
        sh("iptables", "-w", "5", "-t", "mangle", "-I", "OUTPUT", "1", "-j", mark_chain)

        code, body = curl(t, "/public")
        assert (code, body) == ("200", "public data")
        code, body = curl(t, "/private")
        assert code == "403" and body == "Access denied"
        code, body = curl(t, "/public/../private")  # curl normalises: still /private
        assert code == "403"
        # one keep-alive connection: every request is checked on its own
        out = sh("ip", "netns", "exec", t.cli_ns, "curl", "-s", "-m", "5", "-w", " %{http_code}\n",
                 f"http://{t.srv_ip}/public", f"http://{t.srv_ip}/private",
                 f"http://{t.srv_ip}/public", check=False).stdout
        assert out.split("\n")[:3] == ["public data 200", "Access denied 403", "public data 200"]
        counters = sh("iptables", "-w", "5", "-t", "mangle", "-L", mark_chain, "-v", "-n", "-x").stdout
        marked = [line for line in counters.splitlines() if "mark match" in line]
        assert marked and int(marked[0].split()[0]) > 0, counters

        log = open(t.log_path).read()
        assert "GET /public HTTP/1.1" in log
        assert "/private" not in log
        # the server saw the real client address (transparent upstream)
        assert f"{t.cli_ip} - -" in log
        # the proxy saw the original addresses
        assert (t.cli_ip, t.srv_ip) in seen
        verdicts = {(f.l7["type"], f.l7["http"]["url"].rsplit("/", 1)[-1], f.verdict)
                    for f in flows if f.l7}
        assert ("REQUEST", "public", FlowVerdict.FORWARDED) in verdicts
        assert ("REQUEST", "private", FlowVerdict.DROPPED) in verdicts
        assert ("RESPONSE", "public", FlowVerdict.FORWARDED) in verdicts
        assert {f.traffic_direction for f in flows} == {str(direction)}
    finally:
        for hook in ("PREROUTING", "OUTPUT"):
            while sh("iptables", "-w", "5", "-t", "mangle", "-D", hook, "-j", mark_chain,
                     check=False).returncode == 0:
                pass
        sh("iptables", "-w", "5", "-t", "mangle", "-F", mark_chain, check=False)
        sh("iptables", "-w", "5", "-t", "mangle", "-X", mark_chain, check=False)
        pm.stop()
    # everything the manager installed is gone
    assert sh("iptables", "-w", "5", "-t", "mangle", "-S", rules.chain, check=False).returncode != 0
    assert f"lookup {rules.table}" not in sh("ip", "rule", "list").stdout
    assert sh("ip", "route", "show", "table", str(rules.table), check=False).stdout.strip() == ""
