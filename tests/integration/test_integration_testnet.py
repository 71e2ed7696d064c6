"""The test network's own rules (tests/_testnet.py): every netns of ours has its own
resolver, never the host's, and a server is handed to a test only once it accepts."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _testnet  # tests/ is on sys.path (tests/conftest.py)
import pytest

pytestmark = [pytest.mark.privileged]

ROOT = Path(__file__).resolve().parents[2]


def _exec(ns: str, *cmd: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True,
                          timeout=timeout)


def test_netns_factory_gives_each_netns_its_own_resolver(netns_factory: Any) -> None:
    ns = netns_factory("axtn")
    assert _testnet.resolv_conf_problem(ns) is None
    text = Path(f"/etc/netns/{ns}/resolv.conf").read_text()
    for host_ns in _testnet.host_nameservers():
        if not host_ns.startswith("127."):
            assert host_ns not in text, text
    # inside the netns the resolver is its own loopback: a lookup fails at once
    t0 = time.monotonic()
    res = _exec(ns, sys.executable, "-c",
                "import socket; socket.getaddrinfo('axoneme-test.invalid', 80)")
    took = time.monotonic() - t0
    assert res.returncode != 0, res.stdout
    assert took < 3.0, f"a lookup took {took:.1f}s: a resolver timeout, not a refusal"


def test_add_and_del_netns_leave_nothing_behind() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    ns = f"axtn-p{os.getpid()}-{secrets.token_hex(3)}"
    try:
        _testnet.add_netns(ns, "198.51.100.53")
        assert os.path.exists(f"/run/netns/{ns}")
        assert _testnet.resolv_conf_problem(ns) is None
        assert "nameserver 198.51.100.53" in Path(f"/etc/netns/{ns}/resolv.conf").read_text()
    finally:
        _testnet.del_netns(ns)
    assert not os.path.exists(f"/run/netns/{ns}")
    assert not os.path.exists(f"/etc/netns/{ns}")


def test_resolv_conf_problem_names_what_is_wrong(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(_testnet, "RESOLV_DIR", str(tmp_path))
    assert "no resolv.conf" in str(_testnet.resolv_conf_problem("none"))
    for name, text, ok in (("host", "nameserver 10.255.255.53\n", False),
                           ("public", "nameserver 8.8.8.8\n", False),
                           ("empty", "options timeout:1\n", False),
                           ("lo", "nameserver 127.0.0.1\n", True),
                           ("testdns", "nameserver 198.51.100.53\n", True)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "resolv.conf").write_text(text)
        assert (_testnet.resolv_conf_problem(name) is None) == ok, (name, text)


@pytest.fixture
def blackholed_resolver(netns_factory: Any) -> Iterator[str]:
    """A netns whose resolver silently drops every query (as the host's unreachable one)."""
    ns = netns_factory("axtb")
    dead = "198.51.100.254"
    for cmd in (["link", "add", "bh0", "type", "veth", "peer", "name", "bh1"],
                ["link", "set", "bh0", "up"], ["link", "set", "bh1", "up"],
                ["addr", "add", "198.51.100.253/32", "dev", "lo"],
                ["route", "add", f"{dead}/32", "dev", "bh0"],
                ["neigh", "add", dead, "lladdr", "02:00:00:00:00:01", "dev", "bh0"]):
        subprocess.run(["ip", "-n", ns, *cmd], check=True, capture_output=True)
    # glibc's defaults (5 s x 2 attempts), as the host's resolv.conf has them
    Path(f"/etc/netns/{ns}/resolv.conf").write_text(f"nameserver {dead}\n")
    yield ns


def test_fixture_http_server_accepts_where_http_server_module_waits(
        blackholed_resolver: str, tmp_path: Path) -> None:
    ns, ip = blackholed_resolver, "198.51.100.253"
    (tmp_path / "hello").write_text("hi\n")
    # ``-m http.server`` looks its address up before it listens: not accepting in 2 s
    log = tmp_path / "module.log"
    with open(log, "wb") as out:
        slow = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "http.server",
                                 "8080", "--bind", ip], stdout=out, stderr=subprocess.STDOUT)
    try:
        with pytest.raises(AssertionError, match="never accepted"):
            _testnet.wait_accepting(ip, 8080, ns, slow, str(log), timeout=2.0)
    finally:
        slow.kill()
        slow.wait(10)
    # the fixtures' server does no lookup: it accepts at once and serves
    t0 = time.monotonic()
    fast = _testnet.start_http_server(ns, ip, 8081, str(tmp_path), log=str(tmp_path / "f.log"),
                                      python=sys.executable, timeout=2.0)
    try:
        assert time.monotonic() - t0 < 2.0
        res = _exec(ns, "curl", "-s", "-m", "2", f"http://{ip}:8081/hello")
        assert (res.returncode, res.stdout) == (0, "hi\n"), res.stderr
    finally:
        fast.kill()
        fast.wait(10)


def test_wait_accepting_fails_with_the_servers_output(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit('boom: port in use')"],
                                stdout=out, stderr=subprocess.STDOUT)
    with pytest.raises(AssertionError) as info:
        _testnet.wait_accepting("127.0.0.1", 9, None, proc, str(log), timeout=10.0)
    assert "exited with 1" in str(info.value)
    assert "boom: port in use" in str(info.value)


def test_a_netns_without_its_own_resolver_fails_the_test(tmp_path: Path) -> None:
    """The root conftest checks every netns of the session before each test body."""
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    (tmp_path / "conftest.py").write_text(textwrap.dedent(f"""\
        import importlib.util
        spec = importlib.util.spec_from_file_location("_root_conftest", {str(ROOT / "conftest.py")!r})
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        pytest_runtest_call = mod.pytest_runtest_call
    """))
    (tmp_path / "test_bad.py").write_text(textwrap.dedent("""\
        import os, secrets, subprocess
        import pytest

        @pytest.fixture
        def bare_netns():
            ns = f"axtbare-p{os.getpid()}-{secrets.token_hex(3)}"
            subprocess.run(["ip", "netns", "add", ns], check=True)
            yield ns
            subprocess.run(["ip", "netns", "del", ns], check=True)

        def test_uses_bare_netns(bare_netns):
            assert bare_netns
    """))
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "--rootdir", str(tmp_path), str(tmp_path / "test_bad.py")],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "would use the host's resolver" in res.stdout, res.stdout
    assert "has no resolv.conf of its own" in res.stdout, res.stdout
