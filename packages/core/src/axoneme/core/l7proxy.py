"""The contract between the agent's proxy plumbing and an L7 proxy.

An ``axoneme.l7`` parser's ``proxy_factory()`` returns a ``ProxyFactory``.
The agent (``axoneme.agent.proxy.ProxyManager``) owns the kernel side: it
creates the listening socket (IP_TRANSPARENT, bound to the proxy port), the
TPROXY rules, and ``connect_upstream`` (binds the original client address,
sets the from-proxy mark). The proxy owns the protocol: it accepts on the
socket, asks ``policy_for`` per request, forwards or refuses, and reports
every request/response to ``flow_sink``.

With TPROXY the accepted socket's local address is the original destination;
``ProxyConfig.upstream`` overrides that for tests without TPROXY.

Shared by every proxy (one definition each): ``StreamProxyServer`` (the
listener lifecycle of a TCP proxy: accept, connection limit, per-connection
tasks, stop), ``plain_connect`` and the transparent-socket helpers
(``make_listener``, ``make_udp_listener``, ``transparent_connector``,
``transparent_udp_connector``, ``send_from``, ``recv_datagram``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from axoneme.core.flow import Flow, FlowEndpoint
from axoneme.core.mapstate import Direction
from axoneme.core.marks import (
    MARK_MAGIC_FROM_PROXY,
    identity_of_to_proxy_mark,
    with_source_identity,
)

LOG = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ProxyPolicy:
    """What ``policy_for`` answers for one connection at one moment.

    ``rules`` are the parser's rules of the redirecting entry (empty = allow
    all, visibility only); ``source``/``destination`` describe the peers for
    flow records.
    """

    rules: Sequence[Any] = ()
    source: FlowEndpoint = field(default_factory=FlowEndpoint)
    destination: FlowEndpoint = field(default_factory=FlowEndpoint)


# policy_for(src_ip, src_port, dst_ip, dst_port, direction) -> ProxyPolicy | None
# (or an awaitable of it). None = the agent knows no redirect for this
# connection: the proxy refuses the request (fail closed). Called for every
# request, so a policy change applies to the next request of a connection.
# A proxy that read the source identity from the accepted socket's mark
# (``take_source_identity``) passes it as the keyword ``source_identity=``
# (only when it has one): the agent then judges the source by it rather
# than by its ipcache.
PolicyFor = Callable[..., "ProxyPolicy | None | Awaitable[ProxyPolicy | None]"]
FlowSink = Callable[[Flow], None]
# connect_upstream(src=(ip, port), dst=(ip, port)) -> a connected non-blocking socket;
# ``identity=`` (passed only when the proxy has one) goes into the from-proxy mark.
ConnectUpstream = Callable[..., Awaitable[socket.socket]]


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """Limits and timeouts (seconds) of one proxy listener."""

    max_connections: int = 1024
    header_timeout: float = 10.0  # first byte -> end of the request head
    idle_timeout: float = 60.0  # keep-alive wait for the next request
    body_timeout: float = 30.0  # max wait for the next body bytes
    upstream_connect_timeout: float = 5.0
    upstream_timeout: float = 60.0  # max wait for the next response bytes
    upstream: tuple[str, int] | None = None  # tests: fixed upstream instead of the original dst


class L7ProxyServer(Protocol):
    """A running proxy on one listening socket."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class ProxyFactory(Protocol):
    def __call__(self, sock: socket.socket, *, direction: Direction, policy_for: PolicyFor,
                 flow_sink: FlowSink, connect_upstream: ConnectUpstream | None = None,
                 config: ProxyConfig | None = None) -> L7ProxyServer: ...


Addr = tuple[str, int]


# -- the listener lifecycle of a TCP proxy ----------------------------------------------

