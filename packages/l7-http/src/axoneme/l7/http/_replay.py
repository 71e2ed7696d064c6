"""One client connection through the real proxy code, in memory.

``replay_connection(data, rules)`` feeds ``data`` (everything a client sends
on one connection) to the proxy's connection handler (``_proxy._Conn``, the
same code that serves sockets), answers every forwarded request with a
canned upstream response, and returns every byte the proxy sent upstream and
back to the client, plus what it forwarded as it understood it. No sockets,
no timers: the differential tests (bytes forwarded upstream must parse the
same in an independent parser) and the fuzz targets call it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from axoneme.core.flow import Flow
from axoneme.core.l7proxy import ProxyConfig, ProxyPolicy
from axoneme.core.mapstate import Direction
from axoneme.l7.http._proxy import STREAM_LIMIT, HttpProxy, _Conn
from axoneme.l7.http._relay import _Closed
from axoneme.l7.http._wire import RequestHead

LOG = logging.getLogger(__name__)

CLIENT = ("10.244.0.10", 40000)
SERVER = ("10.244.0.20", 80)
OK_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@dataclass
class Forwarded:
    """One request the proxy forwarded upstream, as the proxy understood it."""

    head: RequestHead  # as parsed and matched (path normalised)
    body: bytes = b""  # the body as the proxy framed it (de-chunked)
    complete: bool = False  # head and whole body went upstream


@dataclass
class Replay:
    upstream: bytes  # every byte sent to the upstream (all upstream connections)
    client: bytes  # every byte sent back to the client
    forwarded: list[Forwarded] = field(default_factory=list)
    flows: list[Flow] = field(default_factory=list)
    crashed: bool = False  # the connection handler raised something unexpected


class _MemoryTransport(asyncio.Transport):
    def __init__(self, sink: bytearray, peer: tuple[str, int], local: tuple[str, int]) -> None:
        super().__init__()
        self.sink = sink
        self.closing = False
        self._extra = {"peername": peer, "sockname": local, "socket": None}

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self.closing:  # as a real transport: nothing leaves after close/abort
            self.sink += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._extra.get(name, default)


def _stream(data: bytes, sink: bytearray, peer: tuple[str, int], local: tuple[str, int]
            ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=STREAM_LIMIT, loop=loop)
    reader.feed_data(data)
    reader.feed_eof()
    transport = _MemoryTransport(sink, peer, local)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


class _Tap:
    """A writer that records what goes through it (the forwarded body bytes)."""

    def __init__(self, w: asyncio.StreamWriter) -> None:
        self.w = w
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data
        self.w.write(data)

    async def drain(self) -> None:
        await self.w.drain()


class _ReplayConn(_Conn):
    def __init__(self, proxy: HttpProxy, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, responses: bytes, sink: bytearray) -> None:
        super().__init__(proxy, reader, writer)
        self.responses = responses
        self.sink = sink
        self.record: list[Forwarded] = []
        self.pending: RequestHead | None = None

    async def _handle(self, req: RequestHead, t0: float) -> bool:
        self.pending = req
        return await super()._handle(req, t0)

    async def _ensure_upstream(self) -> bool:
        if self.up_w is None or self.up_w.transport.is_closing():
            self.up_r, self.up_w = _stream(self.responses, self.sink, SERVER, CLIENT)
        if self.pending is not None:  # only allowed requests get here
            self.record.append(Forwarded(self.pending))
            self.pending = None
        return True

    async def _relay_exact(self, src: asyncio.StreamReader, dst: Any, n: int, timeout: float,
                           prefix: bytes = b"", side: str = "client") -> None:
        if side != "client" or not self.record:
            return await super()._relay_exact(src, dst, n, timeout, prefix, side)
        tap = _Tap(dst)
        try:
            await super()._relay_exact(src, tap, n, timeout, prefix, side)  # type: ignore[arg-type]
        finally:
            self.record[-1].body += bytes(tap.data[len(prefix):])

    async def _relay_response(self, req: RequestHead, pol: ProxyPolicy | None, t0: float) -> bool:
        if self.record:
            self.record[-1].complete = True  # the request is out: now the response
        return await super()._relay_response(req, pol, t0)


class _NoSocket:
    """Stands in for the listening socket (the proxy only asks its address)."""

    def getsockname(self) -> tuple[str, int]:
        return SERVER


async def replay_connection_async(data: bytes, rules: Sequence[Any] = (), *,
                                  response: bytes = OK_RESPONSE,
                                  config: ProxyConfig | None = None) -> Replay:
    """See ``replay_connection``."""
    flows: list[Flow] = []
    proxy = HttpProxy(_NoSocket(), direction=Direction.INGRESS,  # type: ignore[arg-type]
                      policy_for=lambda *_: ProxyPolicy(tuple(rules)), flow_sink=flows.append,
                      config=config or ProxyConfig(upstream=SERVER))
    to_client = bytearray()
    to_upstream = bytearray()
    reader, writer = _stream(data, to_client, CLIENT, SERVER)
    # Enough canned responses for every request a stream of this size can hold.
    responses = response * (data.count(b"\n") + 2)
    conn = _ReplayConn(proxy, reader, writer, responses, to_upstream)
    crashed = False
    try:
        await conn.run()
    except (_Closed, ConnectionError, TimeoutError, asyncio.IncompleteReadError,
            asyncio.LimitOverrunError):
        pass  # the same endings HttpProxy._client treats as normal
    except Exception:
        LOG.exception("replay: connection handler failed")
        crashed = True
    finally:
        conn.close()
    return Replay(bytes(to_upstream), bytes(to_client), conn.record, flows, crashed)


def replay_connection(data: bytes, rules: Sequence[Any] = (), *, response: bytes = OK_RESPONSE,
                      config: ProxyConfig | None = None) -> Replay:
    """Run the proxy on one in-memory client connection carrying ``data``.

    ``rules`` are the connection's HTTP rules (empty: allow every request);
    every forwarded request is answered with ``response``. Returns what went
    upstream and back to the client (``Replay``). Must not be called from a
    running event loop (use ``replay_connection_async`` there).
    """
    return asyncio.run(replay_connection_async(data, rules, response=response, config=config))


__all__ = ["replay_connection", "replay_connection_async", "Replay", "Forwarded", "OK_RESPONSE"]
