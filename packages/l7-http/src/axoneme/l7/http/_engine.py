"""The native HTTP engine's child process and control socket
(``NativeEngine``): spawning and supervising ``axoneme-l7-http``, the frames
both ways (listeners with their sockets, policy queries and answers, flow
batches, counters, sync), one engine per event loop. ``_native`` has the
proxy objects the agent sees; its docstring says how the parts fit."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import socket
import struct
import subprocess
from typing import Any, Protocol

from axoneme.core.flow import FlowEndpoint, FlowVerdict
from axoneme.core.l7proxy import ProxyConfig, ProxyPolicy
from axoneme.core.mapstate import Direction
from axoneme.l7.http._flows import http_flow_of
from axoneme.l7.http._proxy import as_policy
from axoneme.l7.http._rules import HTTPRule


class Listener(Protocol):
    """A listener the engine serves (``_native.NativeHttpProxy``)."""

    id: int
    sock: socket.socket
    mark: int
    spoof: bool
    policy_for: Any
    direction: Direction
    direction_name: str
    stats: dict[str, int]

    @property
    def config(self) -> ProxyConfig: ...

    @property
    def port(self) -> int: ...

    def emit(self, flow: Any) -> None: ...


LOG = logging.getLogger("axoneme.l7.http._native")

_VERDICTS = (FlowVerdict.FORWARDED, FlowVerdict.DROPPED, FlowVerdict.ERROR)
_HEAD = struct.Struct(">IB")
RESTART_DELAY = 0.2


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


class NativeEngine:
    """One ``axoneme-l7-http`` child and its control socket, on one event loop."""

    _by_loop: dict[int, NativeEngine] = {}

    def __init__(self, loop: asyncio.AbstractEventLoop, binary: str) -> None:
        self.loop = loop
        self.binary = binary
        self.proc: subprocess.Popen[bytes] | None = None
        self.sock: socket.socket | None = None
        self.listeners: dict[int, Listener] = {}
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

    def _flows(self, recs: list[list[Any]]) -> None:
        """An 'F' batch: records as arrays (flows.go), each the Flow the Python proxy emits."""
        by_pid, listeners = self._by_pid, self.listeners
        for rec in recs:
            lst = listeners.get(rec[0])
            if lst is None:
                continue
            pid = rec[1]
            pol = by_pid[pid] if 0 <= pid < len(by_pid) else None
            hd = rec[15] if len(rec) > 15 else ()
            headers = zip(hd[::2], hd[1::2], strict=True)
            # DO NOT CHANGE without flows.go: l, p, v, r, c, lat, t, m, h, u, ver, ci, cp, di, dp[, hd]
            lst.emit(http_flow_of(rec[7], rec[8], rec[9], rec[10], headers, pol,
                                  _VERDICTS[rec[2]], rec[11], rec[12], rec[13], rec[14],
                                  lst.direction_name, rec[3] == 1, rec[4], rec[5], rec[6]))

    # -- listeners -----------------------------------------------------------------
    @staticmethod
    def _listener_msg(lst: Listener) -> dict[str, Any]:
        c = lst.config
        return {"id": lst.id, "mark": lst.mark, "spoof": lst.spoof,
                "upstream": list(c.upstream) if c.upstream else None,
                "max_connections": c.max_connections,
                "timeouts": [c.header_timeout, c.idle_timeout, c.body_timeout,
                             c.upstream_connect_timeout, c.upstream_timeout]}

    def _add(self, lst: Listener) -> None:
        self._send("L", self._listener_msg(lst), [lst.sock.fileno()])

    def update(self, lst: Listener) -> None:
        """A listener's new ProxyConfig (its next connections use it)."""
        if lst.id in self.listeners:
            self._send("U", self._listener_msg(lst))

    def add(self, lst: Listener) -> int:
        self._next_id += 1
        lst.id = self._next_id
        self.listeners[lst.id] = lst
        if self.sock is None:
            self._stopping = False
            self._spawn()  # hands over every listener, this one included
        else:
            self._add(lst)
        return lst.id

    async def remove(self, lst: Listener) -> None:
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

    async def invalidate_sync(self) -> None:
        """``invalidate``, returning once the engine has dropped its answers
        (it reads its control frames in order: a sync after it is answered later)."""
        self.invalidate()
        await self.sync()

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


__all__ = ["NativeEngine", "rules_json", "RESTART_DELAY"]
