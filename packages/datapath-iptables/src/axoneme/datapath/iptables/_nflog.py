"""A small NFLOG reader: raw AF_NETLINK / NETLINK_NETFILTER, nfnetlink_log.

The format is a few TLVs, so we speak it directly (as axoneme.core.netlink
does rtnetlink): bind a group, ask for packet copies, and parse NFULNL_MSG_PACKET
messages into (prefix, timestamp, payload).
"""

from __future__ import annotations

import errno
import select
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass

from axoneme.core.errors import DatapathProgramError

# DO NOT CHANGE: mirrors linux/netfilter/nfnetlink_log.h and linux/netlink.h
NETLINK_NETFILTER = 12
NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET = 0
NFULNL_MSG_CONFIG = 1
NFULA_CFG_CMD = 1
NFULA_CFG_MODE = 2
NFULA_CFG_FLAGS = 6
NFULNL_CFG_CMD_BIND = 1
NFULNL_CFG_CMD_UNBIND = 2
NFULNL_COPY_PACKET = 2
NFULA_PACKET_HDR = 1
NFULA_TIMESTAMP = 3
NFULA_IFINDEX_INDEV = 4
NFULA_IFINDEX_OUTDEV = 5
NFULA_PAYLOAD = 9
NFULA_PREFIX = 10
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 1
NLM_F_ACK = 4
_NLHDR = struct.Struct("=IHHII")
_NFGEN = struct.Struct("!BBH")  # family, version, res_id (big endian)
_NLA = struct.Struct("=HH")


@dataclass(frozen=True, slots=True)
class LogPacket:
    prefix: str
    time: float
    payload: bytes
    indev: int = 0
    outdev: int = 0


def _attr(atype: int, data: bytes) -> bytes:
    raw = _NLA.pack(_NLA.size + len(data), atype) + data
    return raw + b"\0" * (-len(raw) % 4)


def _attrs(buf: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    off = 0
    while off + _NLA.size <= len(buf):
        alen, atype = _NLA.unpack_from(buf, off)
        if alen < _NLA.size or off + alen > len(buf):
            break  # truncated or corrupt: keep what we parsed
        out[atype & 0x3FFF] = buf[off + _NLA.size: off + alen]
        off += (alen + 3) & ~3
    return out


def parse_messages(data: bytes) -> Iterator[LogPacket]:
    """Packets in one netlink datagram; anything malformed is skipped."""
    off = 0
    while off + _NLHDR.size <= len(data):
        mlen, mtype, _flags, _seq, _pid = _NLHDR.unpack_from(data, off)
        if mlen < _NLHDR.size or off + mlen > len(data):
            return
        body = data[off + _NLHDR.size: off + mlen]
        off += (mlen + 3) & ~3
        if mtype != (NFNL_SUBSYS_ULOG << 8 | NFULNL_MSG_PACKET) or len(body) < _NFGEN.size:
            continue
        attrs = _attrs(body[_NFGEN.size:])
        prefix = attrs.get(NFULA_PREFIX, b"").split(b"\0", 1)[0].decode("ascii", "replace")
        ts = time.time()
        raw_ts = attrs.get(NFULA_TIMESTAMP)
        if raw_ts and len(raw_ts) >= 16:
            sec, usec = struct.unpack_from("!QQ", raw_ts)
            ts = sec + usec / 1e6
        indev = attrs.get(NFULA_IFINDEX_INDEV)
        outdev = attrs.get(NFULA_IFINDEX_OUTDEV)
        yield LogPacket(prefix, ts, attrs.get(NFULA_PAYLOAD, b""),
                        struct.unpack("!I", indev)[0] if indev and len(indev) == 4 else 0,
                        struct.unpack("!I", outdev)[0] if outdev and len(outdev) == 4 else 0)


class NflogSocket:
    """One bound NFLOG group."""

    def __init__(self, group: int) -> None:
        self.group = group
        self._seq = 0
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            self.sock.bind((0, 0))
            self._config(_attr(NFULA_CFG_CMD, struct.pack("B", NFULNL_CFG_CMD_BIND) + b"\0" * 3))
            self._config(_attr(NFULA_CFG_MODE, struct.pack("!IBB", 0xFFFF, NFULNL_COPY_PACKET, 0)))
        except OSError as e:
            self.sock.close()
            raise DatapathProgramError(f"nflog bind group {group}", e.errno, str(e)) from e

    def _config(self, attrs: bytes) -> None:
        self._seq += 1
        body = _NFGEN.pack(socket.AF_UNSPEC, 0, self.group) + attrs
        msg = _NLHDR.pack(_NLHDR.size + len(body), NFNL_SUBSYS_ULOG << 8 | NFULNL_MSG_CONFIG,
                          NLM_F_REQUEST | NLM_F_ACK, self._seq, 0) + body
        self.sock.send(msg)
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.sock], [], [], 0.5)
            if not ready:
                continue
            data = self.sock.recv(65536)
            off = 0
            while off + _NLHDR.size <= len(data):
                mlen, mtype, _f, seq, _p = _NLHDR.unpack_from(data, off)
                if mtype == NLMSG_ERROR and seq == self._seq:
                    code = struct.unpack_from("=i", data, off + _NLHDR.size)[0]
                    if code:
                        raise OSError(-code, errno.errorcode.get(-code, "error"))
                    return
                if mlen < _NLHDR.size:
                    break
                off += (mlen + 3) & ~3
        raise OSError(errno.ETIMEDOUT, "no netlink ack")

    def read(self, timeout: float) -> list[LogPacket]:
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            return []
        try:
            # never block: close() from another thread must end a reader
            data = self.sock.recv(1 << 17, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return []
        except OSError as e:
            if e.errno == errno.ENOBUFS:  # we fell behind: the kernel dropped some logs
                return []
            raise
        return list(parse_messages(data))

    def close(self) -> None:
        # Closing the socket unbinds the group (the kernel drops instances of
        # a released port id); asking for an UNBIND ack here would race with
        # a reader thread on the same socket.
        self.sock.close()


def decode_l4(payload: bytes) -> tuple[str, str, str, dict[str, object]]:
    """(ip version, source, destination, Hubble-shaped l4) of an IP packet."""
    if not payload:
        return "", "", "", {}
    version = payload[0] >> 4
    if version == 4 and len(payload) >= 20:
        ihl = (payload[0] & 0x0F) * 4
        proto = payload[9]
        src = socket.inet_ntop(socket.AF_INET, payload[12:16])
        dst = socket.inet_ntop(socket.AF_INET, payload[16:20])
        l4 = payload[ihl:]
        ipv = "IPv4"
    elif version == 6 and len(payload) >= 40:
        proto = payload[6]
        src = socket.inet_ntop(socket.AF_INET6, payload[8:24])
        dst = socket.inet_ntop(socket.AF_INET6, payload[24:40])
        l4 = payload[40:]
        ipv = "IPv6"
    else:
        return "", "", "", {}
    out: dict[str, object] = {}
    if proto in (6, 17, 132) and len(l4) >= 4:
        sport, dport = struct.unpack_from("!HH", l4)
        name = {6: "TCP", 17: "UDP", 132: "SCTP"}[proto]
        info: dict[str, object] = {"source_port": sport, "destination_port": dport}
        if proto == 6 and len(l4) >= 14:
            bits = l4[13]
            names = ("FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR")
            info["flags"] = {n: True for i, n in enumerate(names) if bits & (1 << i)}
        out[name] = info
    elif proto in (1, 58) and len(l4) >= 2:
        out["ICMPv4" if proto == 1 else "ICMPv6"] = {"type": l4[0], "code": l4[1]}
    return ipv, src, dst, out
