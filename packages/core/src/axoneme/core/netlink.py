"""A small rtnetlink (NETLINK_ROUTE) client: the messages the agent and the
eBPF datapath send, struct-packed, and nothing else.

What Cilium does with vishvananda/netlink. It replaces pyroute2, whose package
``__init__`` imports its whole library (ndb, asyncio machinery,
``unittest.mock``): ~9 MB of the agent's RSS and 185 modules (issue 17).

Wire format (``linux/netlink.h``, ``linux/rtnetlink.h``): a message is a
``struct nlmsghdr`` (16 bytes), a fixed family header (``ifinfomsg``,
``ifaddrmsg``, ``rtmsg``, ``ndmsg``, ``tcmsg``) and attributes, each a
``struct rtattr`` (length, type) and its payload padded to 4 bytes. A request
asks for an ACK (``NLMSG_ERROR`` with error 0) or is a dump, answered by
``NLM_F_MULTI`` messages up to ``NLMSG_DONE``. A kernel error is
``NLMSG_ERROR`` with ``-errno``; it is raised as :class:`RtnlError`, an
``OSError`` carrying that errno (and the kernel's extended ack text if any).

A socket in another network namespace is opened by a short-lived thread that
``setns()``'s into it (the namespace is per thread) and hands the socket back:
the socket stays in the namespace it was made in. No forked child.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import os
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass

# DO NOT CHANGE: kernel ABI (linux/netlink.h, linux/rtnetlink.h, linux/if_link.h,
# linux/veth.h, linux/pkt_sched.h, linux/pkt_cls.h, linux/neighbour.h)
NETLINK_ROUTE = 0
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11
SOL_NETLINK = 270

NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLM_F_REPLACE = 0x100
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_CAPPED = 0x100  # in an NLMSG_ERROR: only the request's header is echoed
NLM_F_ACK_TLVS = 0x200  # in an NLMSG_ERROR: extended ack attributes follow

NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSGERR_ATTR_MSG = 1

RTM_NEWLINK = 16
RTM_DELLINK = 17
RTM_GETLINK = 18
RTM_NEWADDR = 20
RTM_GETADDR = 22
RTM_NEWROUTE = 24
RTM_NEWNEIGH = 28
RTM_NEWQDISC = 36
RTM_NEWTFILTER = 44
RTM_DELTFILTER = 45

IFLA_ADDRESS = 1
IFLA_IFNAME = 3
IFLA_MTU = 4
IFLA_LINKINFO = 18
IFLA_NET_NS_FD = 28
IFLA_INFO_KIND = 1
IFLA_INFO_DATA = 2
VETH_INFO_PEER = 1
IFF_UP = 0x1

IFA_ADDRESS = 1
IFA_LOCAL = 2

RTA_DST = 1
RTA_OIF = 4
RTA_GATEWAY = 5
RT_TABLE_MAIN = 254
RTPROT_STATIC = 4  # what pyroute2 gave our routes
RTN_UNICAST = 1
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253

NDA_DST = 1
NDA_LLADDR = 2
NUD_PERMANENT = 0x80

TCA_KIND = 1
TCA_OPTIONS = 2
TCA_BPF_CLASSID = 3
TCA_BPF_FD = 6
TCA_BPF_NAME = 7
TCA_BPF_FLAGS = 8
TCA_BPF_FLAG_ACT_DIRECT = 1
TC_H_CLSACT = 0xFFFFFFF1
TC_H_MIN_INGRESS = 0xFFF2
TC_H_MIN_EGRESS = 0xFFF3
ETH_P_ALL = 0x0003

NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF
CLONE_NEWNET = 0x40000000

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_NLMSGERR = struct.Struct("=i")  # error, then the request's nlmsghdr (and more)
_RTATTR = struct.Struct("=HH")  # len, type
IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol, scope, type, flags
NDMSG = struct.Struct("=BxxxiHBB")  # family, ifindex, state, flags, type
TCMSG = struct.Struct("=BxxxiIII")  # family, ifindex, handle, parent, info
_U32 = struct.Struct("=I")

_RECV_SIZE = 1 << 16  # the kernel sizes dump skbs to the reader's buffer, up to 32 KiB+


class RtnlError(OSError):
    """The kernel refused a request: ``errno`` is its error, ``strerror`` says
    which request and carries the extended ack message when there is one."""


def align(n: int) -> int:
    """NLMSG_ALIGN / RTA_ALIGN: up to a multiple of 4."""
    return (n + 3) & ~3


def attr(kind: int, payload: bytes) -> bytes:
    """One attribute, padded to 4 bytes (the length excludes the padding)."""
    n = _RTATTR.size + len(payload)
    return _RTATTR.pack(n, kind) + payload + b"\0" * (align(n) - n)


def attr_u32(kind: int, value: int) -> bytes:
    return attr(kind, _U32.pack(value))


def attr_str(kind: int, value: str) -> bytes:
    """A NUL-terminated string attribute (IFLA_IFNAME, TCA_KIND, ...)."""
    return attr(kind, value.encode() + b"\0")


def nested(kind: int, *attrs: bytes) -> bytes:
    """Attributes inside one. No NLA_F_NESTED: iproute2 does not set it on
    these (IFLA_LINKINFO, TCA_OPTIONS) and the kernel takes both."""
    return attr(kind, b"".join(attrs))


def parse_attrs(data: bytes | memoryview, offset: int = 0) -> dict[int, bytes]:
    """The attributes from ``offset`` on, by type (flag bits masked off; the
    last of a repeated type wins). A truncated attribute ends the parse."""
    out: dict[int, bytes] = {}
    view = memoryview(data)
    end = len(view)
    while offset + _RTATTR.size <= end:
        n, kind = _RTATTR.unpack_from(view, offset)
        if n < _RTATTR.size or offset + n > end:
            break
        out[kind & NLA_TYPE_MASK] = bytes(view[offset + _RTATTR.size:offset + n])
        offset += align(n)
    return out


def message(kind: int, flags: int, seq: int, body: bytes) -> bytes:
    """One request: nlmsghdr and body (pid 0: the kernel fills it)."""
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, flags, seq, 0) + body


@dataclass(frozen=True, slots=True)
class Message:
    """One message received: header fields and the payload after the header."""

    type: int
    flags: int
    seq: int
    payload: bytes


def split_messages(buf: bytes | memoryview) -> Iterator[Message]:
    """The messages of one datagram (several per recv in a dump)."""
    view = memoryview(buf)
    offset = 0
    while offset + _NLMSGHDR.size <= len(view):
        n, kind, flags, seq, _pid = _NLMSGHDR.unpack_from(view, offset)
        if n < _NLMSGHDR.size or offset + n > len(view):
            raise RtnlError(0, f"truncated netlink message ({n} bytes at {offset} of {len(view)})")
        yield Message(kind, flags, seq, bytes(view[offset + _NLMSGHDR.size:offset + n]))
        offset += align(n)


def error_of(msg: Message, what: str) -> RtnlError | None:
    """None for an ACK (error 0), else the kernel's error as RtnlError."""
    (code,) = _NLMSGERR.unpack_from(msg.payload)
    if code == 0:
        return None
    text = os.strerror(-code)
    if msg.flags & NLM_F_ACK_TLVS:
        # NETLINK_CAP_ACK: the request's header only (16 bytes) is echoed
        (echoed,) = struct.unpack_from("=I", msg.payload, _NLMSGERR.size)
        skip = _NLMSGERR.size + (_NLMSGHDR.size if msg.flags & NLM_F_CAPPED else align(echoed))
        ext = parse_attrs(msg.payload, skip).get(NLMSGERR_ATTR_MSG)
        if ext:
            note = ext.rstrip(b"\0").decode(errors="replace")
            text += f" ({note})"
    return RtnlError(-code, f"{what}: {text}")


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"setns: {os.strerror(e)}")


