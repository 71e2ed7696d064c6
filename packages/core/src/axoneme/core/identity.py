"""Security identities: numbers for label sets, as Cilium allocates them.

Reserved numbers are fixed (DESIGN.md). Cluster identities start at 256 and
are derived from the labels (a stable hash, probing on collision) so the same
labels get the same number on every node and after a restart; the allocator's
state can be persisted and restored (``snapshot``/``restore``) and a store
shared between nodes (etcd/CRD) plugs in through ``IdentityStore``. CIDR and
FQDN identities are node-local: ``1 << 24 | n``.

With a store the cluster is the truth: a number's label set is what the store
holds, identities other nodes allocated arrive through ``learn``/``forget``
(the store's watch), an identity this node no longer uses stays known until
the store drops it, and when two numbers hold one label set (a race the
store could not prevent) ``lookup``/``allocate`` answer the lowest, so every
node converges on it (agent/_identityk8s.py).
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Protocol

from axoneme.core._identityview import IdentitySnapshot
from axoneme.core.errors import IdentityError
from axoneme.core.labels import SOURCE_CIDR, SOURCE_RESERVED, Label, Labels, PrefixLabels

LOG = logging.getLogger(__name__)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ReservedIdentity(IntEnum):
    UNKNOWN = 0
    HOST = 1
    WORLD = 2
    UNMANAGED = 3
    HEALTH = 4
    INIT = 5
    REMOTE_NODE = 6
    KUBE_APISERVER = 7
    INGRESS = 8
    WORLD_IPV4 = 9
    WORLD_IPV6 = 10


RESERVED_NAMES: Mapping[ReservedIdentity, str] = {
    ReservedIdentity.HOST: "host",
    ReservedIdentity.WORLD: "world",
    ReservedIdentity.UNMANAGED: "unmanaged",
    ReservedIdentity.HEALTH: "health",
    ReservedIdentity.INIT: "init",
    ReservedIdentity.REMOTE_NODE: "remote-node",
    ReservedIdentity.KUBE_APISERVER: "kube-apiserver",
    ReservedIdentity.INGRESS: "ingress",
    ReservedIdentity.WORLD_IPV4: "world-ipv4",
    ReservedIdentity.WORLD_IPV6: "world-ipv6",
}

MIN_CLUSTER_IDENTITY = 256
MAX_CLUSTER_IDENTITY = 65535
LOCAL_IDENTITY_FLAG = 1 << 24
MAX_LOCAL_IDENTITY = (2 << 24) - 1


@dataclass(frozen=True, slots=True)
class Identity:
    """A numeric identity and the labels it stands for.

    ``cidr`` is set for CIDR identities (node-local) so selectors can match
    by prefix containment rather than by label strings.
    """

    id: int
    labels: Labels
    cidr: IPNetwork | None = field(default=None, compare=False)

    @property
    def reserved(self) -> bool:
        return 0 < self.id < MIN_CLUSTER_IDENTITY

    @property
    def local(self) -> bool:
        return bool(self.id & LOCAL_IDENTITY_FLAG)

    @property
    def is_world(self) -> bool:
        """World or a CIDR identity (CIDR identities carry reserved:world)."""
        return self.id in (ReservedIdentity.WORLD, ReservedIdentity.WORLD_IPV4,
                           ReservedIdentity.WORLD_IPV6) or self.cidr is not None

    def label_strings(self) -> list[str]:
        return self.labels.sorted_strings()


def reserved_identity(rid: ReservedIdentity) -> Identity:
    labels = Labels([Label(SOURCE_RESERVED, RESERVED_NAMES[rid])])
    if rid is ReservedIdentity.KUBE_APISERVER:
        labels = labels.union([Label(SOURCE_RESERVED, "remote-node")])
    cidr: IPNetwork | None = None
    return Identity(int(rid), labels, cidr)


RESERVED_IDENTITIES: tuple[Identity, ...] = tuple(reserved_identity(r) for r in RESERVED_NAMES)


_WORLD_STRING = f"{SOURCE_RESERVED}:world"
_CIDR_PREFIX = f"{SOURCE_CIDR}:"


def cidr_labels(net: IPNetwork) -> Labels:
    """Labels of a CIDR identity: its prefix and reserved:world (Cilium)."""
    return Labels([Label(SOURCE_CIDR, str(net).replace(":", "-")), Label(SOURCE_RESERVED, "world")])


class IdentityStore(Protocol):
    """Where allocations are shared (a file for one node; etcd/CRD for many).

    Who implements: cluster stores (the agent's CRD store, agent/_identityk8s.py;
    a plugin's etcd store through ``axoneme_identity_store``). A store may also
    have ``acquire(number, labels)``: called (allocator lock held) when this node
    starts using an identity it did not allocate itself, so the store can take
    back a garbage collector's mark; it raises IdentityError when the identity
    is gone and cannot be had again (the allocator then probes on).
    """

    def load(self) -> Mapping[int, list[str]]: ...

    def claim(self, number: int, labels: list[str]) -> bool:
        """Claim ``number`` for ``labels``; False if another label set holds it.
        Raises IdentityError when the store cannot answer (no probing on)."""
        ...


def preferred_number(key: tuple[str, ...], bits: int = 16) -> int:
    """Where probing starts for a label set (sorted label strings).

    ``bits`` < 16 shrinks the hash to ``2**bits`` first choices (256 up): a
    test knob (the agent's ``identity_hash_bits``) that makes many label sets
    collide, so probing and the store's arbitration run on every allocation."""
    digest = hashlib.sha256("\n".join(key).encode()).digest()
    span = MAX_CLUSTER_IDENTITY - MIN_CLUSTER_IDENTITY + 1
    if bits < 16:
        span = 1 << max(bits, 0)
    return MIN_CLUSTER_IDENTITY + int.from_bytes(digest[:8], "big") % span


class IdentityAllocator:
    """Allocates cluster identities from labels and local identities for CIDRs.

    Thread-safe. Cluster numbers start at a hash of the sorted label strings,
    so the same labels get the same number everywhere; on a collision the
    allocator probes upwards (and, with a shared store, the store arbitrates).
    """

    def __init__(self, store: IdentityStore | None = None,
                 preferred: Callable[[tuple[str, ...]], int] = preferred_number) -> None:
        self._lock = threading.RLock()
        self._preferred = preferred  # tests force collisions with a constant
        self._by_id: dict[int, Identity] = {i.id: i for i in RESERVED_IDENTITIES}
        self._by_labels: dict[tuple[str, ...], Identity] = {
            tuple(i.label_strings()): i for i in RESERVED_IDENTITIES
        }
        self._cidr: dict[IPNetwork, Identity] = {}
        # restored CIDR identities not asked for yet: prefix text -> number
        # (see restore; any other read settles them first)
        self._lazy_cidr: dict[str, int] = {}
        self._next_local = 1
        self._refs: dict[int, int] = {}
        # numbers the store gives other labels while this node still holds them
        # (``disown``): no longer the answer for their label set
        self._disowned: set[int] = set()
        # snapshot(), kept current once asked for (the agent reads it on every state write)
        self._snap: dict[int, list[str]] | None = None
        self._store = store
        if store is not None:
            self.restore(store.load())

    @property
    def shared(self) -> bool:
        """Whether a store shared between nodes arbitrates (allocate may block on it)."""
        return self._store is not None

    # -- cluster identities -------------------------------------------------
    def allocate(self, labels: Labels) -> Identity:
        """The identity of ``labels`` (allocating one if new). Idempotent."""
        key = tuple(labels.sorted_strings())
        with self._lock:
            self._settle()
            found = self._labelled(key)
            if found is not None and self._acquired(found, key):
                self._refs[found.id] = self._refs.get(found.id, 0) + 1
                return found
            number = self._preferred(key)
            span = MAX_CLUSTER_IDENTITY - MIN_CLUSTER_IDENTITY + 1
            for _ in range(span):
                if number not in self._by_id and (
                    self._store is None or self._store.claim(number, list(key))
                ):
                    ident = Identity(number, labels)
                    self._by_id[number] = ident
                    self._index(key, ident)
                    self._refs[number] = 1
                    self._snapped(ident)
                    return ident
                number = MIN_CLUSTER_IDENTITY + (number - MIN_CLUSTER_IDENTITY + 1) % span
            raise IdentityError("cluster identity space 256-65535 is exhausted")

    def _acquired(self, found: Identity, key: tuple[str, ...]) -> bool:
        """Whether a known identity can be used: a store's, unused here so far,
        is acquired from the store first (its GC mark taken back); one the
        store lost is forgotten and the caller allocates anew."""
        acquire = getattr(self._store, "acquire", None)
        if acquire is None or found.reserved or found.local or self._refs.get(found.id, 0) > 0:
            return True
        try:
            acquire(found.id, list(key))
            return True
        except IdentityError:
            self._drop(found)
            return False

    def _index(self, key: tuple[str, ...], ident: Identity) -> None:
        """``_by_labels`` names the lowest number holding a label set."""
        if ident.id in self._disowned:
            return
        old = self._by_labels.get(key)
        if old is None or old.id not in self._by_id or ident.id < old.id:
            self._by_labels[key] = ident

    def _drop(self, ident: Identity) -> None:
        """Forget a number (no references left); another number holding the same
        label set (a duplicate) becomes the answer for it."""
        self._by_id.pop(ident.id, None)
        self._refs.pop(ident.id, None)
        self._disowned.discard(ident.id)
        key = tuple(ident.label_strings())
        if self._by_labels.get(key) is ident:
            del self._by_labels[key]
            for other in self._by_id.values():  # a CIDR identity never holds its label set
                if not other.local and tuple(other.label_strings()) == key:
                    self._index(key, other)
        if self._snap is not None:
            self._snap.pop(ident.id, None)
        if ident.cidr is not None:
            self._cidr.pop(ident.cidr, None)

    # -- what a shared store says (its watch) ----------------------------------------
    def learn(self, number: int, strings: Iterable[str]) -> bool:
        """The store holds ``number`` for these labels (another node's, or ours).
        False (and nothing changed) when this node uses ``number`` for other
        labels: the caller must settle that with the store."""
        labels = Labels.from_strings(strings)
        key = tuple(labels.sorted_strings())
        with self._lock:
            self._settle()
            old = self._by_id.get(number)
            if old is not None and tuple(old.label_strings()) == key:
                return True
            if old is not None:
                if self._refs.get(number, 0) > 0:
                    return False
                self._drop(old)
            ident = Identity(number, labels)
            self._by_id[number] = ident
            self._refs.setdefault(number, 0)
            self._index(key, ident)
            self._snapped(ident)
            return True

    def disown(self, number: int) -> bool:
        """The store holds ``number`` for other labels than this node, which
        still uses it (its delete and re-creation for another label set
        crossed this node's use): it stops being the answer for its label set,
        so the holders can move to another number (allocate), then ``forget``
        it and ``learn`` what the store says. False when unknown or not ours."""
        with self._lock:
            self._settle()
            ident = self._by_id.get(number)
            if ident is None or ident.reserved or ident.local:
                return False
            self._disowned.add(number)
            key = tuple(ident.label_strings())
            if self._by_labels.get(key) is ident:
                del self._by_labels[key]
                for other in self._by_id.values():
                    if not other.local and other is not ident \
                            and tuple(other.label_strings()) == key:
                        self._index(key, other)
            return True

    def forget(self, number: int) -> bool:
        """The store dropped ``number``. False (still known) while this node uses
        it: the caller puts it back into the store."""
        with self._lock:
            self._settle()
            ident = self._by_id.get(number)
            if ident is None or ident.reserved or ident.local:
                return True
            if self._refs.get(number, 0) > 0:
                return False
            self._drop(ident)
            return True

    def references(self) -> dict[int, int]:
        """Identities this node uses: number -> references (endpoints)."""
        with self._lock:
            self._settle()
            return {n: r for n, r in self._refs.items() if r > 0}

    def release(self, identity: Identity) -> bool:
        """Drop one reference; returns True when the identity was freed."""
        with self._lock:
            self._settle()
            if identity.reserved or identity.id not in self._refs:
                return False
            self._refs[identity.id] -= 1
            if self._refs[identity.id] > 0:
                return False
            if self._store is not None and not identity.local:
                # still allocated in the store (other nodes may use it): its
                # garbage collector decides, and ``forget`` tells us
                self._refs[identity.id] = 0
                return True
            self._drop(self._by_id[identity.id])
            return True

    # -- local (CIDR) identities ---------------------------------------------
    def allocate_cidr(self, net: IPNetwork) -> Identity:
        """Node-local identity for a prefix (``1 << 24 | n``). Idempotent."""
        with self._lock:
            found = self._cidr.get(net)
            if found is not None:
                return found
            # == cidr_labels(net) and its label_strings() ("cidr:" sorts before
            # "reserved:"), without sorting Label objects or printing the
            # prefix twice: a 100k-prefix policy allocates 100k of these
            text = str(net).replace(":", "-")
            restored = self._lazy_cidr.pop(text, None) if self._lazy_cidr else None
            if restored is not None:
                if not self._lazy_cidr:  # all asked for: drop the emptied table too
                    self._lazy_cidr = {}
                # no reference count, as a new one (a 100k-prefix restart: 100k entries)
                return self._add_cidr(restored, net, text)
            if self._next_local > MAX_LOCAL_IDENTITY - LOCAL_IDENTITY_FLAG:
                raise IdentityError("local identity space is exhausted")
            number = LOCAL_IDENTITY_FLAG | self._next_local
            while number in self._by_id:
                self._next_local += 1
                number = LOCAL_IDENTITY_FLAG | self._next_local
            self._next_local += 1
            return self._add_cidr(number, net, text)

    def release_cidr(self, ident: Identity) -> bool:
        """Forget a CIDR identity no selector or ipcache entry uses any more
        (the engine dropped its prefix's last reference), as Cilium releases
        one: a policy replaced by one with other /32 peers no longer keeps the
        old ones. Its number is not given out again by this process."""
        with self._lock:
            if ident.cidr is None or self._cidr.get(ident.cidr) is not ident:
                return False
            self._drop(ident)
            return True

    def _add_cidr(self, number: int, net: IPNetwork, text: str) -> Identity:
        # labels made when read, found by prefix (not in _by_labels), listed
        # by snapshot() when read: nothing per identity but it and its entries
        ident = Identity(number, PrefixLabels(net), net)
        self._cidr[net] = ident
        self._by_id[number] = ident
        return ident

    def _labelled(self, key: tuple[str, ...]) -> Identity | None:
        """The identity holding a label set (sorted strings): CIDR ones by prefix."""
        found = self._by_labels.get(key)
        if found is None and len(key) == 2 and key[1] == _WORLD_STRING and key[0].startswith(
                _CIDR_PREFIX):
            try:
                found = self._cidr.get(ipaddress.ip_network(key[0][len(_CIDR_PREFIX):].replace(
                    "-", ":")))
            except ValueError:
                return None
            if found is not None and found.label_strings() != list(key):
                return None  # "cidr:10.0.0.1" names no identity of 10.0.0.1/32
        return found

    def _settle(self) -> None:
        """Create the restored CIDR identities nothing asked for yet (under the lock)."""
        if not self._lazy_cidr:
            return
        lazy, self._lazy_cidr = self._lazy_cidr, {}
        for text, number in lazy.items():
            try:
                net = ipaddress.ip_network(text.replace("-", ":"))
            except ValueError:
                LOG.warning("restored identity %d: bad prefix %r, dropped", number, text)
                continue
            if net in self._cidr or number in self._by_id:
                continue
            self._add_cidr(number, net, text)

    def cidr_identities(self) -> dict[IPNetwork, Identity]:
        with self._lock:
            self._settle()
            return dict(self._cidr)

    # -- lookup / persistence -------------------------------------------------
    def get(self, number: int) -> Identity | None:
        with self._lock:
            self._settle()
            return self._by_id.get(number)

    def lookup(self, labels: Labels) -> Identity | None:
        with self._lock:
            self._settle()
            return self._labelled(tuple(labels.sorted_strings()))

    def all(self) -> list[Identity]:
        with self._lock:
            self._settle()
            return sorted(self._by_id.values(), key=lambda i: i.id)

    def _snapped(self, ident: Identity) -> None:
        if self._snap is not None and not ident.reserved:
            self._snap[ident.id] = ident.label_strings()

    def snapshot(self) -> Mapping[int, list[str]]:
        """Allocated (non-reserved) identities: number -> sorted label strings.

        A read-only view kept current as identities come and go (O(1) after
        the first call; CIDR identities' lists made when read): copy it to keep it."""
        with self._lock:
            self._settle()
            if self._snap is None:
                self._snap = {i.id: i.label_strings() for i in self._by_id.values()
                              if not i.reserved and not isinstance(i.labels, PrefixLabels)}
            return IdentitySnapshot(self._snap, self._by_id, MIN_CLUSTER_IDENTITY)

    def count(self) -> int:
        """How many identities are allocated (reserved ones included)."""
        with self._lock:
            self._settle()
            return len(self._by_id)

    def restore(self, saved: Mapping[int, Iterable[str]]) -> None:
        """Re-create identities saved by ``snapshot`` (same numbers).

        A CIDR identity (labels exactly ``cidr:<prefix>``, ``reserved:world``)
        only has its number noted: the restored policies allocate their
        prefixes again right after (then it is made as ``allocate_cidr``
        makes it, with that number), and any other read of the allocator
        makes the rest first. A 100k-prefix agent restarts without parsing
        100k label sets and prefixes twice (issue 17)."""
        with self._lock:
            for number, strings in saved.items():
                number = int(number)
                if number & LOCAL_IDENTITY_FLAG and number not in self._by_id:
                    pair = strings if isinstance(strings, list | tuple) else list(strings)
                    if (len(pair) == 2 and pair[1] == _WORLD_STRING
                            and pair[0].startswith(_CIDR_PREFIX)
                            and pair[0][len(_CIDR_PREFIX):] not in self._lazy_cidr):
                        self._lazy_cidr[pair[0][len(_CIDR_PREFIX):]] = number
                        self._next_local = max(self._next_local,
                                               (number & ~LOCAL_IDENTITY_FLAG) + 1)
                        continue
                    strings = pair
                labels = Labels.from_strings(strings)
                cidr: IPNetwork | None = None
                if number & LOCAL_IDENTITY_FLAG:
                    cidr_label = labels.lookup(SOURCE_CIDR, next(
                        (lab.key for lab in labels.values() if lab.source == SOURCE_CIDR), ""))
                    if cidr_label is not None:
                        cidr = ipaddress.ip_network(cidr_label.key.replace("-", ":"))
                        self._cidr[cidr] = Identity(number, labels, cidr)
                    self._next_local = max(self._next_local, (number & ~LOCAL_IDENTITY_FLAG) + 1)
                ident = self._cidr[cidr] if cidr is not None else Identity(number, labels)
                old = self._by_id.get(number)
                if old is not None and old is not ident and self._by_labels.get(
                        tuple(old.label_strings())) is old:
                    del self._by_labels[tuple(old.label_strings())]
                self._by_id[number] = ident
                self._by_labels[tuple(labels.sorted_strings())] = ident
                self._refs.setdefault(number, 0)
                self._snapped(ident)
