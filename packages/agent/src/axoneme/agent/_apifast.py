"""The API's hot routes on a lean HTTP/1.1 front, in front of the aiohttp app.

A policy change through the API is the path a user waits on end to end
(issue 17: applied at the API -> enforced in the kernel). Through aiohttp a
request costs ~0.25 ms on the agent's loop before the handler runs (the
protocol, the Request and its middleware chain, a task per request), more than
the policy change itself. So the socket's protocol is ``FrontProtocol``: it
reads the request head with llhttp (``httptools``) and

1. a request for a hot route (``HOT_ROUTES``: the policy changes) with a plain
   body (a Content-Length, no Transfer-Encoding, no ``Expect``, a JSON or no
   Content-Type, no query) is served here: the same handler function as the
   aiohttp route (``_api``), the same error mapping (``_api.error_reply``),
   the same JSON; the answer carries ``Connection: close`` (the agent's
   clients make one connection per request);
2. anything else (every other route, an unusual request, one llhttp refuses)
   is handed to aiohttp untouched: its protocol takes over the connection and
   is given every byte read so far, so every route keeps its contract.

A hot request is never cancelled when its client goes away (aiohttp's
default too): a change that began is finished and recorded. ``FrontSite``
waits for those in flight when the agent stops.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus
from typing import Any

import httptools
from aiohttp import web

LOG = logging.getLogger(__name__)

# A hot route's handler: given a coroutine function that reads the body as a
# JSON object (BadRequest otherwise; called at most once), the answer's
# (status, JSON value).
HotHandler = Callable[[Callable[[], Awaitable[dict[str, Any]]]], Awaitable[tuple[int, Any]]]
# (status, JSON body) for an exception the API maps, None for a bug (500)
ErrorReply = Callable[[BaseException, str, str], tuple[int, Any]]

_JSON_TYPES = frozenset({b"", b"application/json", b"application/json; charset=utf-8",
                         b"application/json;charset=utf-8"})


class _Request:
    __slots__ = ("url", "headers", "body", "complete")

    def __init__(self) -> None:
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.body: list[bytes] = []
        self.complete = False


class FrontProtocol(asyncio.Protocol):
    """One connection: a hot request served here, or the connection handed to aiohttp."""

    def __init__(self, fallback: Callable[[], asyncio.Protocol],
                 routes: Mapping[tuple[str, str], HotHandler], error_reply: ErrorReply,
                 max_body: int, inflight: set[asyncio.Task[None]]) -> None:
        self.fallback = fallback
        self.routes = routes
        self.error_reply = error_reply
        self.max_body = max_body
        self.inflight = inflight
        self.transport: asyncio.Transport | None = None
        self.raw = bytearray()  # every byte read until the request is judged
        self.req = _Request()
        self.parser = httptools.HttpRequestParser(self)
        self.hot: HotHandler | None = None
        self.judged = False  # the head was read: hot or handed over
        self.serving = False

    # -- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.serving:
            return  # after the request (pipelining is not spoken here: Connection: close)
        if not self.judged:
            self.raw += data
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            self.judged = True
            self.hot = None  # aiohttp says what is wrong with it
        if self.judged and self.hot is None:
            self._hand_over()
        elif self.req.complete and self.hot is not None:
            self._serve(self.hot)

    def eof_received(self) -> bool | None:
        # the client shut its side after sending: the answer still goes out
        return True if self.serving else None

    # -- httptools callbacks ----------------------------------------------------------------
    def on_url(self, url: bytes) -> None:
        self.req.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.lower()
        # a repeated header (two Content-Lengths...) is aiohttp's to judge
        self.req.headers[key] = value if key not in self.req.headers else b"\0repeated"

    def on_headers_complete(self) -> None:
        self.judged = True
        h = self.req.headers
        method = self.parser.get_method().decode("latin-1")
        handler = self.routes.get((method, self.req.url.decode("latin-1")))
        length = h.get(b"content-length", b"")
        if (handler is not None and length.isdigit() and int(length) <= self.max_body
                and b"transfer-encoding" not in h and b"expect" not in h
                and h.get(b"content-type", b"").lower() in _JSON_TYPES):
            self.hot = handler
            self.raw = bytearray()

    def on_body(self, body: bytes) -> None:
        if self.hot is not None:
            self.req.body.append(body)

    def on_message_complete(self) -> None:
        self.req.complete = True

    # -- the two ways on ----------------------------------------------------------------------
    def _hand_over(self) -> None:
        """aiohttp's protocol takes the connection, with what was read so far."""
        assert self.transport is not None
        proto = self.fallback()
        self.transport.set_protocol(proto)
        proto.connection_made(self.transport)
        if self.raw:
            proto.data_received(bytes(self.raw))
        self.raw = bytearray()

    def _serve(self, handler: HotHandler) -> None:
        self.serving = True
        assert self.transport is not None
        self.transport.pause_reading()
        task = asyncio.get_running_loop().create_task(self._run(handler))
        self.inflight.add(task)
        task.add_done_callback(self.inflight.discard)

    async def _run(self, handler: HotHandler) -> None:
        method = self.parser.get_method().decode("latin-1")
        path = self.req.url.decode("latin-1")
        body = b"".join(self.req.body)

        async def read() -> dict[str, Any]:
            if not body:
                return {}
            data = json.loads(body.decode("utf-8"))
            if not isinstance(data, dict):
                from axoneme.agent._errors import BadRequest

                raise BadRequest("request body must be a JSON object")
            return data

        try:
            status, value = await handler(read)
        except Exception as e:
            status, value = self.error_reply(e, method, path)
        try:
            payload = json.dumps(value, default=str).encode()
        except Exception as e:  # pragma: no cover - a bug, but the API keeps serving
            LOG.exception("%s %s: answer not JSON", method, path)
            status, payload = 500, json.dumps({"error": f"internal error: {e}"}).encode()
        self._respond(status, payload)

    def _respond(self, status: int, payload: bytes) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return  # the client went away; the change itself was done
        major, minor = self.parser.get_http_version().split(".") if self.parser else ("1", "1")
        head = (f"HTTP/{major}.{minor} {status} {HTTPStatus(status).phrase}\r\n"
                f"Content-Type: application/json; charset=utf-8\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode()
        t.write(head + payload)
        t.close()


class FrontSite(web.UnixSite):
    """``web.UnixSite`` whose connections start at ``FrontProtocol``."""

    def __init__(self, runner: web.BaseRunner, path: str,
                 routes: Mapping[tuple[str, str], HotHandler], error_reply: ErrorReply,
                 max_body: int) -> None:
        super().__init__(runner, path)
        self._routes = routes
        self._error_reply = error_reply
        self._max_body = max_body
        self._inflight: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(
            lambda: FrontProtocol(server, self._routes, self._error_reply, self._max_body,
                                  self._inflight),
            self._path, backlog=self._backlog)

    async def stop(self) -> None:
        await super().stop()
        if self._inflight:  # changes that began are finished (and answered)
            await asyncio.wait(list(self._inflight), timeout=60)
