"""The native HTTP engine (``axoneme-l7-http``, Go: packages/l7-http/native),
driven from the proxies' event loop, as Cilium drives Envoy.

The agent keeps the kernel side: the listening sockets (IP_TRANSPARENT) and
the redirect rules. ``NativeHttpProxy`` is an ``HttpProxy`` to the agent's
``ProxyManager`` (same constructor, ``start``/``stop``/``stats``): it hands its
listening socket to the engine (SCM_RIGHTS on a unix control socket) and
serves the engine's questions on the loop:

1. Policy: the engine asks once per (listener, client address, original
   destination, source identity of the accepted socket's mark) and caches
   the answer (the rules, compiled there) until ``invalidate()``: the
   agent's regenerator calls it after every change it applies (policies,
   endpoints, the ipcache) and goes on once the engine confirmed, so a
   change applies to the next request, as with the Python proxy, which asks
   per request. If the loop serving these questions dies, the engine is
   killed at the next change (it would go on with stale answers).
2. Flows: the engine sends its L7 records in batches (every 20 ms, or on
   ``sync()``); each becomes the Flow the Python proxy would have emitted
   (``_flows.http_flow``), handed to ``flow_sink`` on this loop.
3. Stats: requests, denied, errors, refused_connections per listener.

One engine process per event loop (``NativeEngine.for_loop``); it is
restarted when it dies (its listeners handed over again; the policy cache
starts empty, so it resyncs by asking), and stopped with the last listener.
HTTP semantics are the Python proxy's, byte for byte
(tests/test_l7_http_engines.py runs both on the same bytes).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from axoneme.core.l7proxy import (
    ConnectUpstream,
    FlowSink,
    PolicyFor,
    ProxyConfig,
    TransparentConnector,
    plain_connect,
)
from axoneme.core.mapstate import Direction
from axoneme.l7.http._engine import NativeEngine, rules_json
from axoneme.l7.http._proxy import HttpProxy, as_policy

LOG = logging.getLogger(__name__)

BINARY = "axoneme-l7-http"
INVALIDATE_WAIT = 2.0  # seconds an engine has to confirm a policy change


def engine_binary() -> str | None:
    """The engine's path: $AXONEME_L7_HTTP_ENGINE, else beside the Python
    interpreter (the venv's bin, where scripts/l7-build puts it), else PATH."""
    env = os.environ.get("AXONEME_L7_HTTP_ENGINE")
    if env:
        return env if os.access(env, os.X_OK) else None
    here = os.path.join(os.path.dirname(sys.executable), BINARY)
    if os.access(here, os.X_OK):
        return here
    return shutil.which(BINARY)


class NativeHttpProxy:
    """An HTTP proxy on one listening socket, served by the native engine
    (the ``http`` proxy factory when the engine is ``native``; see the module doc)."""

    engine_name = "native"

    def __init__(self, sock: socket.socket, *, direction: Direction, policy_for: PolicyFor,
                 flow_sink: FlowSink, connect_upstream: ConnectUpstream | None = None,
                 config: ProxyConfig | None = None, binary: str | None = None) -> None:
        self.sock = sock
        self.direction = direction
        self.direction_name = str(direction)
        self.policy_for = policy_for
        self.flow_sink = flow_sink
        self._config = config or ProxyConfig()
        if isinstance(connect_upstream, TransparentConnector):
            self.mark, self.spoof = connect_upstream.mark, connect_upstream.spoof_source
        elif connect_upstream is None or connect_upstream is plain_connect:
            self.mark, self.spoof = 0, False
        else:
            raise ValueError("the native HTTP engine connects upstream itself: "
                             "connect_upstream must be a TransparentConnector or plain_connect")
        found = binary or engine_binary()
        if found is None:
            raise FileNotFoundError(f"{BINARY} not found (scripts/l7-build builds it)")
        self.binary: str = found
        self.id = 0
        self.engine: NativeEngine | None = None
        self.stats: dict[str, int] = {"refused_connections": 0, "requests": 0, "denied": 0,
                                      "errors": 0}
        host, port = sock.getsockname()[:2]
        self.address = (str(host), int(port))

    @property
    def port(self) -> int:
        return self.address[1]

    @property
    def config(self) -> ProxyConfig:
        return self._config

    @config.setter
    def config(self, cfg: ProxyConfig) -> None:
        """A new config for the next connections; from another thread, it
        returns once the engine has it."""
        self._config = cfg
        eng = self.engine
        if eng is None or not eng.alive():
            return
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is eng.loop:
            eng.update(self)
            return

        async def update() -> None:
            eng.update(self)
            await eng.sync()

        asyncio.run_coroutine_threadsafe(update(), eng.loop).result(10)

    async def start(self) -> None:
        self.engine = NativeEngine.for_loop(asyncio.get_running_loop(), self.binary)
        self.engine.add(self)

    async def stop(self) -> None:
        if self.engine is not None:
            await self.engine.remove(self)
            self.engine = None
        self.sock.close()

    def emit(self, flow: Any) -> None:
        try:
            self.flow_sink(flow)
        except Exception:
            LOG.exception("flow sink failed")

    def invalidate(self) -> None:
        """The policy changed (thread-safe): cached answers are dropped. From
        another thread it returns once the engine has dropped them (a request
        after it never meets an older answer); an engine that does not
        confirm within INVALIDATE_WAIT goes (fail closed: restarted empty)."""
        eng = self.engine
        if eng is None:
            return
        if eng.loop.is_closed() or not eng.loop.is_running():
            # the loop answering its questions died (ProxyManager.revive starts anew):
            # the engine would go on with answers now stale, so it goes (fail closed)
            self.kill()
            return
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is eng.loop:  # on the loop itself: nothing to wait with
            eng.invalidate()
            return
        try:
            fut = asyncio.run_coroutine_threadsafe(eng.invalidate_sync(), eng.loop)
            fut.result(INVALIDATE_WAIT)
        except RuntimeError:  # the loop closed meanwhile: the next call kills the engine
            return
        except (TimeoutError, concurrent.futures.TimeoutError):
            LOG.error("native HTTP engine did not confirm a policy change within %.0f s: "
                      "killed (restarted without cached answers)", INVALIDATE_WAIT)
            self.kill()

    async def sync(self) -> None:
        if self.engine is not None:
            await self.engine.sync()

    def engine_fault(self) -> str | None:
        """What is wrong with the engine serving this listener (None: it serves)."""
        eng = self.engine
        if eng is None or eng.alive():
            return None
        return (eng.last_fault or "native HTTP engine is not running") + " (being restarted)"

    def kill(self) -> None:
        """The engine process goes now (any thread): its loop is dead (ProxyManager.revive)."""
        eng = self.engine
        if eng is not None and eng.proc is not None and eng.proc.poll() is None:
            eng.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                eng.proc.wait(5)

    def engine_view(self) -> dict[str, Any]:
        eng = self.engine
        return {"engine": "native", "binary": self.binary, "pid": eng.pid if eng else 0,
                "restarts": eng.restarts if eng else 0, "last_fault": eng.last_fault if eng else ""}


def http_proxy_factory(engine: str = "auto") -> tuple[Callable[..., Any], str]:
    """(the ``http`` proxy factory, the engine it runs): ``native`` needs the
    binary (FileNotFoundError without it), ``python`` is ``HttpProxy``,
    ``auto`` is native when the binary is there, else python."""
    if engine not in ("auto", "native", "python"):
        raise ValueError(f"unknown HTTP proxy engine {engine!r} (native, python or auto)")
    binary = engine_binary() if engine != "python" else None
    if engine == "native" and binary is None:
        raise FileNotFoundError(f"l7_http_engine is native but {BINARY} is not installed "
                                f"(scripts/l7-build builds it)")
    if binary is None:
        return HttpProxy, "python"

    def factory(sock: socket.socket, **kw: Any) -> Any:
        return NativeHttpProxy(sock, binary=binary, **kw)

    return factory, "native"


__all__ = ["NativeHttpProxy", "NativeEngine", "engine_binary", "http_proxy_factory", "rules_json",
           "as_policy", "BINARY"]
