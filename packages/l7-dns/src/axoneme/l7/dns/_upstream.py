"""The DNS proxy's upstream side: one query to the resolver, its answer back.

A fresh socket per query (UDP: a random source port, like a stub resolver),
or the agent's connector (``connect``: the pod's source address, the
from-proxy mark). The answer must match the query (ID and question); a UDP
datagram that does not is ignored and the wait goes on until ``timeout``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct

from axoneme.core.l7proxy import Addr, ConnectUpstream, family_of, set_mark
from axoneme.l7.dns._wire import DnsAnswer, DnsQuery, MalformedMessage, parse_answer

LOG = logging.getLogger(__name__)


def upstream_socket(server: Addr, kind: socket.SocketKind, mark: int | None) -> socket.socket:
    """A non-blocking socket for ``server`` carrying SO_MARK ``mark`` (when set)."""
    sock = socket.socket(family_of(server[0]), kind)
    try:
        set_mark(sock, mark)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def _connected(kind: socket.SocketKind, client: Addr, server: Addr, *, timeout: float,
                     mark: int | None, connect: ConnectUpstream | None) -> socket.socket:
    """A socket connected to ``server``: the agent's connector's (original
    source address, from-proxy mark) or a fresh one of ours."""
    if connect is not None:
        return await asyncio.wait_for(connect(client, server), timeout)
    sock = upstream_socket(server, kind, mark)
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, server), timeout)
    except BaseException:
        sock.close()
        raise
    return sock


async def udp_exchange(data: bytes, client: Addr, server: Addr, query: DnsQuery, *,
                       timeout: float, mark: int | None,
                       connect: ConnectUpstream | None = None) -> tuple[bytes, DnsAnswer]:
    """Send ``data`` over UDP; the first datagram answering ``query``."""
    loop = asyncio.get_running_loop()
    # A fresh socket (random source port) per query, like a stub resolver;
    # the agent's connector may bind the pod's address (transparent source).
    sock = await _connected(socket.SOCK_DGRAM, client, server, timeout=timeout, mark=mark,
                            connect=connect)
    try:
        await loop.sock_sendall(sock, data)
        deadline = loop.time() + timeout
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError("upstream timeout")
            resp = await asyncio.wait_for(loop.sock_recv(sock, 65535), remaining)
            try:
                return resp, parse_answer(resp, query)
            except MalformedMessage as exc:  # stray or spoofed: keep waiting
                LOG.debug("dns proxy: ignoring upstream datagram: %s", exc)
    finally:
        sock.close()


async def tcp_exchange(data: bytes, client: Addr, server: Addr, query: DnsQuery, *,
                       timeout: float, mark: int | None,
                       connect: ConnectUpstream | None = None) -> tuple[bytes, DnsAnswer]:
    """Send ``data`` over TCP (2-byte length prefix); the answer to ``query``."""
    sock = await _connected(socket.SOCK_STREAM, client, server, timeout=timeout, mark=mark,
                            connect=connect)
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        async def exchange() -> bytes:
            writer.write(struct.pack("!H", len(data)) + data)
            await writer.drain()
            (length,) = struct.unpack("!H", await reader.readexactly(2))
            return await reader.readexactly(length)
        resp = await asyncio.wait_for(exchange(), timeout)
        return resp, parse_answer(resp, query)
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except Exception:
            pass