class StreamProxyServer:
    """Accepts on one listening socket and runs ``serve(reader, writer)`` per
    connection: refuses connections beyond ``max_connections`` (counted in
    ``stats["refused_connections"]``), keeps one task per connection, logs a
    handler's bug without taking the listener down, and ``stop()`` closes the
    listener and cancels every connection.

    Subclasses implement ``serve``; the writer is closed after it returns."""

    # exceptions that end a connection quietly (the peer went away, a timeout)
    QUIET: tuple[type[BaseException], ...] = (
        asyncio.CancelledError, ConnectionError, TimeoutError, asyncio.IncompleteReadError,
        asyncio.LimitOverrunError)

    def __init__(self, sock: socket.socket | None, *, max_connections: int = 1024,
                 stream_limit: int = 2 ** 16, name: str = "proxy",
                 listen: Addr | None = None) -> None:
        """``sock``: the listening socket, or None to bind ``listen`` (not
        transparent) in ``start()``."""
        self.sock = sock
        self.listen = listen
        self.max_connections = max_connections
        self.stream_limit = stream_limit
        self.name = name
        self._server: asyncio.AbstractServer | None = None
        self._conns: dict[asyncio.Task[Any], Any] = {}
        self._address: Addr | None = None
        self.stats: dict[str, int] = {"refused_connections": 0}

    @property
    def address(self) -> tuple[str, int]:
        """The listening address (kept after ``stop()`` closed the socket)."""
        if self._address is None:
            if self.sock is None:
                raise RuntimeError(f"{self.name}: not started")
            host, port = self.sock.getsockname()[:2]
            self._address = (str(host), int(port))
        return self._address

    @property
    def port(self) -> int:
        return self.address[1]

    def loops_back(self, dst: Addr) -> bool:
        """Whether a connection to ``dst`` reached the listener directly (not
        diverted by TPROXY): proxying it upstream would connect to ourselves."""
        host, port = self.address
        return dst[1] == port and (dst[0] == host or host in ("0.0.0.0", "::"))

    async def start(self) -> None:
        if self.sock is None:
            assert self.listen is not None, "a socket or a listen address"
            self.sock = make_listener(self.listen[1], self.listen[0], transparent=False)
        self.sock.setblocking(False)
        self.address  # noqa: B018 - remember it while the socket is open
        self._server = await asyncio.start_server(self._accept, sock=self.sock, limit=self.stream_limit,
                                                  backlog=1024)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._conns):
            t.cancel()
        if self._conns:
            await asyncio.gather(*self._conns, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None

    def connections(self) -> list[Any]:
        """The per-connection states ``serve`` registered with ``track`` (e.g. for timeouts)."""
        return [c for c in self._conns.values() if c is not None]

    def track(self, state: Any) -> None:
        """Attach a state object to the current connection (see ``connections``)."""
        task = asyncio.current_task()
        if task is not None and task in self._conns:
            self._conns[task] = state

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if len(self._conns) >= self.max_connections:
            self.stats["refused_connections"] += 1
            LOG.warning("%s %d: connection limit %d reached, refusing", self.name, self.port,
                        self.max_connections)
            writer.transport.abort()
            return
        assert task is not None
        self._conns[task] = None
        try:
            await self.serve(reader, writer)
        except self.QUIET:
            pass
        except Exception:  # a bug must not take the listener down
            LOG.exception("%s %d: connection handler failed", self.name, self.port)
        finally:
            self._conns.pop(task, None)
            with contextlib.suppress(Exception):
                writer.close()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


async def plain_connect(src: tuple[str, int], dst: tuple[str, int],
                        identity: int = 0) -> socket.socket:
    """Upstream connect without transparency (tests, or when not root): ``src``
    and ``identity`` are unused."""
    return await _connect(dst, mark=0, src=None)


# -- transparent sockets -------------------------------------------------------------------
#
# - Listener: IP_TRANSPARENT lets the socket accept connections TPROXY diverts
#   to it whatever their destination; the accepted socket's local address is
#   the original destination. A UDP listener also asks for IP_ORIGDSTADDR.
# - Upstream: IP_TRANSPARENT lets us bind the client's (non-local) address so
#   the server sees the real client; SO_MARK carries the from-proxy mark so the
#   datapath does not redirect the connection again. The port is left to the
#   kernel: reusing the client's port would give the upstream the same
#   conntrack tuple as the diverted connection.

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
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:  # a host name
        return socket.AF_INET6 if ":" in host else socket.AF_INET


def set_transparent(sock: socket.socket) -> None:
    if sock.family == socket.AF_INET6:
        sock.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
    else:
        sock.setsockopt(SOL_IP, IP_TRANSPARENT, 1)


def is_transparent(sock: socket.socket) -> bool:
    """Whether IP_TRANSPARENT (IPV6_TRANSPARENT) is set on ``sock``."""
    try:
        if sock.family == socket.AF_INET6:
            return bool(sock.getsockopt(SOL_IPV6, IPV6_TRANSPARENT))
        return bool(sock.getsockopt(SOL_IP, IP_TRANSPARENT))
    except OSError:
        return False


def set_mark(sock: socket.socket, mark: int | None) -> None:
    """SO_MARK, so the datapath knows the packet comes from the proxy."""
    if mark:  # packed unsigned: a mark with bit 31 set (an identity >= 0x8000) is no C int
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, struct.pack("=I", mark & 0xFFFFFFFF))


def take_source_identity(sock: Any) -> int:
    """The source identity the datapath put in the mark of a diverted
    connection (``axoneme.core.marks.identity_of_to_proxy_mark``), 0 when
    there is none; the accepted socket's mark is then cleared, so its own
    packets leave unmarked. ``sock``: the accepted socket, or the asyncio
    transport's socket (``writer.get_extra_info("socket")``).

    The accepted socket carries the SYN's mark only with
    ``net.ipv4.tcp_fwmark_accept=1`` (the agent's redirect rules set it when
    the datapath puts identities in its marks); otherwise its mark is 0."""
    if sock is None:
        return 0
    try:
        mark = int(sock.getsockopt(socket.SOL_SOCKET, SO_MARK)) & 0xFFFFFFFF  # read as signed
    except (OSError, AttributeError):
        return 0
    if mark:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, 0)
        except OSError:  # not CAP_NET_ADMIN: the mark stays, the identity is still read
            LOG.debug("cannot clear the mark of an accepted proxy connection", exc_info=True)
    return identity_of_to_proxy_mark(mark)


