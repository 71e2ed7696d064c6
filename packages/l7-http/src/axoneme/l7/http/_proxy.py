"""The HTTP/1.1 transparent proxy: one asyncio server per listening socket.

Per client connection:

1. Read one request head (idle timeout before the first byte of a
   keep-alive follow-up, header timeout for the whole first head), parse it
   strictly (``_wire``); a malformed request gets 4xx/5xx and the connection
   is closed.
2. Ask ``policy_for`` (every request: a policy change applies to the next
   request), match the rules (``match_rules``, as ``HttpParser.match``, shared with
   ``policy trace``). Denied: 403 "Access denied", the request never reaches
   the upstream; the body is drained if small and framed, else the
   connection is closed.
3. Allowed: connect upstream once per client connection (to the original
   destination, through ``connect_upstream`` which binds the client's
   address and sets the from-proxy mark), forward the normalised head and
   stream the body (chunked bodies re-encoded chunk by chunk), then stream
   the response back; 1xx are relayed, 101 turns the connection into a
   tunnel.
4. Every request and response is reported to ``flow_sink`` as an L7 flow.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import socket
import time
from typing import Any

from axoneme.core.flow import Flow, FlowVerdict
from axoneme.core.l7 import L7Request
from axoneme.core.l7proxy import (
    ConnectUpstream,
    FlowSink,
    PolicyFor,
    ProxyConfig,
    ProxyPolicy,
    StreamProxyServer,
    plain_connect,
    take_source_identity,
)
from axoneme.core.mapstate import Direction
from axoneme.l7.http._flows import http_flow
from axoneme.l7.http._match import apply_actions, match_rules
from axoneme.l7.http._relay import BodyRelay, _Closed
from axoneme.l7.http._wire import (
    MAX_DRAIN,
    MAX_HEAD_BYTES,
    MAX_REQUEST_LINE,
    STATUS_TEXT,
    HttpError,
    RequestHead,
    denied_response,
    error_response,
    parse_request_head,
    parse_response_head,
    without_upgrade,
)

LOG = logging.getLogger(__name__)

STREAM_LIMIT = MAX_REQUEST_LINE + MAX_HEAD_BYTES + 4


def as_policy(res: Any) -> ProxyPolicy | None:
    """What a ``policy_for`` answered, as a ProxyPolicy: tolerates
    ``(rules, (source, destination))`` and ``(rules, info)`` (both engines)."""
    if res is None or isinstance(res, ProxyPolicy):
        return res
    rules, info = res
    if isinstance(info, tuple) and len(info) == 2:
        return ProxyPolicy(tuple(rules), info[0], info[1])
    return ProxyPolicy(tuple(rules))


class HttpProxy(StreamProxyServer):
    """An HTTP proxy on one listening socket (the ``http`` proxy factory)."""

    QUIET = (*StreamProxyServer.QUIET, _Closed)

    def __init__(self, sock: socket.socket, *, direction: Direction, policy_for: PolicyFor,
                 flow_sink: FlowSink, connect_upstream: ConnectUpstream | None = None,
                 config: ProxyConfig | None = None) -> None:
        self.config = config or ProxyConfig()
        super().__init__(sock, max_connections=self.config.max_connections, stream_limit=STREAM_LIMIT,
                         name="http proxy")
        self.direction = direction
        self.direction_name = str(direction)  # per flow record: computed once
        self.policy_for = policy_for
        self.flow_sink = flow_sink
        self.connect_upstream = connect_upstream or plain_connect
        self._watchdog: asyncio.TimerHandle | None = None
        c = self.config
        # Timeouts are enforced by one periodic check per proxy rather than a
        # timer per read: per-operation timers cost more than the parsing.
        self._tick = max(0.02, min(c.header_timeout, c.idle_timeout, c.body_timeout,
                                   c.upstream_timeout) / 4)
        self.stats.update({"requests": 0, "denied": 0, "errors": 0})

    async def start(self) -> None:
        await super().start()
        self._watch()

    def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        for conn in self.connections():
            conn.check(now)
        self._watchdog = loop.call_later(self._tick, self._watch)

    async def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        await super().stop()

    # -- one client connection -------------------------------------------------

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn(self, reader, writer)
        self.track(conn)
        try:
            await conn.run()
        finally:
            conn.close()

    def emit(self, flow: Flow) -> None:
        try:
            self.flow_sink(flow)
        except Exception:
            LOG.exception("flow sink failed")


class _Conn(BodyRelay):
    __slots__ = ("p", "r", "w", "client", "dst", "up_r", "up_w", "policy", "cfg", "loop",
                 "deadline", "side", "idle", "timed_out", "source_kw")

    def __init__(self, proxy: HttpProxy, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.p = proxy
        self.r = reader
        self.w = writer
        self.cfg = proxy.config
        peer = writer.get_extra_info("peername")
        local = writer.get_extra_info("sockname")
        self.client: tuple[str, int] = (peer[0], peer[1])
        self.dst: tuple[str, int] = self.cfg.upstream or (local[0], local[1])
        self.up_r: asyncio.StreamReader | None = None
        self.up_w: asyncio.StreamWriter | None = None
        self.policy: ProxyPolicy | None = None
        self.loop = asyncio.get_running_loop()
        self.deadline = 0.0  # 0: no deadline
        self.side = "client"  # whose bytes we wait for: client | upstream
        self.idle = False  # waiting for a keep-alive follow-up request
        self.timed_out = False
        sock = writer.get_extra_info("socket")
        # the source identity the datapath put in the connection's mark (eBPF):
        # policy_for and the upstream's mark get it, only when there is one
        source = take_source_identity(sock)
        self.source_kw: dict[str, int] = {"source_identity": source} if source else {}
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def arm(self, timeout: float, side: str = "client") -> None:
        """Set the deadline of the next wait (checked by the proxy's watchdog)."""
        self.deadline = self.loop.time() + timeout
        self.side = side

    def check(self, now: float) -> None:
        if self.idle and self.r._buffer:  # type: ignore[attr-defined]
            # the next request started: the whole head gets header_timeout
            self.idle = False
            self.deadline = min(self.deadline, now + self.cfg.header_timeout)
        if not self.deadline or now < self.deadline:
            return
        self.timed_out = True
        self.deadline = 0.0
        LOG.debug("proxy %d: %s timed out waiting for the %s", self.p.port, self.client, self.side)
        if self.side == "upstream" and self.up_w is not None:
            self.up_w.transport.abort()  # the client still gets a 504
        else:
            self.w.transport.abort()
            if self.up_w is not None:
                self.up_w.transport.abort()

    def close(self) -> None:
        for w in (self.w, self.up_w):
            if w is not None:
                with contextlib.suppress(Exception):
                    w.transport.abort() if w.transport.is_closing() else w.close()
        self.up_w = None

    async def run(self) -> None:
        if self.cfg.upstream is None and self.p.loops_back(self.dst):
            # Connected to the listener itself, not redirected: would loop.
            LOG.warning("proxy %d: direct connection from %s refused", self.p.port, self.client)
            return
        first = True
        while True:
            head = await self._read_head(first)
            if head is None:
                return
            first = False
            t0 = time.time()
            try:
                req = parse_request_head(head)
            except HttpError as e:
                self.p.stats["errors"] += 1
                LOG.info("proxy %d: refusing malformed request from %s: %s", self.p.port,
                         self.client, e)
                await self._send(error_response(e.status, STATUS_TEXT.get(e.status, "Error"),
                                                e.reason.encode() + b"\n", True))
                return
            keep = await self._handle(req, t0)
            if not keep:
                return

    async def _read_head(self, first: bool) -> bytes | None:
        """The next request head, or None at a clean end of the connection."""
        r = self.r
        self.arm(self.cfg.header_timeout if first else self.cfg.idle_timeout)
        self.idle = not first
        try:
            while True:
                block = await r.readuntil(b"\r\n\r\n")
                block = block.lstrip(b"\r\n")  # tolerated CRLFs between requests
                if block:
                    break
        except asyncio.LimitOverrunError:
            await self._send(error_response(431, STATUS_TEXT[431], b"request head too large\n", True))
            raise _Closed() from None
        except asyncio.IncompleteReadError as e:
            if e.partial.strip(b"\r\n") and not self.timed_out:
                await self._send(error_response(400, "Bad Request", b"truncated request\n", True))
            raise _Closed() from None
        finally:
            self.idle = False
        if len(block) < 4:  # lstrip ate into the terminator: it was only CRLFs + junk
            raise _Closed()
        return block[:-4]

    async def _send(self, data: bytes) -> None:
        self.w.write(data)
        self.arm(self.cfg.body_timeout)
        await self.w.drain()

    async def _policy(self) -> ProxyPolicy | None:
        try:
            res = self.p.policy_for(self.client[0], self.client[1], self.dst[0], self.dst[1],
                                    self.p.direction, **self.source_kw)
            if type(res) is ProxyPolicy:  # the agent's answer: skip the checks below
                return res
            if inspect.isawaitable(res):
                res = await res
        except Exception:
            # fail closed: no policy answer means no forwarding
            LOG.exception("proxy %d: policy_for failed for %s -> %s", self.p.port, self.client,
                          self.dst)
            return None
        return as_policy(res)

    def _flow(self, req: RequestHead, pol: ProxyPolicy | None, verdict: FlowVerdict,
              reply: bool, code: int = 0, latency_ns: int = 0) -> Flow:
        return http_flow(req, pol, verdict, self.client, self.dst, self.p.direction_name,
                         reply, code, latency_ns)

    async def _handle(self, req: RequestHead, t0: float) -> bool:
        """Serve one request; returns whether the connection stays open."""
        self.p.stats["requests"] += 1
        pol = await self._policy()
        allowed = False
        verdict = None
        if pol is not None:
            verdict = match_rules(pol.rules, L7Request({
                "method": req.method, "path": req.path, "host": req.host,
                "headers": req.headers}))
            allowed = verdict.allowed
        if not allowed:
            self.p.stats["denied"] += 1
            self.p.emit(self._flow(req, pol, FlowVerdict.DROPPED, False, 403))
            LOG.debug("proxy %d: denied %s %s from %s (%s)", self.p.port, req.method, req.path,
                      self.client, verdict.reason if verdict else "no policy")
            keep = req.keep_alive and pol is not None and not req.upgrade and not req.expect_continue
            if keep and req.has_body:
                keep = await self._drain_body(req)
            await self._send(denied_response(not keep))
            return keep
        self.p.emit(self._flow(req, pol, FlowVerdict.FORWARDED, False))
        headers: list[tuple[str, str]] | None = None  # None: forward the head unchanged
        if verdict is not None and verdict.actions:
            headers = apply_actions(req.headers, verdict.actions)
        if req.strip_upgrade:
            headers = without_upgrade(headers or req.headers)
        if req.expect_continue:
            # We answer 100 ourselves (the request is allowed) and do not
            # forward the expectation: no interim-response interleaving.
            headers = [(n, v) for n, v in (headers or req.headers) if n.lower() != "expect"]
        if not await self._ensure_upstream():
            await self._send(error_response(503, STATUS_TEXT[503], b"upstream connect failed\n",
                                            True))
            return False
        assert self.up_w is not None and self.up_r is not None
        head = req.serialize(headers)
        if req.expect_continue and req.has_body:
            await self._send(b"HTTP/1.1 100 Continue\r\n\r\n")
        if req.chunked:
            self.up_w.write(head)
            await self._relay_chunked(self.r, self.up_w, self.cfg.body_timeout, 400)
        elif req.content_length:
            await self._relay_exact(self.r, self.up_w, req.content_length, self.cfg.body_timeout,
                                    head)
        else:
            self.up_w.write(head)
            self.arm(self.cfg.body_timeout, "upstream")
            await self.up_w.drain()
        return await self._relay_response(req, pol, t0)

    async def _drain_body(self, req: RequestHead) -> bool:
        if req.chunked or req.content_length is None or req.content_length > MAX_DRAIN:
            return False
        self.arm(self.cfg.body_timeout)
        try:
            await self.r.readexactly(req.content_length)
        except asyncio.IncompleteReadError:
            raise _Closed() from None
        return True

    async def _ensure_upstream(self) -> bool:
        if self.up_w is not None and not self.up_w.transport.is_closing() and \
                not self.up_r.at_eof():  # type: ignore[union-attr]
            return True
        if self.up_w is not None:
            self.up_w.transport.abort()
            self.up_w = None
        try:
            async with asyncio.timeout(self.cfg.upstream_connect_timeout):
                ident = self.source_kw.get("source_identity")
                sock = await (self.p.connect_upstream(self.client, self.dst, identity=ident)
                              if ident else self.p.connect_upstream(self.client, self.dst))
            self.up_r, self.up_w = await asyncio.open_connection(sock=sock, limit=STREAM_LIMIT)
        except (OSError, TimeoutError) as e:
            LOG.info("proxy %d: upstream %s unreachable: %s", self.p.port, self.dst, e)
            return False
        return True

    async def _relay_response(self, req: RequestHead, pol: ProxyPolicy | None, t0: float) -> bool:
        up_r, up_w = self.up_r, self.up_w
        assert up_r is not None and up_w is not None
        while True:
            try:
                self.arm(self.cfg.upstream_timeout, "upstream")
                raw = await up_r.readuntil(b"\r\n\r\n")
                resp = parse_response_head(raw)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    ConnectionError, HttpError) as e:
                status = 504 if self.timed_out else 502
                self.arm(self.cfg.body_timeout)
                LOG.info("proxy %d: bad/no response from %s: %r", self.p.port, self.dst, e)
                self.p.emit(self._flow(req, pol, FlowVerdict.ERROR, True, status,
                                       int((time.time() - t0) * 1e9)))
                await self._send(error_response(status, STATUS_TEXT[status],
                                                b"upstream response failed\n", True))
                return False
            if 100 <= resp.status < 200 and resp.status != 101:
                self.w.write(raw)  # interim response: relay and read the final one
                continue
            break
        latency = int((time.time() - t0) * 1e9)
        self.p.emit(self._flow(req, pol, FlowVerdict.FORWARDED, True, resp.status, latency))
        if resp.status == 101:
            self.w.write(resp.raw)
            await self._tunnel()
            return False
        no_body = req.method == "HEAD" or resp.status in (204, 304)
        if no_body or resp.content_length == 0:
            self.w.write(resp.raw)
            self.arm(self.cfg.body_timeout)
            await self.w.drain()
        elif resp.chunked:
            self.w.write(resp.raw)
            await self._relay_chunked(up_r, self.w, self.cfg.upstream_timeout, 502)
        elif resp.content_length is not None and \
                len(up_r._buffer) >= resp.content_length:  # type: ignore[attr-defined]
            # The whole (small) body already arrived with the head: one write.
            self.w.write(resp.raw + await up_r.readexactly(resp.content_length))
            self.arm(self.cfg.body_timeout)
            await self.w.drain()
        elif resp.content_length is not None:
            await self._relay_exact(up_r, self.w, resp.content_length, self.cfg.upstream_timeout,
                                    resp.raw, side="upstream")
        else:
            self.w.write(resp.raw)
            # Delimited by the end of the upstream connection.
            await self._relay_to_eof(up_r, self.w)
            return False
        if resp.close:
            up_w.close()
            self.up_w = None
        return req.keep_alive and not resp.close


__all__ = ["HttpProxy", "plain_connect", "as_policy"]
