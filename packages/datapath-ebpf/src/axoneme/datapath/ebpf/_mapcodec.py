"""Conversions between core types (Key, Entry, networks, addresses) and the
eBPF maps' keys and values (``_layout``'s ctypes mirrors, or their raw bytes
on the hot paths), and which map each key lives in."""

from __future__ import annotations

import ctypes as ct
import ipaddress
import socket
import struct
from collections.abc import Mapping

from axoneme.core.datapath import IPNetwork
from axoneme.core.mapstate import ADDRESS_IDENTITY, Direction, Entry, Key, Protocol
from axoneme.datapath.ebpf import _layout as L


def policy_key(ep_id: int, key: Key, slot: int = 0) -> L.PolicyKey:
    """The policy map key of ``key``; an address key needs its address's ``slot``."""
    k = L.PolicyKey()
    k.ep_id = ep_id
    k.identity = slot if key.is_address else key.identity
    k.direction = int(key.direction)
    if key.protocol is Protocol.ANY:
        k.prefixlen = L.POLICY_STATIC_PREFIX
    else:
        k.prefixlen = L.POLICY_STATIC_PREFIX + 8 + key.prefix_len
        k.protocol = int(key.protocol)
        k.dport = socket.htons(key.port)
    return k


_PK_HEAD = struct.Struct("=IIIBB")  # DO NOT CHANGE: mirrors struct ax_policy_key (dport follows, big-endian)
_PK_TAIL = b"\0\0\0\0"  # ax_policy_key.pad
_PK_ANY_TAIL = b"\0\0" + _PK_TAIL  # dport 0, pad


def policy_key_bytes(ep_id: int, key: Key, slot: int = 0) -> bytes:
    """policy_key() as raw bytes: the hot path of large batches."""
    ident = slot if key.is_address else key.identity
    if key.protocol is Protocol.ANY:
        return _PK_HEAD.pack(L.POLICY_STATIC_PREFIX, ep_id, ident, key.direction, 0) + _PK_ANY_TAIL
    return _PK_HEAD.pack(L.POLICY_STATIC_PREFIX + 8 + key.prefix_len, ep_id, ident,
                         key.direction, key.protocol) + key.port.to_bytes(2, "big") + _PK_TAIL


_PREFIXLEN = struct.Struct("=I")  # the prefixlen that starts every LPM key
_HASHED_PREFIXES = frozenset((L.POLICY_STATIC_PREFIX, L.POLICY_FULL_PREFIX))


def policy_map_of(raw: bytes) -> str:
    """The map a raw policy key lives in (lib/policy.h): ``ax_policy_hash``
    for prefix 72 (protocol ANY) and 96 (a full port), else the trie."""
    return "ax_policy_hash" if _PREFIXLEN.unpack_from(raw)[0] in _HASHED_PREFIXES else "ax_policy"


def ipcache_map_of(net: IPNetwork) -> str:
    """The map an ipcache entry lives in (lib/ipcache.h): host entries in
    ``ax_ipcache_host``, shorter prefixes in the trie."""
    return "ax_ipcache_host" if net.prefixlen == net.max_prefixlen else "ax_ipcache"


# The endpoint record's NO_* flags (lib/endpoint.h): lookups the programs skip.
_SKIP_MASK = L.EP_F_NO_WILD_INGRESS | L.EP_F_NO_WILD_EGRESS | L.EP_F_NO_ADDR


def skip_bit(key: Key) -> int:
    """The NO_* flag a key of this kind rules out (0: none)."""
    if key.is_address:
        return L.EP_F_NO_ADDR
    if key.identity == 0:
        return L.EP_F_NO_WILD_INGRESS if key.direction is Direction.INGRESS else L.EP_F_NO_WILD_EGRESS
    return 0


def skip_flags(kinds: Mapping[int, int]) -> int:
    """The NO_* flags of an endpoint holding ``kinds`` (NO_* flag -> how many
    keys rule it out)."""
    return _SKIP_MASK & ~sum(bit for bit, n in kinds.items() if n > 0)


