"""ProxyManager: proxy ports, listeners and redirect rules for the agent.

The agent calls it synchronously (from a thread, e.g. ``asyncio.to_thread``);
the proxies themselves run on one event loop in a dedicated thread, so proxy
traffic never competes with the agent's API loop. ``policy_for`` and
``flow_sink`` are therefore called on that proxy thread.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from axoneme.core.errors import AxonemeError, PluginError
from axoneme.core.failpoints import failpoint
from axoneme.core.l7proxy import (
    FlowSink,
    L7ProxyServer,
    PolicyFor,
    ProxyConfig,
    make_listener,
    transparent_connector,
)
from axoneme.core.mapstate import Direction
from axoneme.core.marks import from_proxy_mark
from axoneme.core.plugins import l7_parser

from ._rules import RedirectRules

LOG = logging.getLogger(__name__)

PORT_RANGE = (15000, 15999)


class ProxyError(AxonemeError):
    """A proxy could not be started (no parser, no free port, bind failed)."""


class ProxyLoopCrash(SystemExit):
    """Ends the proxies' event loop thread (the ``proxy.loop`` failpoint).

    asyncio hands every other exception of a callback to the loop's exception
    handler; SystemExit (like a real fatal error) leaves ``run_forever`` and
    the thread dies."""


# How often the proxies' loop proves it is alive; a loop that has not beaten
# for STALL_AFTER seconds is reported as stalled.
HEARTBEAT = 0.25
STALL_AFTER = 2.0


@dataclass
class _Listener:
    """What it takes to start a port's proxy again after a crash."""

    server: L7ProxyServer
    info: ProxyInfo
    sock: socket.socket
    policy_for: PolicyFor
    protocols: tuple[str, ...]
    factory_kwargs: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ProxyInfo:
    """One running listener."""

    parser: str
    direction: Direction
    name: str
    port: int
    refs: int



def new_proxy_loop() -> asyncio.AbstractEventLoop:
    """The event loop every proxy (HTTP, Kafka, DNS) shares: uvloop (libuv,
    in C: transports, callbacks and timers ~2x cheaper than asyncio's
    selector loop) when installed, else asyncio's."""
    try:
        import uvloop
    except ImportError:  # the agent extra declares it; a bare install still works
        LOG.info("uvloop not installed: the proxies run on asyncio's event loop")
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()

