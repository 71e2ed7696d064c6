"""The eBPF datapath's ipcache maps: ``axoneme_ipcache_host_v1`` (hash: /32
and /128) and ``axoneme_ipcache_v1`` (LPM trie): the agent's changes in
batches, the node's own addresses, the move of host entries out of the trie
(upgrade), dump and count."""

from __future__ import annotations

import ctypes as ct
import errno
import ipaddress
import logging
from collections.abc import Iterator

from axoneme.core.datapath import IPCacheChanges, IPNetwork
from axoneme.core.errors import DatapathProgramError, MapFullError
from axoneme.datapath.ebpf import _bpf, _tc
from axoneme.datapath.ebpf import _layout as L
from axoneme.datapath.ebpf._dpstate import _FULL_ERRNOS, EbpfState
from axoneme.datapath.ebpf._mapcodec import (
    _IPC_HEAD,
    _IPC_VALUE,
    ipcache_key,
    ipcache_map_of,
    net_from_ipcache,
)

LOG = logging.getLogger(__name__)


def _ipcache_write(fd: int, keys: list[bytes], values: list[bytes]) -> None:
    """Batch update; one by one where the map type has no batch op (an LPM
    trie before kernel 5.x' generic batch ops: EINVAL/ENOTSUPP, nothing written)."""
    try:
        _bpf.map_update_batch(fd, keys, values)
    except OSError as e:
        written: int = getattr(e, "written", 0)
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, 524) or written:
            raise
        for k, v in zip(keys, values, strict=True):
            _bpf.map_update(fd, k, v)


# a batch of more prefixes than this is not looked up key by key to keep the
# count (~2.5 us a lookup): the count is taken from the kernel at its next
# read instead (one batched walk, ~35 ms at 100k entries)
_LOOKUPS_MAX = 1024


def _new_keys(fd: int, keys: list[bytes]) -> int:
    """How many of ``keys`` the map does not hold (before they are written)."""
    cur = L.IPCacheValue()
    lookup = _bpf.map_lookup
    return sum(1 for k in keys if not lookup(fd, k, cur))


