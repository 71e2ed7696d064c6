"""Loopback harness: a recording upstream and an HttpProxy in a background loop."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from axoneme.core.flow import Flow
from axoneme.core.l7proxy import ProxyConfig, ProxyPolicy
from axoneme.core.mapstate import Direction
from axoneme.l7.http import HttpProxy


class Loop:
    """An asyncio loop in a daemon thread; ``run(coro)`` waits for the result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 10) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


async def _read_request(r: asyncio.StreamReader, trailers: list[bytes] | None = None
                        ) -> tuple[bytes, bytes] | None:
    """A lenient-but-correct upstream: head and body (CL or chunked, de-chunked);
    the trailer section of a chunked body goes to ``trailers``."""
    try:
        head = await r.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    lines = head[:-4].split(b"\r\n")
    cl = 0
    chunked = False
    for line in lines[1:]:
        n, _, v = line.partition(b":")
        if n.strip().lower() == b"content-length":
            cl = int(v.strip())
        if n.strip().lower() == b"transfer-encoding" and b"chunked" in v.lower():
            chunked = True
    body = b""
    if chunked:
        while True:
            size = int((await r.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
            if size == 0:
                section = b""
                while (line := await r.readuntil(b"\r\n")) != b"\r\n":
                    section += line
                if trailers is not None:
                    trailers.append(section)
                break
            body += await r.readexactly(size)
            await r.readexactly(2)
    elif cl:
        body = await r.readexactly(cl)
    return head, body


@dataclass
class Upstream:
    """Records every request head it receives; answers 200 with the target."""

    port: int = 0
    seen: list[tuple[bytes, bytes]] = field(default_factory=list)
    trailers: list[bytes] = field(default_factory=list)  # per chunked request
    server: Any = None

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while True:
                got = await _read_request(r, self.trailers)
                if got is None:
                    break
                head, body = got
                self.seen.append((head, body))
                target = head.split(b" ", 2)[1]
                method = head.split(b" ", 1)[0]
                payload = b"ok " + target + b" " + str(len(body)).encode()
                if method == b"HEAD":
                    w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(payload))
                elif target.startswith(b"/chunked"):
                    w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                            b"3\r\nok \r\n%x\r\n%s\r\n0\r\n\r\n" % (len(target), target))
                else:
                    w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload))
                await w.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            w.close()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    def targets(self) -> list[bytes]:
        return [h.split(b" ", 2)[1] for h, _ in self.seen]


ENGINES = ("python", "native")


