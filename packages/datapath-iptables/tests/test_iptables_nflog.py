"""NFLOG wire parsing without a kernel: well-formed, truncated and hostile input."""

from __future__ import annotations

import socket
import struct

from axoneme.datapath.iptables import _nflog as nf
from hypothesis import given, settings
from hypothesis import strategies as st


def _attr(atype: int, data: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(data), atype) + data
    return raw + b"\0" * (-len(raw) % 4)


def _ipv4_tcp(src: str, dst: str, sport: int, dport: int, flags: int) -> bytes:
    ip = bytes([0x45, 0]) + struct.pack("!H", 40) + b"\0" * 5 + bytes([6]) + b"\0\0"
    ip += socket.inet_aton(src) + socket.inet_aton(dst)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 0, 0, 0x50, flags, 0, 0, 0)
    return ip + tcp


def _message(prefix: bytes, payload: bytes, ts: tuple[int, int] | None = (100, 250000)) -> bytes:
    body = struct.pack("!BBH", socket.AF_INET, 0, 7)
    body += _attr(nf.NFULA_PACKET_HDR, struct.pack("!HBB", 0x0800, 2, 0))
    body += _attr(nf.NFULA_PREFIX, prefix + b"\0")
    if ts is not None:
        body += _attr(nf.NFULA_TIMESTAMP, struct.pack("!QQ", *ts))
    body += _attr(nf.NFULA_IFINDEX_INDEV, struct.pack("!I", 12))
    body += _attr(nf.NFULA_PAYLOAD, payload)
    hdr = struct.pack("=IHHII", 16 + len(body), nf.NFNL_SUBSYS_ULOG << 8 | nf.NFULNL_MSG_PACKET, 0, 0, 0)
    return hdr + body


def test_parse_one_packet() -> None:
    pkt = _ipv4_tcp("10.244.1.1", "10.244.1.2", 40000, 8080, 0x02)
    got = list(nf.parse_messages(_message(b"AXON:D:I", pkt) * 2))
    assert len(got) == 2
    assert got[0].prefix == "AXON:D:I" and got[0].indev == 12
    assert got[0].time == 100.25 and got[0].payload == pkt
    ipv, src, dst, l4 = nf.decode_l4(pkt)
    assert (ipv, src, dst) == ("IPv4", "10.244.1.1", "10.244.1.2")
    assert l4 == {"TCP": {"source_port": 40000, "destination_port": 8080, "flags": {"SYN": True}}}


def test_decode_udp_icmp_ipv6() -> None:
    ip6 = struct.pack("!IHBB", 6 << 28, 8, 17, 64) + socket.inet_pton(socket.AF_INET6, "fd00::1") \
        + socket.inet_pton(socket.AF_INET6, "fd00::2") + struct.pack("!HHHH", 5353, 53, 8, 0)
    assert nf.decode_l4(ip6) == ("IPv6", "fd00::1", "fd00::2",
                                 {"UDP": {"source_port": 5353, "destination_port": 53}})
    icmp = bytes([0x45, 0]) + struct.pack("!H", 28) + b"\0" * 5 + bytes([1]) + b"\0\0" \
        + socket.inet_aton("1.1.1.1") + socket.inet_aton("2.2.2.2") + bytes([8, 0, 0, 0])
    assert nf.decode_l4(icmp)[3] == {"ICMPv4": {"type": 8, "code": 0}}
    assert nf.decode_l4(b"") == ("", "", "", {})
    assert nf.decode_l4(b"\x45\x00") == ("", "", "", {})


def test_truncated_and_other_messages_are_skipped() -> None:
    msg = _message(b"AXON:A:E", _ipv4_tcp("1.1.1.1", "2.2.2.2", 1, 2, 0x12), ts=None)
    assert list(nf.parse_messages(msg[:-7])) == []  # cut inside: dropped, no exception
    done = struct.pack("=IHHII", 16, nf.NLMSG_DONE, 0, 0, 0)
    got = list(nf.parse_messages(done + msg))
    assert [p.prefix for p in got] == ["AXON:A:E"]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_garbage_never_raises(data: bytes) -> None:
    def check_l4(payload: bytes) -> None:
        got = nf.decode_l4(payload)
        assert isinstance(got, tuple) and len(got) == 4, got
        assert all(isinstance(x, str) for x in got[:3]) and isinstance(got[3], dict), got

    for pkt in nf.parse_messages(data):
        assert isinstance(pkt.prefix, str) and isinstance(pkt.payload, bytes), pkt
        check_l4(pkt.payload)
    check_l4(data)
