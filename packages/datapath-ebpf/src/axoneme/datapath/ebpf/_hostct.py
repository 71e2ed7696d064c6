"""Connections the host had before its firewall attached: tracked, so they live on.

CT entries are made by the programs on the node's devices, from the packets
they see. A TCP connection the node opened before ``ax_from_netdev`` and
``ax_to_netdev`` were attached has no entry, and once a host policy selects
the host, its next inbound packet is a "new" packet from the peer and meets
the host's ingress default deny. A connection that only receives (a
Kubernetes watch: the API server sends, the node only acknowledges) never
gets an entry again, so it hangs until the client's read timeout. The
agent's own watches of the API server are such connections.

So when the host endpoint first attaches to a device, every ESTABLISHED TCP
connection of the node's network namespace (``/proc/self/net/tcp{,6}``)
gets an entry in the orientation it was opened, as Linux conntrack's
pick-up of mid-stream connections would:
- local port in LISTEN on that address (or the wildcard): the peer opened it;
  the forward direction is inbound, so the host's ingress policy still
  polices every inbound packet (revocation as for any tracked connection);
- otherwise the node opened it: the forward direction is outbound (policed
  by the host's egress policy) and inbound packets are its replies.
An entry already there is kept (``BPF_NOEXIST``). The entries carry no
cached verdict: policy decides the next forward packet.
"""

from __future__ import annotations

import ctypes as ct
import errno
import socket
import time
from pathlib import Path

from axoneme.core.endpoint import HOST_ENDPOINT_ID
from axoneme.core.identity import ReservedIdentity
from axoneme.datapath.ebpf import _bpf
from axoneme.datapath.ebpf import _layout as L

_ESTABLISHED, _LISTEN = "01", "0A"
_HOST_ID, _WORLD_ID = int(ReservedIdentity.HOST), int(ReservedIdentity.WORLD)
_LOOPBACK6 = socket.inet_pton(socket.AF_INET6, "::1")
_WILDCARD = (b"\0" * 4, b"\0" * 16)


def _addr(hexaddr: str) -> bytes:
    """/proc/net/tcp's address: 32-bit words in host byte order."""
    raw = bytes.fromhex(hexaddr)
    return b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))


def tcp_sockets(proc_net: Path = Path("/proc/self/net")) -> tuple[
        list[tuple[int, bytes, int, bytes, int]], set[tuple[bytes, int]]]:
    """(established [(family, local, lport, remote, rport)], listening {(local, lport)})
    of this network namespace; addresses are 4 or 16 bytes."""
    established: list[tuple[int, bytes, int, bytes, int]] = []
    listening: set[tuple[bytes, int]] = set()
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        try:
            lines = (proc_net / name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 4:
                continue
            (laddr, lport), (raddr, rport) = (f.split(":") for f in fields[1:3])
            local, lp = _addr(laddr), int(lport, 16)
            if fields[3] == _LISTEN:
                listening.add((local, lp))
            elif fields[3] == _ESTABLISHED:
                established.append((family, local, lp, _addr(raddr), int(rport, 16)))
    return established, listening


def _tuple(family: int, src: bytes, sport: int, dst: bytes, dport: int) -> L.Tuple:
    t = L.Tuple()
    ct.memmove(t.saddr, src, len(src))
    ct.memmove(t.daddr, dst, len(dst))
    t.sport, t.dport = socket.htons(sport), socket.htons(dport)
    t.proto, t.family = socket.IPPROTO_TCP, 4 if family == socket.AF_INET else 6
    return t


def _v4(addr: bytes) -> bytes:
    """An IPv4-mapped IPv6 address (a tcp6 socket serving IPv4) as its 4 bytes."""
    if len(addr) == 16 and addr[:12] == b"\0" * 10 + b"\xff\xff":
        return addr[12:]
    return addr


def seed_host_connections(ct_fd: int, proc_net: Path = Path("/proc/self/net")) -> int:
    """Track the namespace's established TCP connections (module docstring).
    Returns how many entries were written."""
    established, listening = tcp_sockets(proc_net)
    now = time.monotonic_ns()  # bpf_ktime_get_ns: CLOCK_MONOTONIC
    written = 0
    for family, local, lport, remote, rport in established:
        local, remote = _v4(local), _v4(remote)
        if local[:1] == b"\x7f" or local == _LOOPBACK6:
            continue  # loopback never crosses a device
        family = socket.AF_INET if len(local) == 4 else socket.AF_INET6
        inbound = any((a, lport) in listening for a in (local, *_WILDCARD)) or any(
            len(a) == 16 and _v4(a) == local and p == lport for a, p in listening)
        entry = L.CTEntry(created=now, last_seen=now, ep_id=HOST_ENDPOINT_ID)
        if inbound:
            key = _tuple(family, remote, rport, local, lport)
            entry.src_identity, entry.dst_identity = _WORLD_ID, _HOST_ID
        else:
            key = _tuple(family, local, lport, remote, rport)
            entry.src_identity, entry.dst_identity = _HOST_ID, _WORLD_ID
        try:
            _bpf.map_update(ct_fd, key, entry, _bpf.BPF_NOEXIST)
            written += 1
        except OSError as e:
            if e.errno != errno.EEXIST:
                raise
    return written


__all__ = ["seed_host_connections", "tcp_sockets"]
