"""The HTTP proxy on loopback (explicit upstream, no TPROXY)."""

from __future__ import annotations

import socket
import time

import pytest
from axoneme.core.flow import FlowVerdict
from axoneme.core.l7proxy import ProxyConfig
from axoneme.l7.http import HeaderMatch, HTTPRule


@pytest.fixture(autouse=True)
def _harness(h) -> None:
    """Every test here runs on both engines (``h`` is bound to one)."""
    global close_env, count_responses, exchange, make_env, Loop, Proxy
    close_env, count_responses, exchange, make_env, Loop, Proxy = (
        h.close_env, h.count_responses, h.exchange, h.make_env, h.Loop, h.factory)


RULES = [HTTPRule(method="GET", path="/public(/.*)?"), HTTPRule(method="POST", path="/upload")]


def get(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: svc\r\n{extra}\r\n".encode()


def test_allowed_and_denied(env) -> None:
    env.set_rules(RULES)
    s = env.connect()
    out = exchange(s, get("/public"))
    assert out.startswith(b"HTTP/1.1 200") and out.endswith(b"ok /public 0")
    out = exchange(s, get("/private"))
    assert out.startswith(b"HTTP/1.1 403 Forbidden") and out.endswith(b"\r\n\r\nAccess denied")
    assert b"Content-Length: 13" in out
    # the connection stays usable after a denial without body
    out = exchange(s, get("/public/a"))
    assert out.startswith(b"HTTP/1.1 200")
    assert env.upstream.targets() == [b"/public", b"/public/a"]
    kinds = [(f.l7["type"], f.verdict, f.l7["http"]["url"]) for f in env.flows]
    assert ("REQUEST", FlowVerdict.DROPPED, "http://svc/private") in kinds
    assert ("RESPONSE", FlowVerdict.FORWARDED, "http://svc/public") in kinds
    resp = [f for f in env.flows if f.l7["type"] == "RESPONSE"][0]
    assert resp.l7["http"]["code"] == 200 and resp.type == "L7" and resp.is_reply


def test_pipelining_checks_every_request(env) -> None:
    env.set_rules(RULES)
    s = env.connect()
    out = exchange(s, get("/public") + get("/private") + get("/public/2"), responses=3)
    assert count_responses(out) == 3
    assert out.count(b"Access denied") == 1
    assert env.upstream.targets() == [b"/public", b"/public/2"]


def test_policy_change_applies_to_next_request(env) -> None:
    env.set_rules(RULES)
    s = env.connect()
    assert exchange(s, get("/public")).startswith(b"HTTP/1.1 200")
    env.set_rules([HTTPRule(path="/other")])
    assert exchange(s, get("/public")).startswith(b"HTTP/1.1 403")
    env.set_none()
    out = exchange(s, get("/other"), until_close=True)
    assert out.startswith(b"HTTP/1.1 403")
    assert env.upstream.targets() == [b"/public"]


def test_chunked_upload_is_streamed_and_reencoded(env) -> None:
    env.set_rules(RULES)
    s = env.connect()
    body = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\n"
    out = exchange(s, b"POST /upload HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n"
                   + body)
    assert out.startswith(b"HTTP/1.1 200") and out.endswith(b"ok /upload 11")
    assert env.upstream.seen[0][1] == b"hello world"


def test_large_body_with_content_length(env) -> None:
    env.set_rules(RULES)
    s = env.connect()
    body = b"x" * (3 * 1024 * 1024)
    out = exchange(s, b"POST /upload HTTP/1.1\r\nHost: svc\r\nContent-Length: %d\r\n\r\n" % len(body)
                   + body, timeout=20)
    assert out.endswith(b"ok /upload %d" % len(body))


def test_chunked_response_relayed(env) -> None:
    env.set_rules([])
    s = env.connect()
    out = exchange(s, get("/chunked") + get("/x"), responses=2)
    assert b"3\r\nok \r\n8\r\n/chunked\r\n0\r\n\r\n" in out
    assert out.endswith(b"ok /x 0")


def test_denied_body_drained_keeps_connection(env) -> None:
    env.set_rules(RULES)
    s = env.connect()
    out = exchange(s, b"POST /nope HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\n\r\nhello"
                   + get("/public"), responses=2)
    assert out.startswith(b"HTTP/1.1 403") and out.endswith(b"ok /public 0")
    assert env.upstream.targets() == [b"/public"]


def test_denied_chunked_body_closes(env) -> None:
    env.set_rules(RULES)
    s = env.connect()
    out = exchange(s, b"POST /nope HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"5\r\nhello\r\n0\r\n\r\n" + get("/public"), until_close=True)
    assert out.startswith(b"HTTP/1.1 403") and b"Connection: close" in out
    assert count_responses(out) == 1
    assert env.upstream.seen == []


def test_expect_continue(env) -> None:
    env.set_rules(RULES)
    s = env.connect()
    s.sendall(b"POST /upload HTTP/1.1\r\nHost: svc\r\nContent-Length: 2\r\n"
              b"Expect: 100-continue\r\n\r\n")
    out = b""
    while not out.endswith(b"\r\n\r\n"):
        out += s.recv(100)
    assert out == b"HTTP/1.1 100 Continue\r\n\r\n"
    out = exchange(s, b"hi")
    assert out.endswith(b"ok /upload 2")
    assert b"expect" not in env.upstream.seen[0][0].lower()


def test_header_actions_modify_forwarded_request(env) -> None:
    env.set_rules([HTTPRule(header_matches=(HeaderMatch("X-Id", "fixed", "REPLACE"),
                                            HeaderMatch("X-Drop", "never", "DELETE")))])
    s = env.connect()
    out = exchange(s, get("/", "X-Id: evil\r\nX-Drop: 1\r\n"))
    assert out.startswith(b"HTTP/1.1 200")
    head = env.upstream.seen[0][0]
    assert b"X-Id: fixed" in head and b"evil" not in head and b"X-Drop" not in head


def test_absolute_form_forwarded_as_origin_form(env) -> None:
    env.set_rules([HTTPRule(path="/public")])
    s = env.connect()
    out = exchange(s, b"GET http://svc/public HTTP/1.1\r\nHost: svc\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200")
    out = exchange(s, b"GET http://svc/private HTTP/1.1\r\nHost: svc\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 403")
    assert env.upstream.targets() == [b"/public"]


def test_head_request_has_no_body(env) -> None:
    s = env.connect()
    out = exchange(s, b"HEAD /h HTTP/1.1\r\nHost: svc\r\n\r\n" + get("/g"), responses=2)
    assert out.endswith(b"ok /g 0") and out.count(b"HTTP/1.1 200") == 2


def test_upstream_unreachable_gives_503() -> None:
    e = make_env()
    try:
        e.upstream.server.close()
        e.loop.run(e.upstream.server.wait_closed())
        s = e.connect()
        out = exchange(s, get("/"), until_close=True)
        assert out.startswith(b"HTTP/1.1 503")
    finally:
        close_env(e)


def _closed(s: socket.socket) -> bool:
    """EOF or RST (an aborted connection), not our own recv timeout."""
    try:
        return s.recv(100) == b""
    except ConnectionResetError:
        return True


def test_idle_and_slow_header_timeouts_close() -> None:
    e = make_env(config=ProxyConfig(header_timeout=0.3, idle_timeout=0.3, body_timeout=0.3))
    try:
        s = e.connect()
        s.sendall(b"GET / HTTP/1.1\r\nHost:")  # never finishes the head
        s.settimeout(5)
        start = time.monotonic()
        assert _closed(s)  # closed by the proxy, not by our timeout
        assert time.monotonic() - start < 5
        s2 = e.connect()
        s2.settimeout(5)
        assert _closed(s2)  # idle connection closed
        assert e.upstream.seen == []
    finally:
        close_env(e)


def test_stalled_body_times_out() -> None:
    e = make_env(config=ProxyConfig(header_timeout=2, idle_timeout=2, body_timeout=0.3))
    try:
        s = e.connect()
        s.sendall(b"POST /upload HTTP/1.1\r\nHost: svc\r\nContent-Length: 100\r\n\r\nabc")
        s.settimeout(5)
        assert _closed(s)
    finally:
        close_env(e)


def test_forwarded_head_is_byte_exact(env) -> None:
    env.set_rules([HTTPRule(path="/public")])
    s = env.connect()
    head = b"GET /public HTTP/1.1\r\nHost: svc\r\nX-Odd:   spaced value  \r\nAccept: */*\r\n\r\n"
    assert exchange(s, head).startswith(b"HTTP/1.1 200")
    assert env.upstream.seen[0][0] == head


def test_connection_cap() -> None:
    e = make_env(config=ProxyConfig(max_connections=2, header_timeout=3, idle_timeout=3))
    try:
        held = [e.connect(), e.connect()]
        time.sleep(0.2)
        s = e.connect()
        s.settimeout(5)
        try:
            assert s.recv(100) == b""
        except ConnectionResetError:
            pass
        e.flows  # noqa: B018 - delivers the native engine's counters too
        assert e.proxy.stats["refused_connections"] >= 1
        for h in held:
            h.close()
    finally:
        close_env(e)


@pytest.mark.parametrize("raw,status", [
    (b"POST /upload HTTP/1.1\r\nHost: svc\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"0\r\n\r\n", 400),
    (b"POST /upload HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
     b"0\r\n\r\n", 400),
    (b"POST /upload HTTP/1.1\r\nHost: svc\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc", 400),
    (b"POST /upload HTTP/1.1\r\nHost: svc\r\nContent-Length: 3\r\nContent-Length: 30\r\n\r\nabc", 400),
    (b"POST /upload HTTP/1.1\r\nHost: svc\r\nContent-Length: 3, 3\r\n\r\nabc", 400),
    # RFC 9112 §6.1: final coding not chunked -> 400; unknown coding before it -> 501
    (b"POST /upload HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n", 400),
    (b"POST /upload HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: identity\r\n\r\n", 400),
    (b"POST /upload HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: xchunked\r\n\r\n", 400),
    (b"POST /upload HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: \x85chunked\r\n\r\n0\r\n\r\n", 400),
    (b"POST /upload HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\xa0\r\n\r\n0\r\n\r\n", 400),
    (b"POST /upload HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    (b"POST /upload HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
    (b"POST /upload HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\nTransfer-Encoding: \x85chunked\r\n"
     b"\r\n0\r\n\r\n", 400),
    (b"POST /upload HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding : chunked\r\n\r\n", 400),
    (b"GET /public HTTP/1.1\r\nHost: svc\r\nX: a\r\n b\r\n\r\n", 400),
    (b"GET /public HTTP/1.1\r\nHost: svc\r\nX: a\rb\r\n\r\n", 400),
    (b"GET /public/%2e%2e;/private HTTP/1.1\r\nHost: svc\r\n\r\n", 400),
    (b"GET /public/%e0%80%ae%e0%80%ae/private HTTP/1.1\r\nHost: svc\r\n\r\n", 400),
    (b"GET /public/%c0%ae%c0%ae/private HTTP/1.1\r\nHost: svc\r\n\r\n", 400),
    (b"GET /public/x%0d%0aHost:%20evil HTTP/1.1\r\nHost: svc\r\n\r\n", 400),
    (b"GET /public%2F..%2Fprivate HTTP/1.1\r\nHost: svc\r\n\r\n", 400),
    (b"GET /public/..;/private HTTP/1.1\r\nHost: svc\r\n\r\n", 400),
    (b"GET /public\\..\\private HTTP/1.1\r\nHost: svc\r\n\r\n", 400),
    (b"GET * HTTP/1.1\r\nHost: svc\r\n\r\n", 400),
    (b"CONNECT svc:80 HTTP/1.1\r\nHost: svc\r\n\r\n", 400),
    (b"GET http://evil/public HTTP/1.1\r\nHost: svc\r\n\r\n", 400),
    (b"GET /public HTTP/1.1\r\nHost: svc\r\nHost: evil\r\n\r\n", 400),
    (b"GET /public HTTP/1.1\r\n\r\n", 400),
    (b"GET  /public HTTP/1.1\r\nHost: svc\r\n\r\n", 400),
    (b"GET /public HTTP/2.0\r\nHost: svc\r\n\r\n", 505),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: svc\r\n\r\n", 414),
    (b"GET /public HTTP/1.1\r\nHost: svc\r\n" + b"X-A: b\r\n" * 101 + b"\r\n", 431),
    (b"GET /public HTTP/1.1\r\nHost: svc\r\nX: " + b"a" * 70000 + b"\r\n\r\n", 431),
    (b"POST /upload HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"fffffffffffffffffff\r\nx\r\n0\r\n\r\n", 400),
    (b"POST /upload HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"-1\r\nx\r\n0\r\n\r\n", 400),
    (b"POST /upload HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"0x5\r\nhello\r\n0\r\n\r\n", 400),
    (b"POST /upload HTTP/1.0\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
])
def test_smuggling_and_malformed_requests_refused(env, raw: bytes, status: int) -> None:
    env.set_rules([HTTPRule(path="/public(/.*)?"), HTTPRule(path="/upload")])
    s = env.connect()
    out = exchange(s, raw + get("/private") + get("/public"), until_close=True)
    assert out.startswith(b"HTTP/1.1 %d" % status), out[:200]
    assert count_responses(out) == 1  # closed: nothing pipelined behind it is processed
    # nothing reached the upstream except (for chunk errors) a partial /upload
    for head, _ in env.upstream.seen:
        assert b"/private" not in head
    assert all(t == b"/upload" for t in env.upstream.targets())


def test_direct_connection_to_listener_refused() -> None:
    # Without an upstream override a connection whose original destination is
    # the listener itself (not redirected) must not loop back into the proxy.
    import asyncio

    from axoneme.core.l7proxy import ProxyPolicy
    from axoneme.core.mapstate import Direction

    loop = Loop()
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(8)
    p = Proxy(ls, direction=Direction.EGRESS, policy_for=lambda *a: ProxyPolicy(),
                  flow_sink=lambda f: None)
    try:
        loop.run(p.start())
        s = socket.create_connection(ls.getsockname(), timeout=5)
        assert exchange(s, get("/"), until_close=True) == b""
    finally:
        loop.run(p.stop())
        loop.close()
        del asyncio


class _RawUpstream:
    """An upstream that answers every request head with fixed bytes."""

    def __init__(self, reply: bytes, close_after: bool = False) -> None:
        import threading

        self.reply = reply
        self.close_after = close_after
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            buf = b""
            try:
                while b"\r\n\r\n" not in buf:
                    data = c.recv(4096)
                    if not data:
                        break
                    buf += data
                c.sendall(self.reply)
                if self.close_after:
                    c.close()
                else:
                    c.recv(1)
            except OSError:
                pass
            finally:
                c.close()


def _env_with_raw(reply: bytes, close_after: bool = False):
    from dataclasses import replace

    e = make_env()
    raw = _RawUpstream(reply, close_after)
    e.proxy.config = replace(e.proxy.config, upstream=("127.0.0.1", raw.port))
    return e, raw


@pytest.mark.parametrize("reply", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc",
    b"garbage\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX: a\rb\r\n\r\n",
])
def test_bad_upstream_response_gives_502(reply: bytes) -> None:
    e, raw = _env_with_raw(reply)
    try:
        s = e.connect()
        out = exchange(s, b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n", until_close=True)
        assert out.startswith(b"HTTP/1.1 502")
        assert any(f.verdict is FlowVerdict.ERROR for f in e.flows)
    finally:
        raw.sock.close()
        close_env(e)


def test_response_delimited_by_close_is_relayed() -> None:
    e, raw = _env_with_raw(b"HTTP/1.1 200 OK\r\n\r\nuntil the end", close_after=True)
    try:
        s = e.connect()
        out = exchange(s, b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n", until_close=True)
        assert out == b"HTTP/1.1 200 OK\r\n\r\nuntil the end"
    finally:
        raw.sock.close()
        close_env(e)


def test_upstream_timeout_gives_504() -> None:
    from dataclasses import replace

    e = make_env(config=ProxyConfig(header_timeout=2, idle_timeout=2, body_timeout=2,
                                    upstream_timeout=0.3))
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts (backlog) but never answers
    try:
        e.proxy.config = replace(e.proxy.config, upstream=silent.getsockname())
        s = e.connect()
        out = exchange(s, b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n", until_close=True)
        assert out.startswith(b"HTTP/1.1 504")
    finally:
        silent.close()
        close_env(e)


def test_h2c_upgrade_is_stripped(env) -> None:
    env.set_rules([HTTPRule(path="/public")])
    s = env.connect()
    out = exchange(s, b"GET /public HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade, HTTP2-Settings, "
                   b"keep-alive\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200")
    head = env.upstream.seen[0][0]
    assert b"h2c" not in head and b"HTTP2-Settings" not in head and b"Upgrade" not in head
    assert b"Connection: keep-alive" in head


def test_upgrade_tunnel_after_101() -> None:
    e, raw = _env_with_raw(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: Upgrade"
                           b"\r\n\r\nserver-bytes", close_after=True)
    try:
        s = e.connect()
        out = exchange(s, b"GET /ws HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\n"
                       b"Upgrade: websocket\r\n\r\n",
                       until_close=True)
        assert out.startswith(b"HTTP/1.1 101") and out.endswith(b"server-bytes")
    finally:
        raw.sock.close()
        close_env(e)


def test_large_chunked_upload_streamed(env) -> None:
    env.set_rules([HTTPRule(path="/upload")])
    s = env.connect()
    piece = b"y" * 100_000
    body = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(40)) + b"0\r\n\r\n"
    out = exchange(s, b"POST /upload HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n"
                   + body, timeout=30)
    assert out.endswith(b"ok /upload 4000000")


def test_large_response_streamed() -> None:
    size = 8 * 1024 * 1024
    e, raw = _env_with_raw(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"z" * size)
    try:
        s = e.connect()
        out = exchange(s, b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n", timeout=30)
        assert out.startswith(b"HTTP/1.1 200") and out.endswith(b"z" * 100)
        assert len(out) - out.index(b"\r\n\r\n") - 4 == size
    finally:
        raw.sock.close()
        close_env(e)


def test_body_forwarded_before_it_is_complete() -> None:
    """Streaming, not buffering: the upstream sees the first half of a body
    while the client has not sent the second half yet."""
    import threading
    from dataclasses import replace

    got = bytearray()
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(4)

    def serve() -> None:
        c, _ = lsock.accept()
        with c:
            while True:
                data = c.recv(65536)
                if not data:
                    return
                got.extend(data)

    threading.Thread(target=serve, daemon=True).start()
    e = make_env()
    try:
        e.proxy.config = replace(e.proxy.config, upstream=lsock.getsockname())
        s = e.connect()
        s.sendall(b"POST /upload HTTP/1.1\r\nHost: svc\r\nContent-Length: 2000\r\n\r\n" + b"1" * 1000)
        deadline = time.monotonic() + 5
        def body() -> bytes:
            return bytes(got).partition(b"\r\n\r\n")[2]

        while len(body()) < 1000 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert body() == b"1" * 1000 and got.startswith(b"POST /upload HTTP/1.1\r\n")
        s.sendall(b"2" * 1000)
        deadline = time.monotonic() + 5
        while len(body()) < 2000 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert body() == b"1" * 1000 + b"2" * 1000
    finally:
        lsock.close()
        close_env(e)


@pytest.mark.timeout(20)
def test_redos_path_is_denied_quickly_and_others_are_served(env) -> None:
    """Issue 13: a backtracking regex on a pod-chosen path stalled the shared
    event loop; with RE2 the hostile request is a plain 403 and a concurrent
    connection keeps being served."""
    env.set_rules([HTTPRule(path=r"/files/([a-z0-9]+/?)+\.txt"), HTTPRule(path="/public")])
    other = env.connect()
    assert exchange(other, get("/public")).startswith(b"HTTP/1.1 200")
    hostile = env.connect()
    hostile.sendall(get("/files/" + "a" * 4000 + "!"))
    # Served while (or after) the hostile request is matched.
    out = exchange(other, get("/public"))
    assert out.startswith(b"HTTP/1.1 200")
    out = exchange(hostile, b"")
    assert out.startswith(b"HTTP/1.1 403 Forbidden")
    assert exchange(hostile, get("/files/a/b.txt")).startswith(b"HTTP/1.1 200")
    assert env.upstream.targets() == [b"/public", b"/public", b"/files/a/b.txt"]


@pytest.mark.parametrize("target,forwarded", [
    (b"/public/x/../a", b"/public/a"),
    (b"/public/./%61", b"/public/a"),
    (b"/public/%252e%252e/private", b"/public/%252e%252e/private"),  # decoded once only
    (b"/public/a%2d%3a", b"/public/a-%3A"),
])
def test_normalised_path_is_matched_and_forwarded(env, target: bytes, forwarded: bytes) -> None:
    env.set_rules([HTTPRule(path="/public(/.*)?")])
    s = env.connect()
    assert exchange(s, b"GET " + target + b" HTTP/1.1\r\nHost: svc\r\n\r\n").startswith(b"HTTP/1.1 200")
    assert env.upstream.targets() == [forwarded]


@pytest.mark.parametrize("target", [b"/public/../private", b"/public/%2e%2e/private", b"/public/%2E./private"])
def test_dot_segments_cannot_leave_the_allowed_prefix(env, target: bytes) -> None:
    env.set_rules([HTTPRule(path="/public(/.*)?")])
    s = env.connect()
    out = exchange(s, b"GET " + target + b" HTTP/1.1\r\nHost: svc\r\n\r\n" + get("/public"), responses=2)
    assert out.startswith(b"HTTP/1.1 403") and count_responses(out) == 2  # denied, not refused
    assert env.upstream.targets() == [b"/public"]
    assert [f.l7["http"]["url"] for f in env.flows if f.verdict == FlowVerdict.DROPPED] == ["http://svc/private"]


def test_framing_fields_in_trailers_are_dropped(env) -> None:
    env.set_rules(RULES)
    s = env.connect()
    body = (b"5\r\nhello\r\n0\r\nX-Sum: 1\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n"
            b"Host: evil\r\nX-B: 2\r\n\r\n")
    out = exchange(s, b"POST /upload HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n" + body
                   + get("/public"), responses=2)
    assert out.startswith(b"HTTP/1.1 200") and count_responses(out) == 2
    assert env.upstream.seen[0][1] == b"hello"
    assert env.upstream.targets() == [b"/upload", b"/public"]
    assert env.upstream.trailers == [b"X-Sum: 1\r\nX-B: 2\r\n"]