class EbpfIPCache(EbpfState):
    """The ipcache maps."""

    # ---- ipcache -------------------------------------------------------------------

    def _refresh_node_addresses(self, prune: bool = False) -> None:
        """The node's own addresses are the host identity (unless the agent says otherwise).

        ``prune`` also removes node entries for addresses the node no longer has
        (a full ipcache walk: only at start)."""
        fd = self._fds["ax_ipcache_host"]  # node addresses are host entries
        self._ipcache_entries = None  # node entries change outside ipcache_apply: count again
        want = set()
        for _family, addr in _tc.node_addresses():
            ip = ipaddress.ip_address(addr)
            want.add(ipaddress.ip_network(f"{ip}/{ip.max_prefixlen}"))
        for net in want:
            k, cur = ipcache_key(net), L.IPCacheValue()
            if _bpf.map_lookup(fd, k, cur) and not cur.flags & L.IPCACHE_F_NODE:
                continue  # the agent's entry wins
            v = L.IPCacheValue()
            v.identity, v.flags = L.ID_HOST, L.IPCACHE_F_NODE
            try:
                _bpf.map_update(fd, k, v)
            except OSError as e:
                LOG.warning("cannot add node address %s to the ipcache: %s", net, e)
        if not prune:
            return
        # the whole host map (100k CIDR /32 peers live there): only node entries decoded
        ksz, vsz = ct.sizeof(L.IPCacheKey), ct.sizeof(L.IPCacheValue)
        nodes = [kb for kb, vb in _bpf.map_items_batch(fd, ksz, vsz)
                 if _IPC_VALUE.unpack_from(vb)[1] & L.IPCACHE_F_NODE]
        for kb in nodes:
            k = L.IPCacheKey.from_buffer_copy(kb)
            if net_from_ipcache(k) not in want:
                _bpf.map_delete(fd, k)

    def _ipcache_items(self, fd: int) -> Iterator[tuple[L.IPCacheKey, L.IPCacheValue]]:
        ksz, vsz = ct.sizeof(L.IPCacheKey), ct.sizeof(L.IPCacheValue)
        for kb, vb in _bpf.map_items_batch(fd, ksz, vsz):
            yield L.IPCacheKey.from_buffer_copy(kb), L.IPCacheValue.from_buffer_copy(vb)

    def _move_host_entries(self) -> int:
        """Host entries in the ipcache trie (left by a version without the host
        hash) move to ``ax_ipcache_host``: written there first, then removed
        from the trie, so a packet finds the address all along. How many moved."""
        trie, host = self._fds["ax_ipcache"], self._fds["ax_ipcache_host"]
        moved = 0
        ksz, vsz = ct.sizeof(L.IPCacheKey), ct.sizeof(L.IPCacheValue)
        # every start walks the whole trie (100k CIDR peers): only a host
        # entry is decoded (prefixlen and family lead the key)
        hosts = [(kb, vb) for kb, vb in _bpf.map_items_batch(trie, ksz, vsz)
                 if _IPC_HEAD.unpack_from(kb) in ((64, 4), (160, 6))]
        for kb, vb in hosts:
            k = L.IPCacheKey.from_buffer_copy(kb)
            _bpf.map_update(host, k, L.IPCacheValue.from_buffer_copy(vb))
            _bpf.map_delete(trie, k)
            moved += 1
        if moved:
            self._ipcache_entries = None  # counted again
        return moved

    def ipcache_apply(self, changes: IPCacheChanges) -> None:
        with self._lock:
            self._require()
            fds = self._fds
            # the entries' count, kept by each write (status and metrics read
            # it); when unknown (a start, a big batch), writes do not look and
            # the next read counts the kernel's
            count = self._ipcache_entries
            try:
                for net in changes.deletes:
                    if net not in changes.upserts:
                        gone = _bpf.map_delete(fds[ipcache_map_of(net)], ipcache_key(net))
                        if count is not None:
                            count -= gone
                # one BPF_MAP_UPDATE_BATCH per map (a 50k-peer fromCIDR policy
                # is 50k /32 entries); identical values share their bytes
                batches: dict[str, tuple[list[bytes], list[bytes]]] = {}
                values: dict[int, bytes] = {}
                for net, identity in changes.upserts.items():
                    vb = values.get(identity)
                    if vb is None:
                        v = L.IPCacheValue()
                        v.identity = identity
                        vb = values[identity] = bytes(v)
                    ks, vs = batches.setdefault(ipcache_map_of(net), ([], []))
                    ks.append(bytes(ipcache_key(net)))
                    vs.append(vb)
                for name, (ks, vs) in batches.items():
                    if count is not None:
                        count = (count + _new_keys(fds[name], ks) if len(ks) <= _LOOKUPS_MAX
                                 else None)
                    _ipcache_write(fds[name], ks, vs)
                self._ipcache_entries = count
            except OSError as e:
                self._ipcache_entries = None  # counted from the kernel again
                self._bump_revision()
                if e.errno in _FULL_ERRNOS:
                    self._map_full_errors += 1
                    raise MapFullError(f"ipcache map full ({self.config.ipcache_max} entries)") from e
                raise DatapathProgramError("ipcache update", e.errno, str(e)) from e
            self._bump_revision()

    def dump_ipcache(self) -> dict[IPNetwork, int]:
        with self._lock:
            self._require()
            out: dict[IPNetwork, int] = {}
            for name in ("ax_ipcache_host", "ax_ipcache"):
                for k, v in self._ipcache_items(self._fds[name]):
                    if not v.flags & L.IPCACHE_F_NODE:
                        out[net_from_ipcache(k)] = int(v.identity)
            return out

    def _ipcache_count(self) -> int:
        """Entries in the ipcache: kept by ipcache_apply (status and metrics
        must not cost O(policy size)); counted from the kernel when not known
        (after a start, or a write of more than ``_LOOKUPS_MAX`` prefixes to
        a map). A count, not a copy of the keys (issue 17: ~9 MB at 100k)."""
        if self._ipcache_entries is None:
            ksz, vsz = ct.sizeof(L.IPCacheKey), ct.sizeof(L.IPCacheValue)
            self._ipcache_entries = sum(_bpf.map_count_batch(self._fds[name], ksz, vsz)
                                       for name in ("ax_ipcache_host", "ax_ipcache"))
        return self._ipcache_entries


__all__ = ["EbpfIPCache"]