def _unshare_net() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"unshare(CLONE_NEWNET): {os.strerror(e)}")


def _raw_socket() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
    try:
        sock.bind((0, 0))
        for opt in (NETLINK_CAP_ACK, NETLINK_EXT_ACK):
            try:
                sock.setsockopt(SOL_NETLINK, opt, 1)
            except OSError:  # old kernels: plain errors
                pass
    except BaseException:
        sock.close()
        raise
    return sock


def _socket_in_thread(netns_path: str | None) -> socket.socket:
    """A socket made by a fresh thread in ``netns_path`` (None: a new, empty
    netns that lives as long as the socket). setns/unshare change the calling
    thread only, and that thread ends here."""
    result: list[socket.socket | BaseException] = []

    def run() -> None:
        try:
            if netns_path is None:
                _unshare_net()
            else:
                fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    _setns(fd)
                finally:
                    os.close(fd)
            result.append(_raw_socket())
        except BaseException as e:  # handed to the caller
            result.append(e)

    t = threading.Thread(target=run, name="rtnl-netns", daemon=True)
    t.start()
    t.join()
    got = result[0]
    if isinstance(got, BaseException):
        raise got
    return got


def mac_text(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def mac_bytes(text: str) -> bytes:
    return bytes(int(part, 16) for part in text.split(":"))


def _family_addr(ip: str) -> tuple[int, bytes]:
    addr = ipaddress.ip_address(ip)
    return (socket.AF_INET if addr.version == 4 else socket.AF_INET6), addr.packed


@dataclass(frozen=True, slots=True)
class Link:
    index: int
    name: str
    mac: str
    mtu: int
    flags: int


@dataclass(frozen=True, slots=True)
class Address:
    family: int  # socket.AF_INET / AF_INET6
    prefixlen: int
    index: int
    address: str  # IFA_ADDRESS (the peer's on a point-to-point link)
    local: str  # IFA_LOCAL ("" when the kernel sends none, as for IPv6)


class Rtnl:
    """One NETLINK_ROUTE socket; synchronous, one request at a time.

    ``Rtnl()`` is in the calling thread's netns, ``Rtnl(netns_path)`` in that
    netns, :meth:`in_new_netns` in a fresh one. A context manager."""

    def __init__(self, netns_path: str | None = None, *, _sock: socket.socket | None = None) -> None:
        if _sock is not None:
            self.sock = _sock
        elif netns_path is None:
            self.sock = _raw_socket()
        else:
            self.sock = _socket_in_thread(netns_path)
        self._seq = 0

    @classmethod
    def in_new_netns(cls) -> Rtnl:
        """A socket in a new, empty network namespace (only ``lo``, down),
        which goes away with the socket."""
        return cls(_sock=_socket_in_thread(None))

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport --

    def request(self, kind: int, flags: int, body: bytes, what: str) -> list[Message]:
        """Send one request and collect its answer: the messages before the
        ACK, or a dump's up to NLMSG_DONE. A kernel error raises RtnlError."""
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        seq = self._seq
        dump = (flags & NLM_F_DUMP) == NLM_F_DUMP
        if not dump:
            flags |= NLM_F_ACK
        self.sock.send(message(kind, flags | NLM_F_REQUEST, seq, body))
        out: list[Message] = []
        while True:
            data, _anc, mflags, _addr = self.sock.recvmsg(_RECV_SIZE)
            if mflags & socket.MSG_TRUNC:
                raise RtnlError(0, f"{what}: netlink answer larger than {_RECV_SIZE} bytes")
            for msg in split_messages(data):
                if msg.seq != seq:
                    continue  # a stale answer to an earlier, abandoned request
                if msg.type == NLMSG_ERROR:
                    err = error_of(msg, what)
                    if err is not None:
                        raise err
                    return out  # the ACK
                if msg.type == NLMSG_DONE:
                    return out
                if msg.type == NLMSG_NOOP:
                    continue
                out.append(msg)

    # -- links --

    def link_get(self, index: int = 0, name: str = "") -> Link | None:
        """The link by index or name; None if there is none (ENODEV)."""
        body = IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, 0, 0)
        if name:
            body += attr_str(IFLA_IFNAME, name)
        try:
            msgs = self.request(RTM_GETLINK, 0, body, f"get link {name or index}")
        except RtnlError as e:
            if e.errno == errno.ENODEV:
                return None
            raise
        for msg in msgs:
            if msg.type == RTM_NEWLINK:
                return parse_link(msg.payload)
        return None

    def link_index(self, name: str) -> int:
        """Index of the link called ``name`` in this socket's netns, 0 if none."""
        link = self.link_get(name=name)
        return link.index if link else 0

    def link_del(self, index: int) -> None:
        self.request(RTM_DELLINK, 0, IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, 0, 0),
                     f"delete link {index}")

    def link_up(self, index: int) -> None:
        self.request(RTM_NEWLINK, 0, IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, IFF_UP, IFF_UP),
                     f"set link {index} up")

    def veth_add(self, name: str, peer: str, mtu: int, peer_netns_fd: int = -1) -> None:
        """A veth pair ``name`` / ``peer``; the peer made in the netns of
        ``peer_netns_fd`` if given. EEXIST if ``name`` is taken."""
        peer_body = IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + attr_str(IFLA_IFNAME, peer)
        peer_body += attr_u32(IFLA_MTU, mtu)
        if peer_netns_fd >= 0:
            peer_body += attr_u32(IFLA_NET_NS_FD, peer_netns_fd)
        body = (IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + attr_str(IFLA_IFNAME, name)
                + attr_u32(IFLA_MTU, mtu)
                + nested(IFLA_LINKINFO, attr_str(IFLA_INFO_KIND, "veth"),
                         nested(IFLA_INFO_DATA, attr(VETH_INFO_PEER, peer_body))))
        self.request(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body, f"add veth {name} / {peer}")

    # -- addresses, routes, neighbours --

    def addr_add(self, index: int, ip: str, prefixlen: int) -> None:
        family, raw = _family_addr(ip)
        body = (IFADDRMSG.pack(family, prefixlen, 0, RT_SCOPE_UNIVERSE, index)
                + attr(IFA_LOCAL, raw) + attr(IFA_ADDRESS, raw))
        self.request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, body, f"add address {ip}/{prefixlen}")

    def addr_dump(self) -> list[Address]:
        """Every address of every link in this socket's netns."""
        body = IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        out = []
        for msg in self.request(RTM_GETADDR, NLM_F_DUMP, body, "dump addresses"):
            if msg.type == RTM_NEWADDR:
                out.append(parse_address(msg.payload))
        return out

    def route_add(self, dst: str, dst_len: int, oif: int, *, gateway: str = "",
                  scope: int = RT_SCOPE_UNIVERSE, replace: bool = False) -> None:
        """A main-table unicast route; ``replace`` creates or replaces (else EEXIST)."""
        family, raw = _family_addr(dst)
        body = RTMSG.pack(family, dst_len, 0, 0, RT_TABLE_MAIN, RTPROT_STATIC, scope, RTN_UNICAST, 0)
        if dst_len:
            body += attr(RTA_DST, raw)
        if gateway:
            body += attr(RTA_GATEWAY, _family_addr(gateway)[1])
        body += attr_u32(RTA_OIF, oif)
        flags = NLM_F_CREATE | (NLM_F_REPLACE if replace else NLM_F_EXCL)
        self.request(RTM_NEWROUTE, flags, body, f"add route {dst}/{dst_len}")

    def neigh_replace(self, index: int, ip: str, lladdr: str, state: int = NUD_PERMANENT) -> None:
        family, raw = _family_addr(ip)
        body = (NDMSG.pack(family, index, state, 0, 0) + attr(NDA_DST, raw)
                + attr(NDA_LLADDR, mac_bytes(lladdr)))
        self.request(RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_REPLACE, body, f"replace neighbour {ip}")

    # -- tc --

    def clsact_add(self, index: int) -> None:
        """The clsact qdisc; EEXIST if there is one."""
        body = TCMSG.pack(socket.AF_UNSPEC, index, 0xFFFF0000, TC_H_CLSACT, 0) + attr_str(TCA_KIND, "clsact")
        self.request(RTM_NEWQDISC, NLM_F_CREATE | NLM_F_EXCL, body, f"add clsact qdisc on {index}")

    def bpf_filter_replace(self, index: int, parent: int, fd: int, name: str, *, prio: int,
                           handle: int, classid: int = 1, direct_action: bool = True) -> None:
        """Create or replace the bpf filter (prio, handle) under ``parent``."""
        options = nested(TCA_OPTIONS, attr_u32(TCA_BPF_CLASSID, classid), attr_u32(TCA_BPF_FD, fd),
                         attr_str(TCA_BPF_NAME, name),
                         attr_u32(TCA_BPF_FLAGS, TCA_BPF_FLAG_ACT_DIRECT if direct_action else 0))
        body = TCMSG.pack(socket.AF_UNSPEC, index, handle, parent, filter_info(prio))
        body += attr_str(TCA_KIND, "bpf") + options
        self.request(RTM_NEWTFILTER, NLM_F_CREATE | NLM_F_REPLACE, body,
                     f"replace bpf filter {name} on {index}")

    def filter_del(self, index: int, parent: int, *, prio: int, handle: int, kind: str = "bpf") -> None:
        body = TCMSG.pack(socket.AF_UNSPEC, index, handle, parent, filter_info(prio))
        body += attr_str(TCA_KIND, kind)
        self.request(RTM_DELTFILTER, 0, body, f"delete filter on {index}")


