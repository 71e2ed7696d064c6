"""The native engine's life: supervised, restarted when it dies (policy and
flows resync), stopped with its last listener; the agent's l7_http_engine
key checked (exit 2 naming the key and the file)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from axoneme.core.flow import FlowVerdict
from axoneme.l7.http import HTTPRule

RULES = [HTTPRule(method="GET", path="/public(/.*)?")]


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: svc\r\n\r\n".encode()


def _gone(pid: int, within: float = 5) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("engine", ["native"])  # the native engine only (h is bound to it)
def test_a_killed_engine_is_restarted_and_serves_again(h) -> None:
    e = h.make_env(RULES)
    try:
        s = e.connect()
        assert h.exchange(s, get("/public")).startswith(b"HTTP/1.1 200")
        eng = e.proxy.engine
        pid = eng.pid
        os.kill(pid, signal.SIGKILL)
        assert h.exchange(s, get("/public"), until_close=True) == b""  # its connections went
        deadline = time.monotonic() + 10
        while (eng.pid == pid or not eng.alive()) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert eng.pid != pid and eng.alive()
        view = e.proxy.engine_view()
        assert view["restarts"] == 1 and "exited" in view["last_fault"], view
        # the same listener, handed over again; the policy is asked again
        e.set_rules([HTTPRule(method="GET", path="/other")])
        s2 = e.connect()
        out = h.exchange(s2, get("/other") + get("/public"), responses=2)
        assert out.startswith(b"HTTP/1.1 200") and out.endswith(b"Access denied")
        kinds = [(f.l7["http"]["url"], f.verdict) for f in e.flows if f.l7["type"] == "REQUEST"]
        assert kinds[-2:] == [("http://svc/other", FlowVerdict.FORWARDED),
                              ("http://svc/public", FlowVerdict.DROPPED)]
    finally:
        h.close_env(e)
    assert _gone(eng.pid)


@pytest.mark.parametrize("engine", ["native"])
def test_the_engine_stops_with_its_last_listener(h) -> None:
    a, b = h.make_env(RULES), h.make_env(RULES)
    try:
        pids = {a.proxy.engine.pid, b.proxy.engine.pid}  # one engine per event loop
        assert all(pids)
    finally:
        h.close_env(a)
        h.close_env(b)
    assert all(_gone(p) for p in pids)


def _agent_run(tmp_path: Path, config: str, **env: str) -> subprocess.CompletedProcess[str]:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(config)
    axoneme = os.path.join(os.path.dirname(sys.executable), "axoneme")
    return subprocess.run([axoneme, "agent", "run", "--config",
                           str(cfg), "--state-dir", str(tmp_path / "state"), "--api-socket",
                           str(tmp_path / "api.sock")],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})


def test_l7_http_engine_key_is_checked(tmp_path: Path) -> None:
    res = _agent_run(tmp_path, "l7_http_engine: envoy\n")
    assert res.returncode == 2, res.stderr
    assert "l7_http_engine must be auto, native or python, got 'envoy'" in res.stderr
    assert str(tmp_path / "agent.yaml") in res.stderr
    res = _agent_run(tmp_path, "l7_http_engine: native\n",
                     AXONEME_L7_HTTP_ENGINE=str(tmp_path / "missing"))
    assert res.returncode == 2, res.stderr
    assert "axoneme-l7-http is not installed" in res.stderr and "l7_http_engine" in res.stderr
