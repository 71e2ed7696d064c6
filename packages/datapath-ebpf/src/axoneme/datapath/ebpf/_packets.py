"""Crafted frames for BPF_PROG_TEST_RUN (tests and benchmarks). Checksums are
left zero: the programs never verify them."""

from __future__ import annotations

import ipaddress
import struct

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_P_ARP = 0x0806
TCP_SYN = 0x02
TCP_ACK = 0x10

_MACS = bytes.fromhex("020000000002") + bytes.fromhex("020000000001")


def _eth(proto: int) -> bytes:
    return _MACS + struct.pack("!H", proto)


def _l4(proto: int, sport: int, dport: int, flags: int, icmp: tuple[int, int]) -> bytes:
    if proto == 6:
        return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0)
    if proto in (17, 132):
        return struct.pack("!HHHH", sport, dport, 8, 0)
    if proto in (1, 58):
        return struct.pack("!BBHHH", icmp[0], icmp[1], 0, sport, 1)
    return b""


def ipv4(src: str, dst: str, proto: int = 6, sport: int = 40000, dport: int = 80,
         flags: int = TCP_SYN, icmp: tuple[int, int] = (8, 0), payload: bytes = b"") -> bytes:
    l4 = _l4(proto, sport, dport, flags, icmp) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0x4000, 64, proto, 0,
                     ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    return _eth(ETH_P_IP) + ip + l4


def ipv6(src: str, dst: str, proto: int = 6, sport: int = 40000, dport: int = 80,
         flags: int = TCP_SYN, icmp: tuple[int, int] = (128, 0), payload: bytes = b"") -> bytes:
    l4 = _l4(proto, sport, dport, flags, icmp) + payload
    ip = struct.pack("!IHBB16s16s", 6 << 28, len(l4), proto, 64,
                     ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed)
    return _eth(ETH_P_IPV6) + ip + l4


def arp() -> bytes:
    return _eth(ETH_P_ARP) + bytes(28)
