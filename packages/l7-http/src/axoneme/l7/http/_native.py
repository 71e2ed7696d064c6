"""The native HTTP engine (``axoneme-l7-http``, Go: packages/l7-http/native),
driven from the proxies' event loop, as Cilium drives Envoy.

The agent keeps the kernel side: the listening sockets (IP_TRANSPARENT) and
the redirect rules. ``NativeHttpProxy`` is an ``HttpProxy`` to the agent's
``ProxyManager`` (same constructor, ``start``/``stop``/``stats``): it hands its
listening socket to the engine (SCM_RIGHTS on a unix control socket) and
serves the engine's questions on the loop:

1. Policy: the engine asks once per (listener, client address, original
   destination, source identity of the accepted socket's mark) and caches
   the answer (the rules, compiled there) until ``invalidate()``: the agent
   calls it on every policy, endpoint or ipcache change, so a change applies
   to the next request, as with the Python proxy, which asks per request.
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
import contextlib
import inspect
import json
import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from axoneme.core.flow import FlowEndpoint, FlowVerdict
from axoneme.core.l7proxy import (
    ConnectUpstream,
    FlowSink,
    PolicyFor,
    ProxyConfig,
    ProxyPolicy,
    TransparentConnector,
    plain_connect,
)
from axoneme.core.mapstate import Direction
from axoneme.l7.http._flows import http_flow
from axoneme.l7.http._rules import HTTPRule

LOG = logging.getLogger(__name__)

BINARY = "axoneme-l7-http"
_VERDICTS = (FlowVerdict.FORWARDED, FlowVerdict.DROPPED, FlowVerdict.ERROR)
_HEAD = struct.Struct(">IB")
RESTART_DELAY = 0.2


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


def rules_json(rules: Any) -> list[dict[str, Any]]:
    """``rules.http[]`` as the engine compiles them (non-HTTP rules match nothing)."""
    out: list[dict[str, Any]] = []
    for r in rules:
        if not isinstance(r, HTTPRule):
            LOG.warning("ignoring non-HTTP rule %r", r)
            out.append({"never": True})
            continue
        out.append({"method": r.method or "", "path": r.path or "", "host": r.host or "",
                    "headers": list(r.headers),
                    "hm": [{"name": m.name, "value": m.value, "mismatch": (m.mismatch or "").upper()}
                           for m in r.header_matches]})
    return out


def as_policy(res: Any) -> ProxyPolicy | None:
    """What a ``policy_for`` answered, as a ProxyPolicy (the forms HttpProxy accepts)."""
    if res is None or isinstance(res, ProxyPolicy):
        return res
    rules, info = res
    if isinstance(info, tuple) and len(info) == 2:
        return ProxyPolicy(tuple(rules), info[0], info[1])
    return ProxyPolicy(tuple(rules))


class _Req:
    """The request fields a flow record needs (``http_flow`` reads these)."""

    __slots__ = ("method", "host", "path", "version", "headers")

    def __init__(self, rec: dict[str, Any]) -> None:
        self.method, self.host, self.path, self.version = rec["m"], rec["h"], rec["u"], rec["ver"]
        self.headers = [(n, v) for n, v in rec.get("hd", ())]


class NativeEngine:
    """One ``axoneme-l7-http`` child and its control socket, on one event loop."""

    _by_loop: dict[int, NativeEngine] = {}

    def __init__(self, loop: asyncio.AbstractEventLoop, binary: str) -> None:
        self.loop = loop
        self.binary = binary
        self.proc: subprocess.Popen[bytes] | None = None
        self.sock: socket.socket | None = None
        self.listeners: dict[int, NativeHttpProxy] = {}
        self.restarts = 0
        self.last_fault = ""
        self._next_id = 0
        self._gen = 0
        self._rbuf = bytearray()
        self._out: list[tuple[bytes, list[int]]] = []
        self._waiters: dict[tuple[str, int], asyncio.Future[Any]] = {}
        self._sync_n = 0
        self._pids: dict[tuple[FlowEndpoint, FlowEndpoint], int] = {}
        self._by_pid: list[ProxyPolicy] = []
        self._stopping = False

    @classmethod
    def for_loop(cls, loop: asyncio.AbstractEventLoop, binary: str) -> NativeEngine:
        eng = cls._by_loop.get(id(loop))
        if eng is None or eng.loop is not loop:
            eng = cls._by_loop[id(loop)] = cls(loop, binary)
        return eng

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    # -- the child ---------------------------------------------------------------
    def _spawn(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            extra = os.environ.get("AXONEME_L7_HTTP_ENGINE_ARGS", "").split()  # --verbose, --cpuprofile F
            self.proc = subprocess.Popen([self.binary, "--control-fd", str(child.fileno()), *extra],
                                         pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL)
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        parent.setblocking(False)
        self.sock = parent
        self._rbuf.clear()
        self._out.clear()
        self.loop.add_reader(parent.fileno(), self._readable)
        self._send("I", {"gen": self._gen})
        for lst in self.listeners.values():
            self._add(lst)
        LOG.info("native HTTP engine %s started (pid %d)", self.binary, self.proc.pid)

    def _died(self) -> None:
        if self.sock is None:
            return
        self.loop.remove_reader(self.sock.fileno())
        with contextlib.suppress(OSError):
            self.loop.remove_writer(self.sock.fileno())
        self.sock.close()
        self.sock = None
        code = None
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = self.proc.wait(0.5)  # it exits on its own at EOF
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_result(None)
        self._waiters.clear()
        if self._stopping or not self.listeners:
            return
        self.last_fault = f"native HTTP engine exited (status {code})"
        self.restarts += 1
        LOG.error("%s: restarting it, %d listener(s) handed over again", self.last_fault,
                  len(self.listeners))
        self.loop.call_later(RESTART_DELAY, self._restart)

    def _restart(self) -> None:
        if self.sock is None and self.listeners and not self._stopping:
            try:
                self._spawn()
            except OSError as e:
                self.last_fault = f"cannot restart the native HTTP engine: {e}"
                LOG.error("%s", self.last_fault)
                self.loop.call_later(1.0, self._restart)

    def alive(self) -> bool:
        return self.sock is not None and self.proc is not None and self.proc.poll() is None

    # -- frames out ----------------------------------------------------------------
    def _send(self, kind: str, payload: Any, fds: list[int] | None = None) -> None:
        body = json.dumps(payload, separators=(",", ":")).encode()
        self._out.append((_HEAD.pack(len(body) + 1, ord(kind)) + body, fds or []))
        self._flush()

    def _flush(self) -> None:
        sock = self.sock
        if sock is None:
            self._out.clear()
            return
        while self._out:
            data, fds = self._out[0]
            try:
                if fds:
                    n = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                               struct.pack(f"{len(fds)}i", *fds))])
                else:
                    n = sock.send(data)
            except BlockingIOError:
                n = 0
            except OSError:
                self._out.clear()
                return
            if n < len(data):
                self._out[0] = (data[n:], [])
                self.loop.add_writer(sock.fileno(), self._writable)
                return
            self._out.pop(0)

    def _writable(self) -> None:
        if self.sock is not None:
            self.loop.remove_writer(self.sock.fileno())
        self._flush()

    # -- frames in -----------------------------------------------------------------
    def _readable(self) -> None:
        sock = self.sock
        if sock is None:
            return
        try:
            data = sock.recv(1 << 18)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._died()
            return
        buf = self._rbuf
        buf += data
        pos = 0
        while len(buf) - pos >= 5:
            size, kind = _HEAD.unpack_from(buf, pos)
            if len(buf) - pos < 4 + size:
                break
            payload = bytes(buf[pos + 5:pos + 4 + size])
            pos += 4 + size
            try:
                self._dispatch(chr(kind), payload)
            except Exception:
                LOG.exception("native HTTP engine: bad %r message", chr(kind))
        del buf[:pos]

    def _dispatch(self, kind: str, payload: bytes) -> None:
        msg = json.loads(payload)
        if kind == "F":
            self._flows(msg)
        elif kind == "Q":
            self._query(msg)
        elif kind == "T":
            for lid, (req, den, err, ref) in msg.items():
                lst = self.listeners.get(int(lid))
                if lst is not None:
                    lst.stats.update(requests=req, denied=den, errors=err, refused_connections=ref)
        elif kind in ("r", "s"):
            fut = self._waiters.pop((kind, int(msg.get("id", msg.get("n", 0)))), None)
            if fut is not None and not fut.done():
                fut.set_result(msg)

    def _query(self, q: dict[str, Any]) -> None:
        lst = self.listeners.get(q["l"])
        if lst is None:
            self._answer(q, None, self._gen)
            return
        gen = self._gen
        kw = {"source_identity": q["ident"]} if q["ident"] else {}
        try:
            res = lst.policy_for(q["sip"], q["sport"], q["dip"], q["dport"], lst.direction, **kw)
        except Exception:
            LOG.exception("native proxy %d: policy_for failed for %s -> %s", lst.port, q["sip"], q["dip"])
            res = None
        if inspect.isawaitable(res):
            self.loop.create_task(self._await_answer(q, res, gen))
            return
        self._answer(q, res, gen)

    async def _await_answer(self, q: dict[str, Any], res: Any, gen: int) -> None:
        try:
            res = await res
        except Exception:
            LOG.exception("policy_for failed for %s -> %s", q["sip"], q["dip"])
            res = None
        self._answer(q, res, gen)

    def _answer(self, q: dict[str, Any], res: Any, gen: int) -> None:
        try:
            pol = as_policy(res)
        except (TypeError, ValueError):
            LOG.exception("unusable policy_for answer %r", res)
            pol = None
        if pol is None:
            self._send("P", {"q": q["q"], "gen": gen, "pid": -1, "deny": True, "rules": []})
            return
        key = (pol.source, pol.destination)
        pid = self._pids.get(key)
        if pid is None:
            if len(self._by_pid) >= 65536:  # bounded: old records then lose their endpoints
                self._pids.clear()
                self._by_pid.clear()
            pid = self._pids[key] = len(self._by_pid)
            self._by_pid.append(ProxyPolicy((), pol.source, pol.destination))
        self._send("P", {"q": q["q"], "gen": gen, "pid": pid, "deny": False,
                         "rules": rules_json(pol.rules)})

    def _flows(self, recs: list[dict[str, Any]]) -> None:
        by_pid = self._by_pid
        for rec in recs:
            lst = self.listeners.get(rec["l"])
            if lst is None:
                continue
            pid = rec["p"]
            pol = by_pid[pid] if 0 <= pid < len(by_pid) else None
            lst.emit(http_flow(_Req(rec), pol, _VERDICTS[rec["v"]], (rec["ci"], rec["cp"]),
                               (rec["di"], rec["dp"]), lst.direction_name, bool(rec["r"]),
                               rec["c"], rec["lat"], when=rec["t"]))

    # -- listeners -----------------------------------------------------------------
    @staticmethod
    def _listener_msg(lst: NativeHttpProxy) -> dict[str, Any]:
        c = lst.config
        return {"id": lst.id, "mark": lst.mark, "spoof": lst.spoof,
                "upstream": list(c.upstream) if c.upstream else None,
                "max_connections": c.max_connections,
                "timeouts": [c.header_timeout, c.idle_timeout, c.body_timeout,
                             c.upstream_connect_timeout, c.upstream_timeout]}

    def _add(self, lst: NativeHttpProxy) -> None:
        self._send("L", self._listener_msg(lst), [lst.sock.fileno()])

    def update(self, lst: NativeHttpProxy) -> None:
        """A listener's new ProxyConfig (its next connections use it)."""
        if lst.id in self.listeners:
            self._send("U", self._listener_msg(lst))

    def add(self, lst: NativeHttpProxy) -> int:
        self._next_id += 1
        lst.id = self._next_id
        self.listeners[lst.id] = lst
        if self.sock is None:
            self._stopping = False
            self._spawn()  # hands over every listener, this one included
        else:
            self._add(lst)
        return lst.id

    async def remove(self, lst: NativeHttpProxy) -> None:
        """The listener goes: its connections close, its last flows are delivered."""
        if lst.id not in self.listeners:
            return
        if self.alive():
            await self._roundtrip("R", "r", lst.id)
        self.listeners.pop(lst.id, None)
        if not self.listeners:
            await self.close()

    async def _roundtrip(self, kind: str, reply: str, n: int, timeout: float = 5) -> None:
        fut = self.loop.create_future()
        self._waiters[(reply, n)] = fut
        self._send(kind, {"id": n} if kind == "R" else {"n": n})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(fut, timeout)

    async def sync(self) -> None:
        """Every flow record and counter the engine has, delivered."""
        if self.alive():
            self._sync_n += 1
            await self._roundtrip("S", "s", self._sync_n)

    def invalidate(self) -> None:
        """The policy changed: the engine forgets every cached answer (on the loop)."""
        self._gen += 1
        if self.sock is not None:
            self._send("I", {"gen": self._gen})

    async def close(self) -> None:
        self._stopping = True
        proc = self.proc
        self._died()
        if proc is not None and proc.poll() is None:
            proc.terminate()
            for _ in range(50):
                if proc.poll() is not None:
                    break
                await asyncio.sleep(0.02)
            else:
                proc.kill()
                proc.wait(2)
        if NativeEngine._by_loop.get(id(self.loop)) is self:
            del NativeEngine._by_loop[id(self.loop)]


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
        self.binary = binary or engine_binary()
        if self.binary is None:
            raise FileNotFoundError(f"{BINARY} not found (scripts/l7-build builds it)")
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
        """The policy changed (thread-safe): cached answers are dropped."""
        eng = self.engine
        if eng is not None:
            eng.loop.call_soon_threadsafe(eng.invalidate)

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
    from axoneme.l7.http._proxy import HttpProxy

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