def native_binary() -> str:
    """The native engine, built by scripts/l7-build when missing or stale; a
    missing Go toolchain (a machine capability) skips the native runs."""
    import os
    import subprocess
    from pathlib import Path

    from axoneme.l7.http._native import engine_binary

    root = Path(__file__).resolve().parents[3]
    subprocess.run([str(root / "scripts" / "l7-build")], check=True, timeout=600,
                   env={**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/local/go/bin"})
    binary = engine_binary()
    if binary is None:
        pytest.skip("no Go toolchain on this machine: axoneme-l7-http cannot be built")
    return binary


def proxy_factory(engine: str) -> Any:
    """The HTTP proxy class (constructor) of ``engine``."""
    if engine == "python":
        return HttpProxy
    from axoneme.l7.http._native import NativeHttpProxy

    binary = native_binary()
    return lambda sock, **kw: NativeHttpProxy(sock, binary=binary, **kw)


class Env:
    """A proxy of one engine, its upstream, its flows and its (mutable) policy."""

    def __init__(self, loop: Loop, upstream: Any, proxy: Any, port: int, flows: list[Flow],
                 policy: dict[str, Any], engine: str) -> None:
        self.loop, self.upstream, self.proxy, self.port = loop, upstream, proxy, port
        self._flows, self.policy, self.engine = flows, policy, engine

    def policy_changed(self) -> None:
        """What the agent does on a policy change: the native engine's cache goes
        (from this thread, as the agent's regenerator: it returns once it went)."""
        if hasattr(self.proxy, "invalidate"):
            self.proxy.invalidate()

    def set_rules(self, rules: Any) -> None:
        self.policy["rules"] = rules
        self.policy_changed()

    def set_none(self, none: bool = True) -> None:
        """policy_for answers None (no redirect known: every request refused)."""
        self.policy["none"] = none
        self.policy_changed()

    @property
    def flows(self) -> list[Flow]:
        """The flow records so far (the native engine's batches delivered first)."""
        if hasattr(self.proxy, "sync"):
            self.loop.run(self.proxy.sync())
        return self._flows

    def connect(self, timeout: float = 5) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        return s


def exchange(s: socket.socket, data: bytes, until_close: bool = False, responses: int = 1,
             timeout: float = 5) -> bytes:
    """Send ``data``, read until ``responses`` full responses arrived or the peer closed."""
    s.settimeout(timeout)
    s.sendall(data)
    buf = b""
    while True:
        if not until_close and count_responses(buf) >= responses:
            return buf
        try:
            chunk = s.recv(65536)
        except (TimeoutError, ConnectionResetError):
            return buf
        if not chunk:
            return buf
        buf += chunk


def count_responses(buf: bytes) -> int:
    """Number of complete responses (Content-Length or chunked framing) in ``buf``."""
    n = 0
    pos = 0
    while True:
        end = buf.find(b"\r\n\r\n", pos)
        if end < 0:
            return n
        head = buf[pos:end].lower()
        body_start = end + 4
        if b" 100 continue" in head.split(b"\r\n")[0]:
            pos = body_start
            continue
        if b"transfer-encoding: chunked" in head:
            term = buf.find(b"\r\n0\r\n\r\n", body_start - 2)
            if term < 0:
                return n
            pos = term + 7
        else:
            cl = 0
            for line in head.split(b"\r\n")[1:]:
                if line.startswith(b"content-length:"):
                    cl = int(line.split(b":")[1])
            if len(buf) < body_start + cl:
                return n
            pos = body_start + cl
        n += 1


def make_env(rules: Any = (), config: ProxyConfig | None = None, engine: str = "python",
             upstream: Any = None, upstream_addr: tuple[str, int] | None = None) -> Env:
    """A proxy of ``engine`` before ``upstream`` (default: a recording
    ``Upstream``; any object with ``async start()`` and ``port``, started on
    the env's loop) or before the fixed address ``upstream_addr``."""
    factory = proxy_factory(engine)
    loop = Loop()
    up = upstream if upstream is not None else Upstream()
    if upstream_addr is None:
        loop.run(up.start())
    flows: list[Flow] = []
    policy: dict[str, Any] = {"rules": rules, "none": False}

    def policy_for(sip: str, sport: int, dip: str, dport: int, d: Direction) -> ProxyPolicy | None:
        if policy["none"]:
            return None
        return ProxyPolicy(tuple(policy["rules"]))

    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(128)
    cfg = config or ProxyConfig(header_timeout=2, idle_timeout=2, body_timeout=2, upstream_timeout=2)
    from dataclasses import replace
    cfg = replace(cfg, upstream=upstream_addr or ("127.0.0.1", up.port))
    proxy = factory(lsock, direction=Direction.INGRESS, policy_for=policy_for,
                    flow_sink=flows.append, config=cfg)
    loop.run(proxy.start())
    return Env(loop, up, proxy, lsock.getsockname()[1], flows, policy, engine)


def close_env(env: Env) -> None:
    try:
        env.loop.run(env.proxy.stop())
        server = getattr(env.upstream, "server", None)
        if server is not None:
            server.close()
    finally:
        env.loop.close()


@pytest.fixture(params=ENGINES)
def engine(request) -> str:
    """Each test of the HTTP proxy runs on both engines (the Python proxy and axoneme-l7-http)."""
    return str(request.param)


@pytest.fixture
def env(engine: str) -> Iterator[Env]:
    e = make_env(engine=engine)
    try:
        yield e
    finally:
        close_env(e)


@pytest.fixture
def h(engine: str) -> Any:
    """The harness helpers bound to ``engine`` (test modules cannot import
    conftest in importlib mode)."""
    import functools
    import types

    return types.SimpleNamespace(make_env=functools.partial(make_env, engine=engine),
                                 close_env=close_env, exchange=exchange,
                                 count_responses=count_responses, Loop=Loop, Upstream=Upstream,
                                 engine=engine, factory=proxy_factory(engine))


@pytest.fixture(scope="module", params=ENGINES)
def menv(request) -> Iterator[Env]:
    """One proxy + upstream for a whole module (hypothesis tests), per engine."""
    e = make_env(engine=request.param)
    try:
        yield e
    finally:
        close_env(e)
