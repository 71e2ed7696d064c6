"""Relaying message bodies and tunnels for the HTTP proxy's connections
(``_proxy._Conn``): exact lengths, chunked bodies re-encoded with their
trailers filtered, bodies delimited by the end of the connection, and the
byte tunnel after a 101. Every wait is armed with a timeout first."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from axoneme.core.l7proxy import ProxyConfig
from axoneme.l7.http._wire import (
    MAX_CHUNK_LINE,
    MAX_HEAD_BYTES,
    HttpError,
    error_response,
    filter_trailers,
    parse_chunk_size,
    parse_header_lines,
)

LOG = logging.getLogger(__name__)

READ_SIZE = 64 * 1024


class _Closed(Exception):
    """The client connection must be closed (already answered or gone)."""


class BodyRelay:
    """The body-relaying half of a proxied connection (``_proxy._Conn``)."""

    __slots__ = ()
    p: Any
    r: asyncio.StreamReader
    w: asyncio.StreamWriter
    up_r: asyncio.StreamReader | None
    up_w: asyncio.StreamWriter | None
    cfg: ProxyConfig
    client: tuple[str, int]
    deadline: float

    def arm(self, timeout: float, side: str = "client") -> None:
        raise NotImplementedError

    async def _send(self, data: bytes) -> None:
        raise NotImplementedError

    async def _relay_exact(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, n: int,
                           timeout: float, prefix: bytes = b"", side: str = "client") -> None:
        """Relay exactly n bytes; ``prefix`` (a head) goes out with the first piece."""
        while n > 0:
            self.arm(timeout, side)
            data = await src.read(min(n, READ_SIZE))
            if not data:
                raise _Closed()
            n -= len(data)
            if prefix:
                data, prefix = prefix + data, b""
            dst.write(data)
            self.arm(timeout, "upstream" if side == "client" else "client")
            await dst.drain()

    async def _relay_chunked(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                             timeout: float, err_status: int) -> None:
        """Relay a chunked body, re-encoded (extensions dropped), trailers validated
        and filtered (``filter_trailers``)."""
        side = "client" if err_status == 400 else "upstream"
        try:
            while True:
                self.arm(timeout, side)
                line = await src.readuntil(b"\r\n")
                size = parse_chunk_size(line[:-2])
                if size == 0:
                    # Framing/routing fields in trailers (RFC 9110 §6.5.1) are
                    # dropped: an upstream merging them would reframe or reroute.
                    trailers = filter_trailers(await self._read_trailers(src, timeout, side))
                    out = b"0\r\n" + b"".join(n.encode("ascii") + b": " + v.encode("latin-1") +
                                             b"\r\n" for n, v in trailers) + b"\r\n"
                    dst.write(out)
                    self.arm(timeout, "upstream" if side == "client" else "client")
                    await dst.drain()
                    return
                dst.write(b"%x\r\n" % size)
                await self._relay_exact(src, dst, size, timeout, side=side)
                self.arm(timeout, side)
                crlf = await src.readexactly(2)
                if crlf != b"\r\n":
                    raise HttpError(err_status, "missing CRLF after chunk data")
                dst.write(b"\r\n")
        except HttpError as e:
            await self._fail(e, err_status)
        except asyncio.LimitOverrunError:
            await self._fail(HttpError(err_status, "chunk-size line too long"), err_status)
        except asyncio.IncompleteReadError:
            raise _Closed() from None

    async def _fail(self, e: HttpError, err_status: int) -> None:
        LOG.info("proxy %d: %s: %s", self.p.port, self.client, e)
        # Mid-body on the request side: the upstream got a partial request,
        # so both connections go; the client learns why if nothing was sent.
        if err_status == 400:
            with contextlib.suppress(Exception):
                await self._send(error_response(400, "Bad Request", e.reason.encode() + b"\n", True))
        raise _Closed()

    async def _read_trailers(self, src: asyncio.StreamReader, timeout: float, side: str
                             ) -> list[tuple[str, str]]:
        lines: list[bytes] = []
        total = 0
        while True:
            self.arm(timeout, side)
            line = await src.readuntil(b"\r\n")
            if line == b"\r\n":
                break
            total += len(line)
            if total > MAX_HEAD_BYTES or len(lines) >= 100 or len(line) > MAX_CHUNK_LINE * 2:
                raise HttpError(431, "trailers too large")
            body = line[:-2]
            if b"\r" in body or b"\n" in body:
                raise HttpError(400, "bare CR or LF in trailer")
            lines.append(body)
        return parse_header_lines(lines, "trailer")

    async def _relay_to_eof(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        while True:
            self.arm(self.cfg.upstream_timeout, "upstream")
            data = await src.read(READ_SIZE)
            if not data:
                await dst.drain()
                return
            dst.write(data)
            self.arm(self.cfg.body_timeout)
            await dst.drain()

    async def _tunnel(self) -> None:
        assert self.up_r is not None and self.up_w is not None

        self.deadline = 0.0  # type: ignore[misc]  # a tunnel may idle: no deadline (_Conn slot)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(READ_SIZE):
                    dst.write(data)
                    await dst.drain()
            finally:
                with contextlib.suppress(Exception):
                    dst.write_eof()

        await asyncio.gather(pump(self.r, self.up_w), pump(self.up_r, self.w),
                             return_exceptions=True)


__all__ = ["BodyRelay", "READ_SIZE"]