def key_from_policy(k: L.PolicyKey, address: str = "") -> Key:
    """The Key of a policy map key; one whose identity is an address slot
    needs the slot's ``address`` (paddr map)."""
    ident = ADDRESS_IDENTITY if address else int(k.identity)
    plen = k.prefixlen - L.POLICY_STATIC_PREFIX
    if plen <= 0:
        return Key(ident, Direction(k.direction), address=address)
    return Key(ident, Direction(k.direction), Protocol(k.protocol),
               socket.ntohs(k.dport), plen - 8, address)


def paddr_key(ep_id: int, address: str) -> L.PolicyAddrKey:
    k = L.PolicyAddrKey()
    k.ep_id = ep_id
    family, raw = _addr_bytes(ipaddress.ip_address(address))
    k.family = family
    ct.memmove(k.addr, raw, 16)
    return k


def address_from_paddr(k: L.PolicyAddrKey) -> str:
    raw = bytes(k.addr)
    return str(ipaddress.ip_address(raw[:4] if k.family == 4 else raw))


def policy_entry(key: Key, entry: Entry) -> L.PolicyEntry:
    v = L.PolicyEntry()
    v.deny = 1 if entry.deny else 0
    v.proxy_port = 0 if entry.deny else entry.proxy_port
    v.flags = (L.POLICY_F_AUDIT if entry.audit else 0) | (L.POLICY_F_AUTH if entry.auth_required else 0)
    v.l4_prefix = key.l4_prefix
    return v


def entry_from_policy(v: L.PolicyEntry) -> Entry:
    sig = (v.deny, v.proxy_port, v.flags)
    e = _ENTRIES.get(sig)
    if e is None:
        e = Entry(deny=bool(v.deny), proxy_port=int(v.proxy_port), audit=bool(v.flags & L.POLICY_F_AUDIT),
                  auth_required=bool(v.flags & L.POLICY_F_AUTH))
        if len(_ENTRIES) < 4096:  # few distinct entries (allow, deny, a proxy port per L7 rule)
            _ENTRIES[sig] = e
    return e


_ENTRIES: dict[tuple[int, int, int], Entry] = {}


def _entry_sig(e: Entry) -> tuple[int, int, int]:
    """(deny, proxy_port, flags) as policy_entry() stores them."""
    return (1 if e.deny else 0, 0 if e.deny else e.proxy_port,
            (L.POLICY_F_AUDIT if e.audit else 0) | (L.POLICY_F_AUTH if e.auth_required else 0))


# DO NOT CHANGE: the head of struct ax_policy_entry (proxy_port, deny, flags), as
# _entry_sig orders them for policy_entry(): what sync compares
_SIG = struct.Struct("=HBB")
# DO NOT CHANGE: the head of struct ax_ipcache_key (prefixlen, family)
_IPC_HEAD = struct.Struct("=IB")
_IPC_VALUE = struct.Struct("=II")  # DO NOT CHANGE: struct ax_ipcache_value (identity, flags)




def _same_entry(a: L.PolicyEntry, b: L.PolicyEntry) -> bool:
    return (a.deny, a.proxy_port, a.flags, a.l4_prefix) == (b.deny, b.proxy_port, b.flags, b.l4_prefix)


def _addr_bytes(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> tuple[int, bytes]:
    return (4, addr.packed + bytes(12)) if addr.version == 4 else (6, addr.packed)


def ipcache_key(net: IPNetwork) -> L.IPCacheKey:
    k = L.IPCacheKey()
    family, raw = _addr_bytes(net.network_address)
    k.family = family
    k.prefixlen = 32 + net.prefixlen
    ct.memmove(k.addr, raw, 16)
    return k


def net_from_ipcache(k: L.IPCacheKey) -> IPNetwork:
    plen = k.prefixlen - 32
    if k.family == 4:
        return ipaddress.IPv4Network((bytes(k.addr)[:4], plen))
    return ipaddress.IPv6Network((bytes(k.addr), plen))


def lxc_key(ip: str) -> L.LxcKey:
    k = L.LxcKey()
    family, raw = _addr_bytes(ipaddress.ip_address(ip.split("/")[0]))
    k.family = family
    ct.memmove(k.addr, raw, 16)
    return k


__all__ = ["address_from_paddr", "entry_from_policy", "ipcache_key", "ipcache_map_of",
           "key_from_policy", "lxc_key", "net_from_ipcache", "paddr_key", "policy_entry",
           "policy_key", "policy_key_bytes", "policy_map_of", "skip_bit", "skip_flags"]
