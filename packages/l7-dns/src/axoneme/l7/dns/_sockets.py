"""Socket plumbing for a transparent (TPROXY) DNS proxy on Linux.

A packet TPROXY diverted to the proxy still carries the pod's original
destination (its resolver, e.g. 198.51.100.53:53):

- UDP: ``IP_RECVORIGDSTADDR`` on the listener makes ``recvmsg`` return it as
  ``IP_ORIGDSTADDR`` ancillary data (a ``sockaddr_in``). The reply must come
  *from* that address or the pod's stub resolver drops it, so it is sent
  from a short-lived ``IP_TRANSPARENT`` socket bound to it.
- TCP: the accepted socket's local address *is* the original destination.

Both listeners need ``IP_TRANSPARENT`` (CAP_NET_ADMIN) to accept packets for
addresses that are not local.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

__all__ = ["Addr", "family_of", "is_transparent", "make_udp_listener", "make_tcp_listener", "recv_datagram",
           "send_from", "set_mark"]

Addr = tuple[str, int]

# <linux/in.h>, <linux/in6.h>; not all are exported by the socket module.
SOL_IP = getattr(socket, "SOL_IP", 0)
SOL_IPV6 = getattr(socket, "SOL_IPV6", 41)
IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
IP_RECVORIGDSTADDR = getattr(socket, "IP_RECVORIGDSTADDR", 20)
IP_ORIGDSTADDR = IP_RECVORIGDSTADDR
IPV6_TRANSPARENT = getattr(socket, "IPV6_TRANSPARENT", 75)
IPV6_RECVORIGDSTADDR = getattr(socket, "IPV6_RECVORIGDSTADDR", 74)
IPV6_ORIGDSTADDR = IPV6_RECVORIGDSTADDR
SO_MARK = getattr(socket, "SO_MARK", 36)

_CMSG_SPACE = socket.CMSG_SPACE(28)  # room for a sockaddr_in6


def family_of(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET


def _transparent(sock: socket.socket, family: socket.AddressFamily) -> None:
    if family == socket.AF_INET6:
        sock.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
    else:
        sock.setsockopt(SOL_IP, IP_TRANSPARENT, 1)


def set_mark(sock: socket.socket, mark: int | None) -> None:
    """SO_MARK, so the datapath knows the packet comes from the proxy."""
    if mark:
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)


def make_udp_listener(host: str, port: int, *, transparent: bool) -> socket.socket:
    family = family_of(host)
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if transparent:
            _transparent(sock, family)
            if family == socket.AF_INET6:
                sock.setsockopt(SOL_IPV6, IPV6_RECVORIGDSTADDR, 1)
            else:
                sock.setsockopt(SOL_IP, IP_RECVORIGDSTADDR, 1)
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def make_tcp_listener(host: str, port: int, *, transparent: bool,
                      backlog: int = 128) -> socket.socket:
    family = family_of(host)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if transparent:
            _transparent(sock, family)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _parse_sockaddr(data: bytes) -> Addr | None:
    if len(data) < 8:
        return None
    family = struct.unpack_from("=H", data, 0)[0]
    port = struct.unpack_from("!H", data, 2)[0]
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, data[4:8]), port
    if family == socket.AF_INET6 and len(data) >= 24:
        return socket.inet_ntop(socket.AF_INET6, data[8:24]), port
    return None


def recv_datagram(sock: socket.socket, bufsize: int = 65535
                  ) -> tuple[bytes, Addr, Addr | None]:
    """One datagram: (data, client address, original destination or None).

    Raises BlockingIOError when nothing is queued."""
    data, ancdata, _flags, addr = sock.recvmsg(bufsize, _CMSG_SPACE)
    orig: Addr | None = None
    for level, ctype, cdata in ancdata:
        if (level, ctype) in ((SOL_IP, IP_ORIGDSTADDR), (SOL_IPV6, IPV6_ORIGDSTADDR)):
            orig = _parse_sockaddr(cdata)
    return data, (addr[0], addr[1]), orig


def send_from(data: bytes, source: Addr, dest: Addr, *, mark: int | None = None) -> None:
    """Send one datagram to ``dest`` with the (possibly non-local) source
    address ``source``: an IP_TRANSPARENT socket bound to it, then closed.
    SO_REUSEADDR lets concurrent replies from one resolver address coexist."""
    family = family_of(source[0])
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        _transparent(sock, family)
        set_mark(sock, mark)
        sock.bind(source)
        sock.setblocking(False)
        sock.sendto(data, dest)
    finally:
        sock.close()


def is_transparent(sock: socket.socket) -> bool:
    """Whether IP_TRANSPARENT (IPV6_TRANSPARENT) is set on ``sock``."""
    try:
        if sock.family == socket.AF_INET6:
            return bool(sock.getsockopt(SOL_IPV6, IPV6_TRANSPARENT))
        return bool(sock.getsockopt(SOL_IP, IP_TRANSPARENT))
    except OSError:
        return False
