"""MapState: the neutral, datapath-independent form of one endpoint's policy.

Key = (identity, direction, protocol, port, port prefix length[, address]);
Entry = (allow|deny, proxy port, L7 rules, flags). Only datapath packages
turn these into ctypes structs, rule text or ipsets.

Conventions shared by every datapath (mirroring Cilium's LPM policy map):
- identity 0 is the wildcard: any peer.
- protocol 0 is ANY and then port and prefix are 0 (the protocol is
  wildcarded only when the port is). ICMP/ICMPv6 keys carry the ICMP type in
  ``port`` with a full prefix (16).
- ``port`` with ``prefix_len`` p (0..16) covers ports whose top p bits equal
  those of ``port``; port ranges are expanded into such blocks.
- An *address key* (``address`` set, ``identity`` = ``ADDRESS_IDENTITY``)
  matches one peer address, whatever its identity: what a NetworkPolicy
  ``ipBlock`` over pod or node addresses and an egress named port that
  differs between pods of one identity resolve to (docs/address-keys.md).
  ``ADDRESS_IDENTITY`` is never allocated, so a datapath that did not know
  address keys would install a key no packet matches: it fails closed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any


class Direction(IntEnum):
    INGRESS = 0
    EGRESS = 1

    def __str__(self) -> str:
        return self.name


class Protocol(IntEnum):
    ANY = 0
    ICMP = 1
    TCP = 6
    UDP = 17
    ICMPV6 = 58
    SCTP = 132

    @classmethod
    def parse(cls, name: str) -> Protocol:
        # the usual spellings from a dict (no str methods, no EnumMeta.__getitem__)
        found = PROTOCOL_NAMES.get(name)
        if found is not None:
            return found
        return cls[name.upper().replace("ICMPV4", "ICMP")]

    def __str__(self) -> str:
        return {"ICMP": "ICMPv4", "ICMPV6": "ICMPv6"}.get(self.name, self.name)


# Protocol.parse's usual spellings (the policy engine reads it inline too)
PROTOCOL_NAMES: dict[str, Protocol] = {p.name: p for p in Protocol}
PROTOCOL_NAMES["ICMPV4"] = Protocol.ICMP

PORT_BITS = 16
# MapState lookups scan up to this many entries; bigger ones probe their keys
_SCAN_MAX = 64
# The identity of every address key: no packet ever carries it.
ADDRESS_IDENTITY = 0xFFFFFFFF
# Protocols a port rule with protocol ANY expands to (Cilium).
PORT_PROTOCOLS = (Protocol.TCP, Protocol.UDP, Protocol.SCTP)


class Verdict(IntEnum):
    """Decision of one lookup."""

    DENIED = 0  # no entry (default deny)
    ALLOWED = 1
    DENIED_BY_RULE = 2  # an explicit deny entry
    REDIRECTED = 3  # allowed, to an L7 proxy


@dataclass(frozen=True, slots=True, order=True)
class Key:
    """DO NOT CHANGE the field order: datapaths and dumps sort by it."""

    identity: int
    direction: Direction
    protocol: Protocol = Protocol.ANY
    port: int = 0
    prefix_len: int = 0
    address: str = ""  # canonical peer address of an address key, else ""
    # computed once: every dict/set a key passes through (the engine's
    # contributions, pending changes, the datapath's write phases) hashes it
    # again, and a 50k-peer policy is 100k keys (issue 17)
    _hash: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.identity, self.direction, self.protocol,
                                                self.port, self.prefix_len, self.address)))
        if bool(self.address) != (self.identity == ADDRESS_IDENTITY):
            raise ValueError("an address key has identity ADDRESS_IDENTITY and an address")
        if self.protocol is Protocol.ANY and (self.port or self.prefix_len):
            raise ValueError("protocol ANY requires port 0 and prefix 0")
        if not 0 <= self.prefix_len <= PORT_BITS or not 0 <= self.port <= 0xFFFF:
            raise ValueError(f"bad port/prefix {self.port}/{self.prefix_len}")
        mask = port_mask(self.prefix_len)
        if self.port & ~mask & 0xFFFF:
            raise ValueError(f"port {self.port} has bits outside prefix /{self.prefix_len}")

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self) -> tuple[Any, ...]:
        # rebuilt through __init__: str hashes differ between processes
        return (Key, (self.identity, self.direction, self.protocol, self.port,
                      self.prefix_len, self.address))

    @property
    def l4_prefix(self) -> int:
        """How specific the L4 part is: 0 (any protocol) .. 1 + 16 (exact port)."""
        return 0 if self.protocol is Protocol.ANY else 1 + self.prefix_len

    @classmethod
    def for_address(cls, address: str, direction: Direction, protocol: Protocol = Protocol.ANY,
                    port: int = 0, prefix_len: int = 0) -> Key:
        return cls(ADDRESS_IDENTITY, direction, protocol, port, prefix_len, address)

    @property
    def is_address(self) -> bool:
        return bool(self.address)

    def covers(self, other: Key) -> bool:
        """Whether every packet matching ``other`` also matches self (same peer & dir)."""
        if (self.identity != other.identity or self.address != other.address
                or self.direction != other.direction):
            return False
        return self.covers_l4(other)

    def covers_l4(self, other: Key) -> bool:
        if self.protocol is Protocol.ANY:
            return True
        if self.protocol != other.protocol or self.prefix_len > other.prefix_len:
            return False
        mask = port_mask(self.prefix_len)
        return (self.port & mask) == (other.port & mask)

    def matches(self, protocol: Protocol, port: int) -> bool:
        if self.protocol is Protocol.ANY:
            return True
        if self.protocol != protocol:
            return False
        mask = port_mask(self.prefix_len)
        return (self.port & mask) == (port & mask)

    def port_range(self) -> tuple[int, int]:
        """Inclusive range of ports covered (0, 65535 for a wildcard)."""
        if self.protocol is Protocol.ANY or self.prefix_len == 0:
            return 0, 0xFFFF
        size = 1 << (PORT_BITS - self.prefix_len)
        return self.port, self.port + size - 1

    def __str__(self) -> str:
        ident = ("ANY" if self.identity == 0 else
                 f"addr={self.address}" if self.address else str(self.identity))
        if self.protocol is Protocol.ANY:
            l4 = "ANY"
        elif self.prefix_len == 0:
            l4 = f"{self.protocol}"
        elif self.prefix_len == PORT_BITS:
            l4 = f"{self.port}/{self.protocol}"
        else:
            lo, hi = self.port_range()
            l4 = f"{lo}-{hi}/{self.protocol}"
        return f"{self.direction} {ident if self.address else 'id=' + ident} {l4}"


def port_mask(prefix_len: int) -> int:
    return (0xFFFF << (PORT_BITS - prefix_len)) & 0xFFFF if prefix_len else 0


def port_range_to_prefixes(start: int, end: int) -> list[tuple[int, int]]:
    """Split an inclusive port range into (port, prefix_len) blocks."""
    if not 0 <= start <= end <= 0xFFFF:
        raise ValueError(f"bad port range {start}-{end}")
    out: list[tuple[int, int]] = []
    cur = start
    while cur <= end:
        size = 1
        # grow the block while aligned and within the range
        while size < (1 << PORT_BITS) and cur % (size * 2) == 0 and cur + size * 2 - 1 <= end:
            size *= 2
        out.append((cur, PORT_BITS - size.bit_length() + 1))
        cur += size
    return out


@dataclass(frozen=True, slots=True)
class L7Rules:
    """L7 rules attached to a redirected entry: the parser name and its rules.

    ``rules`` holds parser-specific frozen rule objects (core.policy.api); an
    empty tuple means "allow all at L7, but proxy (visibility)".
    """

    parser: str
    rules: tuple[Any, ...] = ()


@dataclass(frozen=True, slots=True)
class Entry:
    """What a key decides. Equality covers what a datapath holds.

    ``proxy_port`` is 0 when not redirected. ``l7`` and ``derived_from``
    (policy/rule references for trace and flows) are agent-side only and so
    excluded from equality: ``dump()`` of a datapath compares equal to the
    resolved MapState.

    ``audit`` on an allow entry: the packets it decides are forwarded but
    reported with verdict AUDIT (a staged policy or audit mode would drop
    them); ``audited_by`` names those policies (agent-side, like
    ``derived_from``). Only ``core.policy.audit.stage`` sets it.
    """

    deny: bool = False
    proxy_port: int = 0
    audit: bool = False
    auth_required: bool = False
    l7: L7Rules | None = field(default=None, compare=False)
    derived_from: frozenset[str] = field(default=frozenset(), compare=False)
    audited_by: frozenset[str] = field(default=frozenset(), compare=False)

    @property
    def is_redirect(self) -> bool:
        return not self.deny and self.proxy_port != 0

    def __str__(self) -> str:
        if self.deny:
            return "deny"
        if self.proxy_port:
            return f"redirect:{self.proxy_port}"
        return "allow(audit)" if self.audit else "allow"


ALLOW = Entry()
DENY = Entry(deny=True)


@dataclass(frozen=True, slots=True)
class Decision:
    """Result of ``MapState.lookup``: the verdict and the deciding key/entry."""

    verdict: Verdict
    key: Key | None = None
    entry: Entry | None = None

    @property
    def allowed(self) -> bool:
        return self.verdict in (Verdict.ALLOWED, Verdict.REDIRECTED)


@dataclass(frozen=True, slots=True)
class MapChanges:
    """The minimal change between two MapStates of one endpoint."""

    adds: Mapping[Key, Entry] = field(default_factory=dict)
    deletes: frozenset[Key] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.adds) or bool(self.deletes)

    def __len__(self) -> int:
        return len(self.adds) + len(self.deletes)


class MapState(Mapping[Key, Entry]):
    """Key -> Entry for one endpoint, with the lookup every datapath mirrors."""

    __slots__ = ("_entries",)

    def __init__(self, entries: Mapping[Key, Entry] | Iterable[tuple[Key, Entry]] = ()) -> None:
        self._entries: dict[Key, Entry] = dict(entries)

    def __getitem__(self, key: Key) -> Entry:
        return self._entries[key]

    def __iter__(self) -> Iterator[Key]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, MapState):
            return self._entries == other._entries
        if isinstance(other, Mapping):
            return self._entries == dict(other)
        return NotImplemented

    def __repr__(self) -> str:
        return "MapState({" + ", ".join(f"{k}: {v}" for k, v in sorted(self._entries.items())) + "})"

    def diff(self, new: MapState) -> MapChanges:
        """Changes that turn self into ``new``."""
        adds = {k: v for k, v in new._entries.items() if self._entries.get(k) != v or
                (k in self._entries and self._entries[k].l7 != v.l7)}
        deletes = frozenset(k for k in self._entries if k not in new._entries)
        return MapChanges(adds, deletes)

    def apply(self, changes: MapChanges) -> MapState:
        out = dict(self._entries)
        for k in changes.deletes:
            out.pop(k, None)
        out.update(changes.adds)
        return MapState(out)

    def direction(self, direction: Direction) -> MapState:
        return MapState({k: v for k, v in self._entries.items() if k.direction == direction})

    @classmethod
    def view(cls, entries: dict[Key, Entry]) -> MapState:
        """``entries`` as a MapState without copying them: only while nobody
        changes them (the engine's lookups, under its lock)."""
        ms = cls.__new__(cls)
        ms._entries = entries
        return ms

    def _longest(self, identity: int, direction: Direction, protocol: Protocol, port: int,
                 address: str = "") -> tuple[Key, Entry] | None:
        if len(self._entries) > _SCAN_MAX:
            return self._longest_indexed(identity, direction, protocol, port, address)
        best: tuple[Key, Entry] | None = None
        for key, entry in self._entries.items():
            if key.identity != identity or key.direction != direction or key.address != address:
                continue
            if not key.matches(protocol, port):
                continue
            if best is None or key.l4_prefix > best[0].l4_prefix:
                best = (key, entry)
        return best

    def _longest_indexed(self, identity: int, direction: Direction, protocol: Protocol,
                         port: int, address: str) -> tuple[Key, Entry] | None:
        """``_longest`` by probing the keys that could match (one per L4 prefix
        length: a key holds no port bits outside its prefix), longest first:
        O(1) in the size of the MapState (flow attribution on a 200k-entry
        endpoint)."""
        if (identity == ADDRESS_IDENTITY) != bool(address) or not 0 <= port <= 0xFFFF:
            return None
        get = self._entries.get
        if protocol is not Protocol.ANY:
            for plen in range(PORT_BITS, -1, -1):
                key = Key(identity, direction, protocol, port & port_mask(plen), plen, address)
                entry = get(key)
                if entry is not None:
                    return key, entry
        key = Key(identity, direction, Protocol.ANY, 0, 0, address)
        entry = get(key)
        return (key, entry) if entry is not None else None

    def lookup(self, identity: int, direction: Direction, protocol: Protocol, port: int,
               address: str | None = None) -> Decision:
        """The decision every datapath implements (Cilium's LPM policy lookup,
        plus the address keys of NetworkPolicy semantics).

        For ICMP, ``port`` is the ICMP type; ``address`` is the peer's address
        (canonical text; None: address keys are not consulted).

        1. Find the longest L4 match among keys for the peer's identity, among
           address keys for the peer's address, and among wildcard-identity
           (0) keys.
        2. If any match is a deny entry, the packet is denied: deny wins
           over any allow regardless of specificity (resolution removes allows
           that a same-peer deny covers, so LPM cannot shadow a deny).
        3. Otherwise the match with the longest L4 prefix decides; on a tie the
           address match, then the identity-specific one.
        4. No match: denied (the endpoint is enforcing this direction; an
           unenforced direction holds an allow-all wildcard entry).
        """
        specific = self._longest(identity, direction, protocol, port) if identity else None
        by_address = (self._longest(ADDRESS_IDENTITY, direction, protocol, port, address)
                      if address else None)
        wildcard = self._longest(0, direction, protocol, port)
        return decide(specific, by_address, wildcard)


def decide(specific: tuple[Key, Entry] | None, by_address: tuple[Key, Entry] | None,
           wildcard: tuple[Key, Entry] | None) -> Decision:
    """Steps 2-4 of ``MapState.lookup`` over the three longest matches."""
    cands = [c for c in (by_address, specific, wildcard) if c is not None]
    for cand in cands:
        if cand[1].deny:
            return Decision(Verdict.DENIED_BY_RULE, cand[0], cand[1])
    if not cands:
        return Decision(Verdict.DENIED)
    chosen = cands[0]
    for cand in cands[1:]:
        if cand[0].l4_prefix > chosen[0].l4_prefix:
            chosen = cand
    verdict = Verdict.REDIRECTED if chosen[1].is_redirect else Verdict.ALLOWED
    return Decision(verdict, chosen[0], chosen[1])
