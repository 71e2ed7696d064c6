"""The eBPF datapath's options and state, and what every part of it uses:
the started check, the CT revision bump after a change, the endpoint records
(read all, set flags)."""

from __future__ import annotations

import collections
import ctypes as ct
import errno
import threading
from dataclasses import fields
from typing import Any

from axoneme.core.datapath import Datapath, DatapathConfig, DatapathOption, check_options
from axoneme.core.errors import DatapathProgramError
from axoneme.core.mapstate import Key
from axoneme.datapath.ebpf import _bpf
from axoneme.datapath.ebpf import _layout as L

_FULL_ERRNOS = (errno.E2BIG, errno.ENOSPC, errno.ENOMEM)

_CONFIG_DEFAULTS = {f.name: f.default for f in fields(DatapathConfig)}

# What ``agent run --datapath-opt NAME=VALUE`` (and ``datapath_options``) may
# set. The first four are DatapathConfig fields of that name as well
# (build_datapath sets both); the datapath reads them from the config.
OPTIONS = (
    DatapathOption("bpffs_root", str, _CONFIG_DEFAULTS["bpffs_root"],
                   "bpf filesystem directory the maps are pinned under"),
    DatapathOption("policy_map_max", int, _CONFIG_DEFAULTS["policy_map_max"],
                   "policy entries per endpoint (Cilium --bpf-policy-map-max); more: MapFullError"),
    DatapathOption("ipcache_max", int, _CONFIG_DEFAULTS["ipcache_max"],
                   "entries of each ipcache map (host hash, prefix trie)"),
    DatapathOption("ct_max", int, _CONFIG_DEFAULTS["ct_max"],
                   "entries of the connection-tracking LRU map"),
    DatapathOption("max_endpoints", int, 256, "endpoints on this node (sizes the endpoint maps)"),
    DatapathOption("policy_map_total", int, 0,
                   "entries of each policy map all endpoints share (hash, trie); "
                   "0: policy_map_max x max_endpoints"),
    DatapathOption("ringbuf_pages", int, 256, "pages of the event ring buffer (a power of 2)"),
)
_OPTION_NAMES = frozenset(o.name for o in OPTIONS)


class EbpfState(Datapath):
    """``EbpfDatapath``'s state (the parts: ``_ipcachemaps``, ``_policymaps``,
    ``_endpointmaps``; the facade: ``_datapath``)."""

    def __init__(self, config: DatapathConfig | None = None) -> None:
        super().__init__(config)
        # declared options only: build_datapath already refused unknown ones,
        # and a config built by hand may carry another datapath's options too
        opts = check_options(type(self), {k: v for k, v in self.config.options.items()
                                          if k in _OPTION_NAMES})
        self._max_endpoints = int(opts["max_endpoints"])
        self._policy_total = int(opts["policy_map_total"]
                                 or self.config.policy_map_max * self._max_endpoints)
        self._ringbuf_pages = int(opts["ringbuf_pages"])
        self._lock = threading.RLock()
        self._poll_lock = threading.Lock()
        self._stopped = threading.Event()
        self._stopped.set()
        self._bpf: Any = None
        self._fns: dict[str, Any] = {}
        self._fds: dict[str, int] = {}
        self._queue: collections.deque[L.Event] = collections.deque()
        # ep id -> the policy keys it holds in the kernel: built by one walk of
        # the trie at first use after start (adoption), then kept by apply().
        # dump() reads the values from the kernel for exactly these keys, so it
        # costs O(entries of the endpoint), not O(entries of all endpoints).
        self._index: dict[int, set[Key]] | None = None
        # ep id -> {NO_* flag: how many of its keys rule it out}; built with _index
        # (or, before it, by a walk of their own: _kinds_known, _skip_flags)
        self._kinds: dict[int, dict[int, int]] = {}
        self._kinds_known = False
        self._ifindex: dict[int, int] = {}  # ep id -> host ifindex of its record (_register)
        self._ipcache_entries: int | None = None  # entries in the ipcache maps (None: count them)
        # ep id -> {peer address: its slot} of the address keys (axoneme_paddr_v1)
        self._slots: dict[int, dict[str, int]] | None = None
        self._map_full_errors = 0
        self._compile_seconds = 0.0
        # ep id -> EP_F_FAIL_CLOSED_* bits the agent asked for; an endpoint not
        # in here keeps the bits its pinned record has (adoption after restart)
        self._fail_closed: dict[int, int] = {}
        self._stamp_found = False  # take_adopt_stamp found a clean stop's stamp

    def _bump_revision(self) -> None:
        """Invalidate every verdict cached in CT entries (see lib/conntrack.h).

        Called after each change of policy, ipcache or endpoints, once the
        change is fully written: a packet that read the old revision and saw a
        half-written state cached it under the old revision."""
        fd = self._fds["ax_rev"]
        key, cur = ct.c_uint32(0), ct.c_uint64(0)
        _bpf.map_lookup(fd, key, cur)
        _bpf.map_update(fd, key, ct.c_uint64((cur.value + 1) & 0xFFFFFFFF))

    def _require(self) -> None:
        if self._bpf is None:
            raise DatapathProgramError("ebpf datapath not started")

    def _endpoints(self) -> dict[int, L.Endpoint]:
        fd = self._fds["ax_endpoints"]
        out: dict[int, L.Endpoint] = {}
        for key in list(_bpf.map_keys(fd, ct.c_uint32)):
            val = L.Endpoint()
            if _bpf.map_lookup(fd, key, val):
                out[int(key.value)] = val
        return out

    def _set_flags(self, ep_id: int, mask: int, bits: int) -> bool:
        """Set the ``mask`` flags of the endpoint's records (both maps) to
        ``bits``; False if it has none."""
        found = False
        idx = self._ifindex.get(ep_id)
        if idx is not None:
            val = L.Endpoint()
            records = {idx: val} if _bpf.map_lookup(self._fds["ax_endpoints"], ct.c_uint32(idx), val) \
                else {}
        else:
            records = self._endpoints()
        for idx, val in records.items():
            if val.ep_id != ep_id:
                continue
            found = True
            val.flags = (val.flags & ~mask) | bits
            for family, raw in ((4, bytes(val.ipv4)), (6, bytes(val.ipv6))):
                if any(raw):
                    k = L.LxcKey()
                    k.family = family
                    ct.memmove(k.addr, raw + bytes(16 - len(raw)), 16)
                    _bpf.map_update(self._fds["ax_lxc"], k, val)
            _bpf.map_update(self._fds["ax_endpoints"], ct.c_uint32(idx), val)
        return found


__all__ = ["OPTIONS", "EbpfState"]
