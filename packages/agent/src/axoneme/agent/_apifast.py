"""The API's hot routes on a lean HTTP/1.1 front, in front of the aiohttp app.

A policy change through the API is the path a user waits on end to end
(issue 17: applied at the API -> enforced in the kernel). Through aiohttp a
request cost ~0.25 ms on the agent's loop before the handler ran (asyncio's
accept task and transport, aiohttp's protocol, Request, middleware chain and
task per request), more than the policy change itself. So the socket is the
front's (``Front``): each accepted connection (``FrontConn``) is read with
``loop.add_reader``, its request head parsed by llhttp (``httptools``), and

1. a request for a hot route (``HOT_ROUTES``: the policy changes) with a plain
   body (a Content-Length, no Transfer-Encoding, no ``Expect``, a JSON or no
   Content-Type, no query) is served here: the same handler function as the
   aiohttp route (``_api``), the same error mapping (``_api.error_reply``),
   the same JSON. The connection is kept for the client's next request when
   HTTP/1.1 says so (no ``Connection: close``; HTTP/1.0 with ``keep-alive``):
   a client that keeps its connection (``AgentClient(keep_alive=True)``, a
   controller) spares each change the connect, the accept and a new
   ``FrontConn`` (issue 17, B5CUT). A kept connection idle for
   ``KEEP_ALIVE_S`` is closed, as aiohttp's keep-alive timeout does. A
   request pipelined behind a hot one (sent before its answer) is not served:
   the answer says ``Connection: close``;
2. anything else (every other route, an unusual request, one llhttp refuses)
   is handed to aiohttp untouched: its protocol takes the connection
   (``connect_accepted_socket``) and is given every byte read so far first
   (of this request: a kept connection's earlier requests were the front's),
   so every route keeps its contract.

A hot request is never cancelled when its client goes away (aiohttp's
default too): a change that began is finished and recorded. ``FrontSite``
waits for those in flight when the agent stops.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import json
import logging
import socket
import types
from collections.abc import Awaitable, Callable, Generator, Mapping
from http import HTTPStatus
from typing import Any

import httptools
from aiohttp import web
from axoneme.core.yamlsafe import json_text_safe

LOG = logging.getLogger(__name__)

# A hot route's handler: given a coroutine function that reads the body as a
# JSON object (BadRequest otherwise; called at most once), the answer's
# (status, JSON value).
HotHandler = Callable[[Callable[[], Awaitable[dict[str, Any]]]], Awaitable[tuple[int, Any]]]
# (status, JSON body) of a request that raised: (exception, method, path)
ErrorReply = Callable[[BaseException, str, str], tuple[int, Any]]

# a kept connection with no request for this long is closed (aiohttp: 75 s)
KEEP_ALIVE_S = 60.0
# one read's buffer, shared by the connections (the loop reads one at a time):
# a fresh 256 KiB ``recv`` buffer per read is over the C heap's mmap threshold
# (an mmap, mremap and munmap per request: ~0.1 ms on a cold agent, B5CUT)
READ_SIZE = 262144

_JSON_TYPES = frozenset({b"", b"application/json", b"application/json; charset=utf-8",
                         b"application/json;charset=utf-8"})


# status -> reason phrase (HTTPStatus(status) runs the enum's Python lookup per answer)
_PHRASES = {s.value: s.phrase for s in HTTPStatus}
# an answer's Connection header: closing, or kept (HTTP/1.1 keeps by default)
_CLOSE = "Connection: close\r\n"
_KEEP = {"1.0": "Connection: keep-alive\r\n"}


class CheckedJSON(dict):  # type: ignore[type-arg]
    """A request body decoded from JSON text that ``yamlsafe.json_text_safe``
    passed: nothing in it can fail the policy parser's JSON round-trip check
    (``parse_policy(json_checked=True)`` skips that walk; issue 17, B5CUT)."""

    __slots__ = ()


class _Request:
    __slots__ = ("url", "headers", "body", "complete", "keep")

    def __init__(self) -> None:
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.body: list[bytes] = []
        self.complete = False
        self.keep = False  # the client keeps the connection (llhttp's verdict when whole)


class _Replay(asyncio.Protocol):
    """Hands an accepted connection to ``real`` (aiohttp's protocol) with the
    bytes the front already read, before anything newer."""

    def __init__(self, real: asyncio.Protocol, data: bytes) -> None:
        self.real = real
        self.data = data

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.set_protocol(self.real)
        self.real.connection_made(transport)
        if self.data:
            self.real.data_received(self.data)


class FrontConn:
    """One accepted connection: a hot request served here, or the connection
    handed to aiohttp. The socket is read with ``loop.add_reader`` and
    written with ``sock_sendall``: no asyncio transport (its accept task,
    transport and protocol setup cost ~50 us per connection, the front's
    whole budget)."""

    def __init__(self, front: Front, sock: socket.socket) -> None:
        self.front = front
        self.sock = sock
        self.raw = bytearray()  # every byte read until the request is judged
        self.req = _Request()
        # the parser holds this connection (its callbacks): a cycle, broken
        # when the connection is done (_drop_parser)
        self.parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self.hot: HotHandler | None = None
        self.judged = False  # the head was read: hot or handed over
        self.reading = False
        # a request began after the one being served was whole (pipelined):
        # not served, the connection closes after the answer
        self.pipelined = False
        self.serving = False  # a hot request is being served (eagerly or in a task)
        self.idle: asyncio.TimerHandle | None = None  # a kept connection's timeout

    def start(self) -> None:
        self.front.conns.add(self)
        self.readable()  # the request is often there already
        if self._ours() and not self.reading and not self.serving:
            self.reading = True
            self.front.loop.add_reader(self.sock.fileno(), self.readable)

    def _ours(self) -> bool:
        """Neither closed nor handed (or being handed) to aiohttp."""
        return self.parser is not None and not (self.judged and self.hot is None)

    def readable(self) -> None:
        if self.serving:
            # bytes (a pipelined request) or EOF while a change is served: read
            # once it is answered, not again and again meanwhile
            self._stop_reading()
            return
        buf = self.front.rbuf
        try:
            n = self.sock.recv_into(buf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            n = 0
        if not n:  # the client went away before its request was whole (or when idle)
            self.close()
            return
        if self.idle is not None:
            self.idle.cancel()
            self.idle = None
        data = buf[:n]
        if not self.judged:
            self.raw += data
        try:
            assert self.parser is not None  # not read once done
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            if self.req.complete and self.hot is not None:
                self.pipelined = True  # garbage behind a whole request: served, then closed
            else:
                self.judged = True
                self.hot = None  # aiohttp says what is wrong with it
        if self.judged and self.hot is None:
            self._stop_reading()
            self._spawn(self._hand_over())
        elif self.req.complete and self.hot is not None:
            self.serving = True
            self._run(self._serve(self.hot))

    def _stop_reading(self) -> None:
        if self.reading:
            self.front.loop.remove_reader(self.sock.fileno())
            self.reading = False

    def _spawn(self, coro: Any) -> None:
        task = self.front.loop.create_task(coro)
        self.front.inflight.add(task)
        task.add_done_callback(self.front.inflight.discard)

    def _run(self, coro: Any) -> None:
        """Run ``coro`` here, now, to its end or until it must wait (eagerly, as
        3.12's eager tasks): a small policy change never waits (the journal's
        fdatasync on a fast disk, a one-entry map write, the answer's send all
        run on the loop), so it needs no task and no trip round the loop (issue
        17, B5CUT). One that waits is continued by a task, in the same context
        (``contextvars``: the handler's first step ran in it)."""
        ctx = contextvars.copy_context()
        try:
            pending = ctx.run(coro.send, None)
        except StopIteration:
            return
        task = self.front.loop.create_task(_resume(coro, pending), context=ctx)
        self.front.inflight.add(task)
        task.add_done_callback(self.front.inflight.discard)

    def close(self) -> None:
        self._stop_reading()
        if self.idle is not None:
            self.idle.cancel()
            self.idle = None
        self.front.conns.discard(self)
        self.sock.close()
        self._drop_parser()

    def _drop_parser(self) -> None:
        """Break the cycle with the parser: reference counting then frees the
        connection and its request body when its task ends. The cyclic GC
        may never see them: a policy change of 200k+ objects freezes what is
        alive when it ends (_gcpause), this connection included, so each
        such change kept its connection and body (2 MB at 100k peers) for
        good (issue 17, B5HIST)."""
        self.parser = None

    # -- httptools callbacks ----------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.req.complete:
            self.pipelined = True  # its callbacks leave the request being served alone

    def on_url(self, url: bytes) -> None:
        if not self.pipelined:
            self.req.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.pipelined:
            return
        key = name.lower()
        # a repeated header (two Content-Lengths...) is aiohttp's to judge
        self.req.headers[key] = value if key not in self.req.headers else b"\0repeated"

    def on_headers_complete(self) -> None:
        if self.pipelined:
            return
        self.judged = True
        h = self.req.headers
        assert self.parser is not None  # its own callback
        method = self.parser.get_method().decode("latin-1")
        handler = self.front.routes.get((method, self.req.url.decode("latin-1")))
        length = h.get(b"content-length", b"")
        if (handler is not None and length.isdigit() and int(length) <= self.front.max_body
                and b"transfer-encoding" not in h and b"expect" not in h
                and h.get(b"content-type", b"").lower() in _JSON_TYPES):
            self.hot = handler
            self.raw = bytearray()

    def on_body(self, body: bytes) -> None:
        if self.hot is not None and not self.pipelined:
            self.req.body.append(body)

    def on_message_complete(self) -> None:
        if not self.pipelined:
            self.req.complete = True
            assert self.parser is not None  # its own callback
            self.req.keep = self.parser.should_keep_alive()

    # -- the two ways on ----------------------------------------------------------------------
    async def _hand_over(self) -> None:
        """aiohttp's protocol takes the connection, with what was read so far."""
        self.front.conns.discard(self)
        self._drop_parser()  # aiohttp parses from here on
        data, self.raw = bytes(self.raw), bytearray()
        try:
            await self.front.loop.connect_accepted_socket(
                lambda: _Replay(self.front.fallback(), data), self.sock)
        except OSError:
            self.sock.close()

    async def _serve(self, handler: HotHandler) -> None:
        parser = self.parser
        assert parser is not None  # dropped when it closes, at the end of this
        method = parser.get_method().decode("latin-1")
        path = self.req.url.decode("latin-1")
        body = b"".join(self.req.body)
        kept = False

        async def read() -> dict[str, Any]:
            if not body:
                return {}
            data = json.loads(body.decode("utf-8"))
            if not isinstance(data, dict):
                from axoneme.agent._errors import BadRequest

                raise BadRequest("request body must be a JSON object")
            return CheckedJSON(data) if json_text_safe(body) else data

        try:
            try:
                status, value = await handler(read)
            except Exception as e:
                status, value = self.front.error_reply(e, method, path)
            try:
                payload = json.dumps(value, default=str).encode()
            except Exception as e:  # pragma: no cover - a bug, but the API keeps serving
                LOG.exception("%s %s: answer not JSON", method, path)
                status, payload = 500, json.dumps({"error": f"internal error: {e}"}).encode()
            version = parser.get_http_version()
            keep = self.req.keep and not self.pipelined
            head = (f"HTTP/{version} {status} {_PHRASES.get(status, '')}\r\n"
                    f"Content-Type: application/json; charset=utf-8\r\n"
                    f"Content-Length: {len(payload)}\r\n"
                    f"{_KEEP.get(version, '') if keep else _CLOSE}\r\n").encode()
            await self.front.loop.sock_sendall(self.sock, head + payload)
            # the agent stopping (Front.close) does not wait for the next request
            kept = keep and not self.pipelined and self.front.listener is not None
        except OSError:
            pass  # the client went away; the change itself was done
        finally:
            self.serving = False
            if kept:
                self._next()
            else:
                self.close()  # also when cancelled (the agent stopping)

    def _next(self) -> None:
        """A kept connection waits for its next request (the parser, past the
        last one, reads it)."""
        self.req = _Request()
        self.hot = None
        self.judged = False
        self.raw = bytearray()
        self.idle = self.front.loop.call_later(KEEP_ALIVE_S, self.close)
        if not self.reading:
            self.reading = True
            self.front.loop.add_reader(self.sock.fileno(), self.readable)


@types.coroutine
def _resume(coro: Any, pending: Any) -> Generator[Any, None, Any]:
    """The rest of ``coro``, already started and waiting on ``pending`` (what
    its last step yielded), for a task to drive: the task waits for
    ``pending``, then each step goes on in ``coro`` (a cancellation is thrown
    into it)."""
    while True:
        try:
            yield pending
        except BaseException as e:  # noqa: BLE001 - the task's cancellation, for coro
            step = functools.partial(coro.throw, e)
        else:
            step = functools.partial(coro.send, None)
        try:
            pending = step()
        except StopIteration as stop:
            return stop.value


class Front:
    """The listening socket and what its connections share."""

    def __init__(self, fallback: Callable[[], asyncio.Protocol],
                 routes: Mapping[tuple[str, str], HotHandler], error_reply: ErrorReply,
                 max_body: int) -> None:
        self.fallback = fallback
        self.routes = routes
        self.error_reply = error_reply
        self.max_body = max_body
        self.loop = asyncio.get_running_loop()
        self.inflight: set[asyncio.Task[None]] = set()
        self.conns: set[FrontConn] = set()
        self.listener: socket.socket | None = None
        self.rbuf = memoryview(bytearray(READ_SIZE))

    def listen(self, path: str, backlog: int) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            sock.listen(backlog)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.listener = sock
        self.loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        assert self.listener is not None
        for _ in range(64):  # then the loop's other work gets a turn
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE...: the next readiness tries again
                LOG.warning("API socket: accept failed: %s", e)
                return
            conn.setblocking(False)
            FrontConn(self, conn).start()

    async def close(self) -> None:
        """No new connections; requests not yet whole are dropped; the changes
        that began are finished (and answered)."""
        if self.listener is not None:
            self.loop.remove_reader(self.listener.fileno())
            self.listener.close()
            self.listener = None
        for conn in list(self.conns):
            if not conn.judged or conn.hot is not None and not conn.req.complete:
                conn.close()
        if self.inflight:
            await asyncio.wait(list(self.inflight), timeout=60)


class FrontSite(web.UnixSite):
    """``web.UnixSite`` whose connections start at the front (``Front``)."""

    def __init__(self, runner: web.BaseRunner, path: str,
                 routes: Mapping[tuple[str, str], HotHandler], error_reply: ErrorReply,
                 max_body: int) -> None:
        super().__init__(runner, path)
        self._routes = routes
        self._error_reply = error_reply
        self._max_body = max_body
        self._front: Front | None = None

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        self._front = Front(server, self._routes, self._error_reply, self._max_body)
        self._front.listen(str(self._path), self._backlog)

    async def stop(self) -> None:
        await super().stop()
        if self._front is not None:
            await self._front.close()
            self._front = None
