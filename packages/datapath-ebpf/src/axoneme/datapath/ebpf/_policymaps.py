"""The eBPF datapath's policy maps: ``axoneme_policy_hash_v1`` (hash) and
``axoneme_policy_v1`` (LPM trie), the per-endpoint index of the keys the
kernel holds, address keys' slots (``axoneme_paddr_v1``), ``apply`` in an
order that never widens, ``sync`` (and its big-endpoint path), ``dump`` and
per-entry counters."""

from __future__ import annotations

import collections
import ctypes as ct
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal, overload

from axoneme.core.endpoint import Endpoint
from axoneme.core.errors import DatapathProgramError, MapFullError
from axoneme.core.mapstate import Entry, Key, MapChanges, MapState
from axoneme.datapath.ebpf import _bpf
from axoneme.datapath.ebpf import _layout as L
from axoneme.datapath.ebpf._dpstate import _FULL_ERRNOS, EbpfState
from axoneme.datapath.ebpf._mapcodec import (
    _SIG,
    _SKIP_MASK,
    _entry_sig,
    _same_entry,
    address_from_paddr,
    entry_from_policy,
    key_from_policy,
    paddr_key,
    policy_entry,
    policy_key_bytes,
    policy_map_of,
    skip_bit,
    skip_flags,
)

LOG = logging.getLogger(__name__)

# more entries than this: a dump walks the whole map instead of a lookup per key
_BIG_ENDPOINT = 4096


