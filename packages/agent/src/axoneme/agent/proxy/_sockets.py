"""Transparent sockets: the proxy listener and the upstream connections.

- Listener: IP_TRANSPARENT lets the socket accept connections TPROXY diverts
  to it whatever their destination; the accepted socket's local address is
  the original destination.
- Upstream: IP_TRANSPARENT lets us bind the client's (non-local) address so
  the server sees the real client; SO_MARK carries the from-proxy mark so the
  datapath does not redirect the connection again. The port is left to the
  kernel: reusing the client's port would give the upstream the same
  conntrack tuple as the diverted connection.
"""

from __future__ import annotations

import asyncio
import socket

from axoneme.core.marks import MARK_MAGIC_FROM_PROXY

IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
IPV6_TRANSPARENT = 75
SO_MARK = getattr(socket, "SO_MARK", 36)


def _family(ip: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def _set_transparent(sock: socket.socket) -> None:
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
    else:
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)


def make_listener(port: int, ip: str = "127.0.0.1", transparent: bool = True,
                  backlog: int = 1024) -> socket.socket:
    """A bound, listening, non-blocking TCP socket for a proxy port."""
    sock = socket.socket(_family(ip), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if transparent:
            _set_transparent(sock)
        sock.bind((ip, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def transparent_connector(mark: int = MARK_MAGIC_FROM_PROXY, spoof_source: bool = True):  # type: ignore[no-untyped-def]
    """A ``connect_upstream`` (core.l7proxy.ConnectUpstream) for the given mark."""

    async def connect(src: tuple[str, int], dst: tuple[str, int]) -> socket.socket:
        loop = asyncio.get_running_loop()
        sock = socket.socket(_family(dst[0]), socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if mark:
                sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
            if spoof_source and _family(src[0]) == _family(dst[0]):
                _set_transparent(sock)
                sock.bind((src[0], 0))
            await loop.sock_connect(sock, dst)
        except BaseException:
            sock.close()
            raise
        return sock

    return connect


def transparent_udp_connector(mark: int = MARK_MAGIC_FROM_PROXY, spoof_source: bool = True):  # type: ignore[no-untyped-def]
    """The UDP counterpart (e.g. the DNS proxy's ``connect_upstream_udp``):
    a connected non-blocking UDP socket from the client's address, marked."""

    async def connect(src: tuple[str, int], dst: tuple[str, int]) -> socket.socket:
        sock = socket.socket(_family(dst[0]), socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            if mark:
                sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
            if spoof_source and _family(src[0]) == _family(dst[0]):
                _set_transparent(sock)
                sock.bind((src[0], 0))
            sock.connect(dst)
        except BaseException:
            sock.close()
            raise
        return sock

    return connect


__all__ = ["make_listener", "transparent_connector", "transparent_udp_connector",
           "IP_TRANSPARENT", "SO_MARK"]