class ProxyManager:
    """Allocates proxy ports, runs one listener per port, owns the TPROXY rules.

    ``policy_for`` is one callable for every proxy or a mapping parser ->
    callable (e.g. ``make_policy_for(parser, ...)`` per parser).
    ``factories`` maps parser names to proxy factories and overrides the
    ``axoneme.l7`` entry points (tests). ``redirect=False`` skips the kernel
    rules (no root needed); ``transparent=False`` uses plain sockets (the
    original destination is then the listener itself, so it only makes sense
    with ``ProxyConfig.upstream``).
    """

    def __init__(self, policy_for: PolicyFor | Mapping[str, PolicyFor], flow_sink: FlowSink, *,
                 port_range: tuple[int, int] = PORT_RANGE, listen_ip: str = "127.0.0.1",
                 redirect: bool = True, transparent: bool = True,
                 rules: RedirectRules | None = None, config: ProxyConfig | None = None,
                 factories: dict[str, Callable[..., L7ProxyServer]] | None = None) -> None:
        self.policy_for = policy_for
        self.flow_sink = flow_sink
        self.port_range = port_range
        self.listen_ip = listen_ip
        self.transparent = transparent
        self.config = config
        self.rules = rules if rules is not None else (RedirectRules(on_ip=listen_ip) if redirect else None)
        self._factories = dict(factories or {})
        self._lock = threading.RLock()
        self._by_key: dict[tuple[str, Direction, str], int] = {}
        self._servers: dict[int, tuple[L7ProxyServer, ProxyInfo]] = {}
        self._listeners: dict[int, _Listener] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._base_installed = False
        self._last_beat = 0.0
        self.restarts = 0
        self.last_fault = ""

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        """Start the proxy thread and install the base redirect rules (idempotent)."""
        with self._lock:
            if self._loop is None:
                self._start_loop()
            if self.rules is not None and not self._base_installed:
                self.rules.install_base()
                self._base_installed = True

    def _start_loop(self) -> None:
        loop = new_proxy_loop()
        t = threading.Thread(target=self._run_loop, args=(loop,), name="axoneme-proxy",
                             daemon=True)
        self._loop, self._thread = loop, t
        self._last_beat = time.monotonic()
        t.start()

    def _run_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(self._beat)
        try:
            loop.run_forever()
        except ProxyLoopCrash as e:
            # the thread ends here; health() sees it and revive() starts over
            self.last_fault = f"proxy event loop crashed: {e or 'ProxyLoopCrash'}"
            LOG.error("%s", self.last_fault)

    def _beat(self) -> None:
        self._last_beat = time.monotonic()
        failpoint("proxy.loop", ProxyLoopCrash("failpoint proxy.loop"))
        assert self._loop is not None
        self._loop.call_later(HEARTBEAT, self._beat)

    def health(self) -> str | None:
        """None when the proxies serve; else what is wrong with them."""
        with self._lock:
            if self._loop is None or not self._servers:
                return None
            if self._thread is None or not self._thread.is_alive():
                return self.last_fault or "proxy event loop is not running"
            stalled = time.monotonic() - self._last_beat
            if stalled > STALL_AFTER:
                return f"proxy event loop has not run for {stalled:.1f}s"
            for server, info in self._servers.values():
                # a proxy engine outside this process (the native HTTP one)
                fault = getattr(server, "engine_fault", lambda: None)()
                if fault:
                    return f"{info.parser} proxy on port {info.port}: {fault}"
            return None

    def engines(self) -> list[dict[str, Any]]:
        """Proxy engines outside this process, once each: engine, binary, pid,
        restarts, last_fault (the native HTTP engine's ``engine_view``)."""
        with self._lock:
            seen: dict[int, dict[str, Any]] = {}
            for server, _ in self._servers.values():
                view = getattr(server, "engine_view", None)
                if view is not None:
                    v = view()
                    seen.setdefault(v.get("pid", 0), v)
            return list(seen.values())

    def policy_changed(self) -> None:
        """Policies changed: proxies caching policy answers drop them (thread-safe)."""
        with self._lock:
            seen: set[int] = set()
            for server, info in self._servers.values():
                invalidate = getattr(server, "invalidate", None)
                # listeners sharing one engine (the native HTTP one): it is told once
                key = id(getattr(server, "engine", None) or server)
                if invalidate is None or key in seen:
                    continue
                seen.add(key)
                try:
                    invalidate()
                except Exception:  # a proxy's trouble must not fail a regeneration
                    LOG.warning("the %s proxy on port %d could not drop its cached policy",
                                info.parser, info.port, exc_info=True)

    def revive(self) -> bool:
        """If the proxies' loop died, start a new one and every listener again.

        The TPROXY rules stay: they name ports, which come back the same.
        While the loop was dead the old sockets still queued connections that
        nobody read (nothing reached an upstream, so nothing was allowed that
        policy denies); closing them resets those clients. Returns whether a
        restart happened."""
        with self._lock:
            if self._loop is None or (self._thread is not None and self._thread.is_alive()):
                return False
            old = self._loop
            self._loop = self._thread = None
            for lst in self._listeners.values():
                # an engine process of the dead loop still holds the listening
                # socket: it goes, the new loop starts its own
                kill = getattr(lst.server, "kill", None)
                if kill is not None:
                    kill()
            try:
                old.close()
            except RuntimeError:
                LOG.debug("closing the dead proxy loop", exc_info=True)
            self._start_loop()
            for port, lst in sorted(self._listeners.items()):
                lst.sock.close()
                info = lst.info
                try:
                    sock = make_listener(port, self.listen_ip, transparent=self.transparent)
                    server = self._factory(info.parser)(
                        sock, direction=info.direction, policy_for=lst.policy_for,
                        flow_sink=self.flow_sink,
                        connect_upstream=transparent_connector(
                            from_proxy_mark(info.direction), spoof_source=self.transparent),
                        config=self.config, **lst.factory_kwargs)
                    self._run(server.start())
                except Exception as e:
                    self.last_fault = f"cannot restart the {info.parser} proxy on port {port}: {e}"
                    LOG.error("%s", self.last_fault)
                    continue
                lst.server, lst.sock = server, sock
                self._servers[port] = (server, self._servers[port][1])
            self.restarts += 1
            LOG.warning("proxies restarted (%d so far) after: %s", self.restarts, self.last_fault)
            return True

    def stop(self) -> None:
        """Stop every listener and remove every rule, chain, ip rule and route."""
        with self._lock:
            for port in list(self._servers):
                self._stop_port(port)
            self._by_key.clear()
            if self._loop is not None:
                loop, t = self._loop, self._thread
                loop.call_soon_threadsafe(loop.stop)
                if t is not None:
                    t.join(5)
                loop.close()
                self._loop = self._thread = None
            self.cleanup()

    def cleanup(self) -> None:
        """Remove the kernel redirect state (safe to call anytime, e.g. at agent start)."""
        if self.rules is not None:
            self.rules.cleanup()
        self._base_installed = False

    def _run(self, coro: Any, timeout: float = 10) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # -- ports ------------------------------------------------------------------

    def acquire(self, parser: str, direction: Direction, name: str = "",
                port: int | None = None, protocols: tuple[str, ...] | None = None,
                **factory_kwargs: Any) -> int:
        """The port of the listener for (parser, direction, name), started on first use.

        Reference counted; ``port`` asks for a specific port (else the first
        free one in ``port_range``). ``protocols`` are the L4 protocols the
        TPROXY rules divert to the port (default: the parser's ``transport``).
        ``factory_kwargs`` go to the parser's proxy factory on first use
        (e.g. DNS ``cache=``, ``on_answer=``, ``connect_upstream_udp=``).
        """
        direction = Direction(direction)
        key = (parser, direction, name)
        with self._lock:
            if key in self._by_key:
                p = self._by_key[key]
                server, info = self._servers[p]
                self._servers[p] = (server, ProxyInfo(parser, direction, name, p, info.refs + 1))
                return p
            self.start()
            factory = self._factory(parser)
            if isinstance(self.policy_for, Mapping):
                if parser not in self.policy_for:
                    raise ProxyError(f"no policy_for given for the {parser!r} proxy")
                policy_for = self.policy_for[parser]
            else:
                policy_for = self.policy_for
            sock, p = self._bind(port)
            try:
                server = factory(sock, direction=direction, policy_for=policy_for,
                                 flow_sink=self.flow_sink,
                                 connect_upstream=transparent_connector(
                                     from_proxy_mark(direction), spoof_source=self.transparent),
                                 config=self.config, **factory_kwargs)
                self._run(server.start())
                if self.rules is not None:
                    self.rules.add_port(p, protocols or transport_of(parser))
            except Exception as e:
                sock.close()
                raise ProxyError(f"cannot start the {parser} proxy on port {p}: {e}") from e
            self._by_key[key] = p
            self._servers[p] = (server, ProxyInfo(parser, direction, name, p, 1))
            self._listeners[p] = _Listener(server, ProxyInfo(parser, direction, name, p, 1), sock,
                                           policy_for,
                                           protocols or transport_of(parser),
                                           dict(factory_kwargs))
            LOG.info("started %s %s proxy on port %d", parser, direction, p)
            return p

    def release(self, parser: str, direction: Direction, name: str = "") -> None:
        """Drop one reference; the listener and its rule go with the last one."""
        key = (parser, Direction(direction), name)
        with self._lock:
            p = self._by_key.get(key)
            if p is None:
                return
            server, info = self._servers[p]
            if info.refs > 1:
                self._servers[p] = (server, ProxyInfo(info.parser, info.direction, info.name, p,
                                                      info.refs - 1))
                return
            del self._by_key[key]
            self._stop_port(p)

    def port_for(self, parser: str, direction: Direction, name: str = "") -> int | None:
        return self._by_key.get((parser, Direction(direction), name))

    def server(self, port: int) -> L7ProxyServer | None:
        """The proxy object listening on ``port`` (e.g. to read a DNS proxy's cache)."""
        with self._lock:
            entry = self._servers.get(port)
            return entry[0] if entry else None

    def stats(self) -> dict[int, dict[str, Any]]:
        """Per port: parser, direction and the proxy's counters (if it keeps a
        ``stats`` mapping, e.g. requests/denied/errors/refused_connections)."""
        with self._lock:
            return {p: {"parser": info.parser, "direction": str(info.direction),
                        **dict(getattr(server, "stats", {}) or {})}
                    for p, (server, info) in self._servers.items()}

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The proxies' event loop (its own thread); None before start()."""
        return self._loop

    def proxies(self) -> list[ProxyInfo]:
        with self._lock:
            return [info for _, info in self._servers.values()]

    def _stop_port(self, port: int) -> None:
        server, info = self._servers.pop(port)
        lst = self._listeners.pop(port, None)
        if self.rules is not None:
            self.rules.remove_port(port)
        if self._thread is None or not self._thread.is_alive():
            if lst is not None:  # a dead loop runs no stop(): close the listener here
                lst.sock.close()
            return
        try:
            self._run(server.stop())
        except Exception:
            LOG.exception("stopping the %s proxy on port %d failed", info.parser, port)
        LOG.info("stopped %s %s proxy on port %d", info.parser, info.direction, port)

    def _factory(self, parser: str) -> Callable[..., L7ProxyServer]:
        if parser not in self._factories:
            factory = l7_parser(parser).proxy_factory()
            if factory is None:
                raise ProxyError(f"the {parser!r} L7 parser has no proxy")
            self._factories[parser] = factory
        return self._factories[parser]

    def _bind(self, port: int | None) -> tuple[socket.socket, int]:
        used = set(self._servers)
        candidates = [port] if port else [p for p in range(self.port_range[0],
                                                           self.port_range[1] + 1) if p not in used]
        last: OSError | None = None
        for p in candidates:
            if p in used:
                raise ProxyError(f"proxy port {p} is already used by another proxy")
            try:
                return make_listener(p, self.listen_ip, transparent=self.transparent), p
            except OSError as e:
                last = e
        raise ProxyError(f"no free proxy port in {self.port_range}: {last}")


def transport_of(parser: str) -> tuple[str, ...]:
    """The L4 protocols (lower case) the TPROXY rules divert to a parser's proxy port
    (tcp for a proxy factory given without an installed parser)."""
    try:
        return tuple(t.lower() for t in l7_parser(parser).transport)
    except PluginError:
        return ("tcp",)


__all__ = ["ProxyManager", "ProxyInfo", "ProxyError", "ProxyLoopCrash", "PORT_RANGE", "transport_of"]