class EbpfPolicyMaps(EbpfState):
    """The policy maps and their index."""

    def _policy_items(self) -> Iterator[tuple[L.PolicyKey, L.PolicyEntry]]:
        """Every policy entry of every endpoint (one kernel-side walk)."""
        ksz, vsz = ct.sizeof(L.PolicyKey), ct.sizeof(L.PolicyEntry)
        for fd in self._policy_fds():
            for kb, vb in _bpf.map_items_batch(fd, ksz, vsz):
                yield L.PolicyKey.from_buffer_copy(kb), L.PolicyEntry.from_buffer_copy(vb)

    def _policy_keys(self) -> Iterator[tuple[bytes, L.PolicyKey]]:
        """Every policy key of every endpoint, raw and decoded (one kernel-side walk)."""
        ksz, vsz = ct.sizeof(L.PolicyKey), ct.sizeof(L.PolicyEntry)
        for fd in self._policy_fds():
            for kb, _ in _bpf.map_items_batch(fd, ksz, vsz):
                yield kb, L.PolicyKey.from_buffer_copy(kb)

    def _policy_fds(self) -> list[int]:
        """The two policy maps (lib/policy.h): the hash, then the trie."""
        return list(dict.fromkeys((self._fds["ax_policy_hash"], self._fds["ax_policy"])))

    def _pfd(self, raw: bytes) -> int:
        return self._fds[policy_map_of(raw)]

    def _keys_index(self, canon: Mapping[Key, Key] | None = None) -> dict[int, set[Key]]:
        """ep id -> the Keys of what the kernel holds (a set of the Keys the
        agent's state holds anyway, no raw key bytes per entry: issue 17,
        ~20 -> ~8 MB at 100k peers). Built from one walk of the maps;
        ``canon``: equal Keys the caller holds (a sync's state), kept instead
        of the decoded ones."""
        if self._index is None:
            index: dict[int, set[Key]] = collections.defaultdict(set)
            kinds: dict[int, dict[int, int]] = collections.defaultdict(dict)
            for _, k in self._policy_keys():
                key = self._key_of(k)
                if key is None:
                    continue
                if canon is not None:
                    key = canon.get(key, key)
                index[k.ep_id].add(key)
                bit = skip_bit(key)
                if bit:
                    kinds[k.ep_id][bit] = kinds[k.ep_id].get(bit, 0) + 1
            self._index = dict(index)
            self._kinds = dict(kinds)
            self._kinds_known = True
        return self._index

    def _skip_flags(self, ep_id: int) -> int:
        """The NO_* flags the endpoint's records may carry (lib/endpoint.h).
        Without the index (a start), the kinds come from a walk that makes no
        Key (issue 17: RSS): an adopting start registers its endpoints long
        before the rebuilt state exists, and an index of Keys decoded then
        (200k at 100k peers) was replaced by the state's by ``sync``, leaving
        ~30 MB of partly used heap under the rebuilt state."""
        if self._index is None and not self._kinds_known:
            self._walk_kinds()
        return skip_flags(self._kinds.get(ep_id, {}))

    def _walk_kinds(self) -> None:
        kinds: dict[int, dict[int, int]] = collections.defaultdict(dict)
        for _, k in self._policy_keys():
            if k.identity != 0 and k.identity < L.ADDR_SLOT_BASE:
                continue  # an identity's key rules out no lookup (skip_bit 0)
            key = self._key_of(k)
            bit = skip_bit(key) if key is not None else 0
            if bit:
                kinds[k.ep_id][bit] = kinds[k.ep_id].get(bit, 0) + 1
        self._kinds = dict(kinds)
        self._kinds_known = True

    # ---- address keys: peer address -> slot (axoneme_paddr_v1) ----------------------

    def _slots_index(self) -> dict[int, dict[str, int]]:
        if self._slots is None:
            slots: dict[int, dict[str, int]] = collections.defaultdict(dict)
            v = L.PolicyAddrValue()
            for k in list(_bpf.map_keys(self._fds["ax_paddr"], L.PolicyAddrKey)):
                if _bpf.map_lookup(self._fds["ax_paddr"], k, v):
                    slots[k.ep_id][address_from_paddr(k)] = int(v.slot)
            self._slots = dict(slots)
        return self._slots

    def _key_of(self, k: L.PolicyKey) -> Key | None:
        """The Key of a policy map key (None: an address slot without its address)."""
        if k.identity < L.ADDR_SLOT_BASE:
            return key_from_policy(k)
        for address, slot in self._slots_index().get(k.ep_id, {}).items():
            if slot == k.identity:
                return key_from_policy(k, address)
        return None

    def _pkey(self, ep_id: int, key: Key) -> bytes | None:
        """Raw policy map key (None: an address key whose address has no slot,
        so it is not in the kernel)."""
        if not key.is_address:
            return policy_key_bytes(ep_id, key)
        slot = self._slots_index().get(ep_id, {}).get(key.address)
        return None if slot is None else policy_key_bytes(ep_id, key, slot)

    def _add_slots(self, ep_id: int, addresses: Iterable[str]) -> None:
        """A slot for each address that has none (written before its keys)."""
        wanted = set(addresses)
        if not wanted:
            return
        mine = self._slots_index().setdefault(ep_id, {})
        used = set(mine.values())
        n = L.ADDR_SLOT_BASE
        for address in sorted(wanted - set(mine)):
            while n in used:
                n += 1
            v = L.PolicyAddrValue()
            v.slot = n
            try:
                _bpf.map_update(self._fds["ax_paddr"], paddr_key(ep_id, address), v)
            except OSError as e:
                if e.errno in _FULL_ERRNOS:
                    self._map_full_errors += 1
                    raise MapFullError(f"address map full adding {address} to endpoint {ep_id}") from e
                raise DatapathProgramError("address map update", e.errno, str(e)) from e
            mine[address] = n
            used.add(n)

    def _drop_unused_slots(self, ep_id: int, held: Iterable[Key]) -> None:
        """Remove the slots of addresses that have no key left (after their keys)."""
        mine = self._slots_index().get(ep_id, {})
        live = {k.address for k in held if k.is_address}
        for address in [a for a in mine if a not in live]:
            _bpf.map_delete(self._fds["ax_paddr"], paddr_key(ep_id, address))
            del mine[address]

    def apply(self, endpoint: Endpoint, changes: MapChanges) -> None:
        with self._lock:
            self._require()
            self._apply(endpoint.id, changes)

    def _apply(self, ep_id: int, changes: MapChanges,
               current: Mapping[Key, L.PolicyEntry] | None = None) -> None:
        """``current``: the endpoint's kernel entries when the caller just read
        them (sync), saving a lookup per changed key."""
        # identical values share one struct (the kernel copies on update)
        values: dict[tuple[int, Entry], L.PolicyEntry] = {}
        adds: dict[Key, L.PolicyEntry] = {}
        for k, e in changes.adds.items():
            vk = (k.l4_prefix, e)
            v = values.get(vk)
            if v is None:
                v = values[vk] = policy_entry(k, e)
            adds[k] = v
        self._add_slots(ep_id, (k.address for k in adds if k.is_address))
        # an address key without a slot is not in the kernel: nothing to delete
        deletes = [k for k in changes.deletes if k not in changes.adds
                   and (not k.is_address or self._pkey(ep_id, k) is not None)]
        pkeys: dict[Key, bytes] = {}
        for k in (*adds, *deletes):
            raw = self._pkey(ep_id, k)
            assert raw is not None  # slots of adds were just written
            pkeys[k] = raw
        held = self._keys_index().get(ep_id, set())
        count = len(held)
        old: dict[Key, L.PolicyEntry | None] = {}
        if count == 0:
            # the endpoint holds nothing: no per-key lookups (initial population)
            old = dict.fromkeys(pkeys)
        elif current is not None:
            old = {k: current.get(k) for k in pkeys}
        else:
            # the index mirrors the kernel (built from a dump, kept by every
            # write): an added key it does not hold is new, no lookup needed
            # (a 50k-peer policy on an endpoint holding a few entries);
            # deletions still look (a key found is deleted, whatever the index)
            lookup = _bpf.map_lookup
            for k, pk in pkeys.items():
                if k not in held and k in adds:
                    old[k] = None
                    continue
                cur = L.PolicyEntry()
                old[k] = cur if lookup(self._pfd(pk), pk, cur) else None

        new_keys = sum(1 for k in adds if old[k] is None)
        gone = sum(1 for k in deletes if old[k] is not None)
        if count + new_keys - gone > self.config.policy_map_max:
            self._map_full_errors += 1
            raise MapFullError(
                f"policy map of endpoint {ep_id} would hold {count + new_keys - gone} entries "
                f"(policy_map_max {self.config.policy_map_max}); nothing applied")
        kinds = self._kinds.get(ep_id, {})
        after = dict(kinds)
        for k in adds:
            if old[k] is None and (bit := skip_bit(k)):
                after[bit] = after.get(bit, 0) + 1
        for k in deletes:
            if old[k] is not None and (bit := skip_bit(k)):
                after[bit] = after.get(bit, 0) - 1
        skip_before, skip_after = skip_flags(kinds), skip_flags(after)
        if skip_before & ~skip_after:
            # a lookup the programs skip finds keys from now on: no longer skipped
            # before the first such key is written
            try:
                self._set_flags(ep_id, _SKIP_MASK, skip_before & skip_after)
            except OSError as e:
                raise DatapathProgramError("endpoint flags", e.errno, str(e)) from e

        def is_deny(v: L.PolicyEntry | None) -> bool:
            return v is not None and bool(v.deny)

        # Write order, so no intermediate state allows what neither the old nor
        # the new state allows:
        # 1. new denies (and allow->deny flips), 2. deletions of allows,
        # 3. in-place updates that keep allow/deny, 4. new allows (and
        # deny->allow flips), 5. deletions of denies.
        # Each write phase is one BPF_MAP_UPDATE_BATCH per map; phases run in order.
        phases: list[tuple[bool, list[Key]]] = [
            (True, [k for k, v in adds.items() if v.deny and not is_deny(old[k])]),
            (False, [k for k in deletes if old[k] is not None and not is_deny(old[k])]),
            (True, [k for k, v in adds.items()
                    if old[k] is not None and bool(v.deny) == is_deny(old[k])
                    and not _same_entry(v, old[k])]),  # type: ignore[arg-type]
            (True, [k for k, v in adds.items() if not v.deny and (old[k] is None or is_deny(old[k]))]),
            (False, [k for k in deletes if is_deny(old[k])]),
        ]

        vbytes = {id(v): bytes(v) for v in values.values()}
        done: list[Key] = []
        try:
            for is_update, phase in phases:
                for fd, ks in self._by_map(phase, pkeys):
                    try:
                        if is_update:
                            _bpf.map_update_batch(fd, [pkeys[k] for k in ks],
                                                  [vbytes[id(adds[k])] for k in ks])
                        else:
                            _bpf.map_delete_batch(fd, [pkeys[k] for k in ks])
                    except OSError as e:
                        done.extend(ks[:getattr(e, "written", 0)])
                        raise
                    done.extend(ks)
        except OSError as e:
            self._rollback(ep_id, done, old)
            self._bump_revision()
            if e.errno in _FULL_ERRNOS:
                self._map_full_errors += 1
                raise MapFullError(
                    f"policy map full applying {len(changes)} changes to endpoint {ep_id} "
                    f"({os.strerror(e.errno or 0)}); rolled back") from e
            raise DatapathProgramError("policy map update", e.errno, str(e)) from e
        self._bump_revision()
        # an added key replaces an equal one held: the index keeps the Key
        # objects the caller's state holds (not a second copy of each)
        held.difference_update(deletes, adds)
        held.update(adds)
        if self._index is not None:
            self._index[ep_id] = held
        self._kinds[ep_id] = {bit: n for bit, n in after.items() if n > 0}
        if any(k.is_address for k in deletes):
            self._drop_unused_slots(ep_id, held)
        if skip_after & ~skip_before:
            # the last such key is gone: the lookup can be skipped again
            try:
                self._set_flags(ep_id, _SKIP_MASK, skip_after)
            except OSError:
                LOG.warning("endpoint %d: lookups stay on (flags not written)", ep_id, exc_info=True)

    def _by_map(self, ks: list[Key], pkeys: Mapping[Key, bytes]) -> list[tuple[int, list[Key]]]:
        """``ks`` split by the policy map each lives in (order kept within a map)."""
        out: dict[int, list[Key]] = {}
        for k in ks:
            out.setdefault(self._pfd(pkeys[k]), []).append(k)
        return list(out.items())

    def _rollback(self, ep_id: int, done: list[Key], old: Mapping[Key, L.PolicyEntry | None]) -> None:
        for k in reversed(done):
            prev = old[k]
            try:
                raw = self._pkey(ep_id, k)
                if raw is None:
                    continue
                if prev is None:
                    _bpf.map_delete(self._pfd(raw), raw)
                else:
                    _bpf.map_update(self._pfd(raw), raw, prev)
            except OSError:
                LOG.error("rollback of policy key %s for endpoint %d failed", k, ep_id, exc_info=True)
                self._index = None  # rebuilt from the kernel on next use
                self._kinds_known = False

    def sync(self, endpoint: Endpoint, state: MapState) -> MapChanges:
        with self._lock:
            self._require()
            canon = None
            if self._index is None:
                # the first sync after a start (adoption): the index holds the
                # state's Keys from the outset, none decoded to be dropped
                canon = {k: k for k in state}
                self._keys_index(canon)
            if len(self._keys_index().get(endpoint.id, ())) > _BIG_ENDPOINT:
                return self._sync_big(endpoint.id, state, canon)
            raw = self._dump_raw(endpoint.id)
            # compare what the kernel holds (deny, proxy port, flags), not Entry objects
            adds = {}
            for k, e in state.items():
                v = raw.get(k)
                if v is None or (v.deny, v.proxy_port, v.flags) != _entry_sig(e):
                    adds[k] = e
            deletes = frozenset(k for k in raw if k not in state)
            changes = MapChanges(adds, deletes)
            if changes:
                self._apply(endpoint.id, changes, raw)
            return changes

    def _sync_big(self, ep_id: int, state: MapState,
                  canon: Mapping[Key, Key] | None = None) -> MapChanges:
        """``sync`` of an endpoint holding many entries (a restart's comparison
        at 100k peers): the kernel's values compared as bytes, only what
        differs decoded. ``canon``: the state's Keys, already in the index."""
        if canon is None:
            # the index's Keys came from the kernel's dump: hold the state's equal
            # ones instead, one Key per entry in the process (issue 17: RSS); first,
            # so the dump below is keyed by the state's own objects (dict hits by
            # identity, no Key.__eq__ per entry)
            canon = {k: k for k in state}
            index = self._keys_index()
            if ep_id in index:
                index[ep_id] = {canon.get(k, k) for k in index[ep_id]}
        raw = self._dump_raw(ep_id, as_bytes=True)
        sigs: dict[Entry, bytes] = {}
        adds = {}
        for k, e in state.items():
            sig = sigs.get(e)
            if sig is None:
                deny, port, flags = _entry_sig(e)
                sig = sigs[e] = _SIG.pack(port, deny, flags)
            vb = raw.get(k)
            if vb is None or vb[:_SIG.size] != sig:
                adds[k] = e
        deletes = frozenset(k for k in raw if k not in canon)
        changes = MapChanges(adds, deletes)
        if changes:
            current = {k: L.PolicyEntry.from_buffer_copy(raw[k])
                       for k in (*adds, *deletes) if k in raw}
            self._apply(ep_id, changes, current)
        return changes

    def dump(self, endpoint: Endpoint) -> MapState:
        with self._lock:
            self._require()
            return self._dump(endpoint.id)

    def _dump(self, ep_id: int) -> MapState:
        return MapState({k: entry_from_policy(v) for k, v in self._dump_raw(ep_id).items()})

    @overload
    def _dump_raw(self, ep_id: int) -> dict[Key, L.PolicyEntry]: ...

    @overload
    def _dump_raw(self, ep_id: int, as_bytes: Literal[True]) -> dict[Key, bytes]: ...

    def _dump_raw(self, ep_id: int, as_bytes: bool = False) -> Any:
        """The endpoint's entries in the kernel (``as_bytes``: the raw values,
        big endpoints only)."""
        out: dict[Key, Any] = {}
        held = self._keys_index().get(ep_id, set())
        if len(held) > _BIG_ENDPOINT:
            # big endpoint: one kernel walk beats a syscall per key; the
            # index's Keys by their raw bytes for this walk only (not kept)
            by_raw = {self._pkey(ep_id, k): k for k in held}
            ksz, vsz = ct.sizeof(L.PolicyKey), ct.sizeof(L.PolicyEntry)
            for fd in self._policy_fds():
                for kb, vb in _bpf.map_items_batch(fd, ksz, vsz):
                    k = by_raw.get(kb)
                    if k is None:
                        pk = L.PolicyKey.from_buffer_copy(kb)
                        if pk.ep_id != ep_id:
                            continue
                        k = self._key_of(pk)
                        if k is None:
                            continue
                    out[k] = vb if as_bytes else L.PolicyEntry.from_buffer_copy(vb)
            return out
        assert not as_bytes
        lookup = _bpf.map_lookup
        for k in list(held):
            raw = self._pkey(ep_id, k)
            if raw is None:
                continue
            v = L.PolicyEntry()
            if lookup(self._pfd(raw), raw, v):
                out[k] = v
        return out

    def policy_counters(self, endpoint: Endpoint, key: Key) -> tuple[int, int]:
        """(packets, bytes) the entry ``key`` of ``endpoint`` has decided."""
        with self._lock:
            self._require()
            v = L.PolicyEntry()
            raw = self._pkey(endpoint.id, key)
            if raw is None or not _bpf.map_lookup(self._pfd(raw), raw, v):
                return 0, 0
            return int(v.packets), int(v.bytes)


__all__ = ["EbpfPolicyMaps"]