def filter_info(prio: int, protocol: int = ETH_P_ALL) -> int:
    """tcm_info of a filter: priority in the upper 16 bits, the protocol in
    network byte order in the lower (TC_H_MAKE(prio << 16, htons(proto)))."""
    return ((prio << 16) & 0xFFFF0000) | socket.htons(protocol & 0xFFFF)


def tc_handle(text: str) -> int:
    """``"ffff:fff2"`` -> 0xfffffff2 (tc's major:minor in hex)."""
    major, _, minor = text.partition(":")
    return (int(major or "0", 16) << 16) | int(minor or "0", 16)


def parse_link(payload: bytes) -> Link:
    _family, _type, index, flags, _change = IFINFOMSG.unpack_from(payload)
    attrs = parse_attrs(payload, IFINFOMSG.size)
    mtu = attrs.get(IFLA_MTU)
    return Link(index, attrs.get(IFLA_IFNAME, b"").rstrip(b"\0").decode(),
                mac_text(attrs.get(IFLA_ADDRESS, b"")), _U32.unpack(mtu)[0] if mtu else 0, flags)


def _ip_text(family: int, raw: bytes | None) -> str:
    if not raw:
        return ""
    return str(ipaddress.ip_address(raw)) if family in (socket.AF_INET, socket.AF_INET6) else ""


def parse_address(payload: bytes) -> Address:
    family, prefixlen, _flags, _scope, index = IFADDRMSG.unpack_from(payload)
    attrs = parse_attrs(payload, IFADDRMSG.size)
    return Address(family, prefixlen, index, _ip_text(family, attrs.get(IFA_ADDRESS)),
                   _ip_text(family, attrs.get(IFA_LOCAL)))
