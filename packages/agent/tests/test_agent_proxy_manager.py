"""ProxyManager without kernel state: ports, listeners, refcounts, factories."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from axoneme.agent.proxy import ProxyError, ProxyManager
from axoneme.core.l7proxy import ProxyConfig, ProxyPolicy
from axoneme.core.mapstate import Direction
from axoneme.core.marks import (
    MARK_MAGIC_PROXY_EGRESS,
    MARK_MAGIC_PROXY_INGRESS,
    from_proxy_mark,
    is_from_proxy,
    proxy_port_of,
    to_proxy_mark,
)


def _free_range(n: int = 8) -> tuple[int, int]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port, port + n


def test_marks_roundtrip() -> None:
    m = to_proxy_mark(15001)
    assert m == 0x0200 | (15001 << 16)
    assert proxy_port_of(m) == 15001 and proxy_port_of(0x0A00) == 0
    assert not is_from_proxy(m)
    assert from_proxy_mark(Direction.INGRESS) == MARK_MAGIC_PROXY_INGRESS == 0x0A00
    assert from_proxy_mark(Direction.EGRESS) == MARK_MAGIC_PROXY_EGRESS == 0x0B00
    assert is_from_proxy(0x0A00) and is_from_proxy(0x0B00 | 0xF0000000)
    with pytest.raises(ValueError):
        to_proxy_mark(0)


def test_acquire_release_refcount_and_serving() -> None:
    flows: list[Any] = []
    pm = ProxyManager(lambda *a: ProxyPolicy(), flows.append, port_range=_free_range(),
                      redirect=False, transparent=False)
    try:
        p1 = pm.acquire("http", Direction.EGRESS)
        assert pm.acquire("http", Direction.EGRESS) == p1
        p2 = pm.acquire("http", Direction.INGRESS)
        assert p2 != p1 and pm.port_for("http", Direction.INGRESS) == p2
        assert {(i.direction, i.refs) for i in pm.proxies()} == {(Direction.EGRESS, 2),
                                                                 (Direction.INGRESS, 1)}
        # the listener is the http proxy (a direct connection is refused, not looped)
        c = socket.create_connection(("127.0.0.1", p1), timeout=5)
        c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            assert c.recv(100) == b""
        except ConnectionResetError:
            pass  # closed with our request unread: RST
        pm.release("http", Direction.EGRESS)
        assert pm.port_for("http", Direction.EGRESS) == p1
        pm.release("http", Direction.EGRESS)
        assert pm.port_for("http", Direction.EGRESS) is None
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", p1), timeout=5)
    finally:
        pm.stop()
    assert pm.proxies() == []


def test_explicit_port_and_conflicts() -> None:
    lo, hi = _free_range()
    pm = ProxyManager(lambda *a: None, lambda f: None, port_range=(lo, hi), redirect=False,
                      transparent=False)
    try:
        assert pm.acquire("http", Direction.INGRESS, port=hi) == hi
        with pytest.raises(ProxyError):
            pm.acquire("http", Direction.EGRESS, port=hi)
    finally:
        pm.stop()


def test_unknown_parser_fails_loudly() -> None:
    pm = ProxyManager(lambda *a: None, lambda f: None, redirect=False, transparent=False)
    try:
        with pytest.raises(Exception, match="nosuchparser"):
            pm.acquire("nosuchparser", Direction.INGRESS)
    finally:
        pm.stop()


def _get(c: socket.socket, path: bytes) -> bytes:
    c.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    buf = b""
    while b"\r\n\r\n" not in buf or len(buf) < buf.index(b"\r\n\r\n") + 4 + int(
            buf.lower().split(b"content-length: ")[1].split(b"\r\n")[0]):
        chunk = c.recv(1000)
        assert chunk
        buf += chunk
    return buf


def _echo_upstream() -> Any:
    """A keep-alive HTTP server on loopback answering each GET with its path."""
    import http.server
    import threading

    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            body = self.path.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a: Any) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def test_end_to_end_with_explicit_upstream() -> None:
    """A listener from the manager proxies to a fixed upstream (no TPROXY)."""
    srv = _echo_upstream()
    from axoneme.l7.http import HTTPRule

    flows: list[Any] = []
    pm = ProxyManager(lambda *a: ProxyPolicy((HTTPRule(path="/ok"),)), flows.append,
                      port_range=_free_range(), redirect=False, transparent=False,
                      config=ProxyConfig(upstream=srv.server_address[:2]))
    try:
        port = pm.acquire("http", Direction.INGRESS)
        c = socket.create_connection(("127.0.0.1", port), timeout=5)
        assert _get(c, b"/ok").endswith(b"\r\n\r\n/ok")
        assert _get(c, b"/no").endswith(b"\r\n\r\nAccess denied")
        assert [f.verdict.value for f in flows] == ["FORWARDED", "FORWARDED", "DROPPED"]
        st = pm.stats()[port]
        assert (st["parser"], st["direction"], st["requests"], st["denied"]) == (
            "http", "INGRESS", 2, 1)
        assert all(f.traffic_direction == "INGRESS" for f in flows)
    finally:
        pm.stop()
        srv.shutdown()


def test_factory_kwargs_and_server_lookup() -> None:
    made: list[dict[str, Any]] = []

    class Fake:
        def __init__(self, sock: socket.socket, **kw: Any) -> None:
            self.sock = sock
            made.append(kw)

        async def start(self) -> None:
            pass

        async def stop(self) -> None:
            self.sock.close()

    def pf(*a: Any) -> None:
        return None

    pm = ProxyManager({"fake": pf}, lambda f: None, port_range=_free_range(), redirect=False,
                      transparent=False, factories={"fake": Fake, "other": Fake})
    try:
        port = pm.acquire("fake", Direction.EGRESS, cache="C")
        assert made[0]["cache"] == "C" and made[0]["direction"] is Direction.EGRESS
        assert callable(made[0]["connect_upstream"]) and made[0]["policy_for"] is pf
        with pytest.raises(ProxyError, match="no policy_for"):
            pm.acquire("other", Direction.EGRESS)
        assert isinstance(pm.server(port), Fake) and pm.loop is not None
    finally:
        pm.stop()


def test_dns_proxy_starts_from_entry_point() -> None:
    from axoneme.core.plugins import installed

    if "dns" not in installed("axoneme.l7"):
        pytest.skip("axoneme-l7-dns is not installed")
    pm = ProxyManager(lambda *a: None, lambda f: None, port_range=_free_range(), redirect=False,
                      transparent=False, config=ProxyConfig(upstream=("127.0.0.1", 53)))
    try:
        port = pm.acquire("dns", Direction.EGRESS)
        server = pm.server(port)
        assert type(server).__module__.startswith("axoneme.l7.dns"), type(server)
        assert pm.acquire("dns", Direction.EGRESS) == port, "one DNS proxy per direction"
    finally:
        pm.stop()


@pytest.mark.parametrize("engine", ["python", "native"])
def test_crashed_proxy_loop_is_reported_and_revived(engine: str) -> None:
    """The proxies' loop dies (failpoint proxy.loop): health() names it, nothing passes while
    it is down, revive() brings every listener back on the same port, policy intact. The
    native HTTP engine: its process goes with the loop (a policy change meanwhile kills it
    at once), a new one serves the new loop."""
    import time

    from axoneme.core import failpoints
    from axoneme.l7.http import HTTPRule
    from axoneme.l7.http._native import http_proxy_factory

    factory, running = http_proxy_factory("auto" if engine == "native" else "python")
    if running != engine:
        pytest.skip("axoneme-l7-http is not built (scripts/l7-build: no Go toolchain here)")
    srv = _echo_upstream()
    pm = ProxyManager(lambda *a: ProxyPolicy((HTTPRule(path="/ok"),)), lambda f: None,
                      port_range=_free_range(), redirect=False, transparent=False,
                      config=ProxyConfig(upstream=srv.server_address[:2]),
                      factories={"http": factory})
    failpoints.configure("1")
    try:
        port = pm.acquire("http", Direction.INGRESS)
        assert pm.health() is None and pm.revive() is False
        failpoints.set_failpoint("proxy.loop", "1*error")
        deadline = time.monotonic() + 10
        while pm.health() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "crashed" in (pm.health() or "")
        # down: a client is accepted by the kernel but nothing is forwarded
        c = socket.create_connection(("127.0.0.1", port), timeout=1)
        c.sendall(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
        with pytest.raises(TimeoutError):
            c.recv(100)
        old = getattr(pm.server(port), "engine", None)
        pm.policy_changed()  # native: the orphaned engine is killed, nothing stale is served
        if old is not None:
            assert old.proc is not None and old.proc.poll() is not None
        assert pm.revive() is True and pm.restarts == 1
        assert pm.health() is None
        c2 = socket.create_connection(("127.0.0.1", port), timeout=5)
        assert _get(c2, b"/ok").endswith(b"\r\n\r\n/ok")
        assert _get(c2, b"/no").endswith(b"\r\n\r\nAccess denied")
        c.close()
        c2.close()
    finally:
        failpoints.configure(None)
        pm.stop()
        srv.shutdown()
    assert pm.proxies() == []


def test_proxies_share_one_uvloop_loop() -> None:
    """Every proxy (HTTP, Kafka, DNS) runs on the manager's one loop, uvloop's
    (the agent extra declares it): an HTTP and a Kafka listener serve there."""
    import uvloop

    pm = ProxyManager(lambda *a: ProxyPolicy(), lambda f: None, port_range=_free_range(),
                      redirect=False, transparent=False)
    try:
        ports = [pm.acquire("http", Direction.EGRESS), pm.acquire("kafka", Direction.EGRESS)]
        assert isinstance(pm._loop, uvloop.Loop), type(pm._loop)
        for port in ports:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
    finally:
        pm.stop()