def make_listener(port: int, ip: str = "127.0.0.1", transparent: bool = True,
                  backlog: int = 1024) -> socket.socket:
    """A bound, listening, non-blocking TCP socket for a proxy port."""
    sock = socket.socket(family_of(ip), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if transparent:
            set_transparent(sock)
        sock.bind((ip, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def make_udp_listener(ip: str, port: int, *, transparent: bool) -> socket.socket:
    """A bound non-blocking UDP socket; transparent ones also report each
    datagram's original destination (``recv_datagram``)."""
    sock = socket.socket(family_of(ip), socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if transparent:
            set_transparent(sock)
            if sock.family == socket.AF_INET6:
                sock.setsockopt(SOL_IPV6, IPV6_RECVORIGDSTADDR, 1)
            else:
                sock.setsockopt(SOL_IP, IP_RECVORIGDSTADDR, 1)
        sock.bind((ip, port))
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


def recv_datagram(sock: socket.socket, bufsize: int = 65535) -> tuple[bytes, Addr, Addr | None]:
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
    SO_REUSEADDR lets concurrent replies from one address coexist."""
    sock = socket.socket(family_of(source[0]), socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        set_transparent(sock)
        set_mark(sock, mark)
        sock.bind(source)
        sock.setblocking(False)
        sock.sendto(data, dest)
    finally:
        sock.close()


def _upstream_socket(kind: socket.SocketKind, src: Addr | None, dst: Addr, mark: int) -> socket.socket:
    """A non-blocking socket towards ``dst``, marked, bound to ``src`` (transparent) when given."""
    sock = socket.socket(family_of(dst[0]), kind)
    try:
        sock.setblocking(False)
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        set_mark(sock, mark)
        if src is not None and family_of(src[0]) == sock.family:
            set_transparent(sock)
            sock.bind((src[0], 0))
    except BaseException:
        sock.close()
        raise
    return sock


async def _connect(dst: Addr, *, mark: int, src: Addr | None) -> socket.socket:
    sock = _upstream_socket(socket.SOCK_STREAM, src, dst, mark)
    try:
        await asyncio.get_running_loop().sock_connect(sock, dst)
    except BaseException:
        sock.close()
        raise
    return sock


class TransparentConnector:
    """A ``connect_upstream`` from the client's address (when ``spoof_source``),
    marked; ``identity`` (the source identity the proxy judged the client by)
    goes into the mark's upper half, so the datapath judges the upstream leg
    by it too. ``mark`` and ``spoof_source`` are attributes, so a proxy engine
    outside this process (the native HTTP engine) connects the same way."""

    __slots__ = ("mark", "spoof_source")

    def __init__(self, mark: int = MARK_MAGIC_FROM_PROXY, spoof_source: bool = True) -> None:
        self.mark = mark
        self.spoof_source = spoof_source

    async def __call__(self, src: Addr, dst: Addr, identity: int = 0) -> socket.socket:
        return await _connect(dst, mark=with_source_identity(self.mark, identity),
                              src=src if self.spoof_source else None)


def transparent_connector(mark: int = MARK_MAGIC_FROM_PROXY, spoof_source: bool = True) -> ConnectUpstream:
    """A ``TransparentConnector`` (see there)."""
    return TransparentConnector(mark, spoof_source)


def transparent_udp_connector(mark: int = MARK_MAGIC_FROM_PROXY, spoof_source: bool = True,
                              ) -> ConnectUpstream:
    """The UDP counterpart (e.g. the DNS proxy's ``connect_upstream_udp``):
    a connected non-blocking UDP socket from the client's address, marked."""

    async def connect(src: Addr, dst: Addr) -> socket.socket:
        sock = _upstream_socket(socket.SOCK_DGRAM, src if spoof_source else None, dst, mark)
        try:
            sock.connect(dst)
        except BaseException:
            sock.close()
            raise
        return sock

    return connect


__all__ = ["ProxyPolicy", "PolicyFor", "FlowSink", "ConnectUpstream", "ProxyConfig",
           "L7ProxyServer", "ProxyFactory", "StreamProxyServer", "plain_connect", "Addr",
           "IP_TRANSPARENT", "IPV6_TRANSPARENT", "SO_MARK", "family_of", "set_transparent",
           "is_transparent", "set_mark", "make_listener", "make_udp_listener", "recv_datagram",
           "send_from", "transparent_connector", "TransparentConnector", "transparent_udp_connector", "take_source_identity"]
