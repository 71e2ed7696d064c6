"""The eBPF datapath: BCC-compiled tc programs on each pod's host veth, pinned maps.

Kernel objects (all under ``config.bpffs_root``, default /sys/fs/bpf/axoneme):
``axoneme_policy_v1`` (LPM trie) and ``axoneme_policy_hash_v1`` (hash: prefix 72 and
96 keys), every endpoint's MapState; ``axoneme_ipcache_v1`` (LPM trie) and
``axoneme_ipcache_host_v1`` (hash: /32 and /128), ``axoneme_endpoints_v1`` /
``axoneme_lxc_v1`` (local endpoints by ifindex / by IP), ``axoneme_ct_v1`` (LRU
conntrack), ``axoneme_metrics_v1``.
``stop()`` leaves programs attached and maps pinned; the next ``start()``
recompiles against the same pinned maps (adoption) and swaps the filters in
place, so established connections survive an agent restart.

This module: lifecycle (probe, start/adoption, stop, cleanup), events,
status and metrics. The rest, by job: ``_dpstate`` (options, state,
endpoint records), ``_mapcodec`` (core types <-> map keys and values),
``_ipcachemaps``, ``_policymaps`` (apply, sync, dump, the kernel-map
index), ``_endpointmaps`` (pod endpoints), ``_hostep`` (the host
endpoint), ``_nodedev`` (node devices).
"""

from __future__ import annotations

import ctypes as ct
import hashlib
import importlib.util
import logging
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from typing import Any

from axoneme.core.datapath import DatapathStatus
from axoneme.core.errors import DatapathProgramError, DatapathUnavailable
from axoneme.core.flow import Flow
from axoneme.datapath.ebpf import _bpf, _events
from axoneme.datapath.ebpf import _layout as L
from axoneme.datapath.ebpf._dpstate import OPTIONS
from axoneme.datapath.ebpf._endpointmaps import EbpfEndpoints
from axoneme.datapath.ebpf._mapcodec import (
    address_from_paddr,
    entry_from_policy,
    ipcache_key,
    ipcache_map_of,
    key_from_policy,
    lxc_key,
    net_from_ipcache,
    paddr_key,
    policy_entry,
    policy_key,
    policy_key_bytes,
    policy_map_of,
    skip_bit,
    skip_flags,
)

LOG = logging.getLogger(__name__)


def _bpffs_mounted(path: str) -> bool:
    """Whether ``path`` (or the mount it would live on) is a bpf filesystem."""
    best, fstype = "", ""
    try:
        with open("/proc/mounts", encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mnt = parts[1]
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                    best, fstype = mnt, parts[2]
    except OSError:
        return False
    return fstype == "bpf"


class EbpfDatapath(EbpfEndpoints):
    """tc programs compiled with BCC; per-endpoint state in pinned maps.

    Thread-safe: map writers hold one lock; ``events()`` may run in its own
    thread and returns once ``stop()`` is called.
    """

    name = "ebpf"
    # each is proven by a test named in tests/test_ebpf_contract.py
    capabilities = frozenset({"l7_redirect", "events", "ipv6", "fail_closed", "ipcache_dump",
                              "host_policy", "tunnel_identity", "proxy_identity_mark"})
    options = OPTIONS

    # ---- lifecycle -------------------------------------------------------------

    def probe(self) -> None:
        if os.geteuid() != 0:
            raise DatapathUnavailable("the ebpf datapath needs root (CAP_BPF, CAP_NET_ADMIN)")
        # bcc is found, not imported: the compiles run in a child process, and
        # importing it would map libbcc and LLVM into the agent for good
        if importlib.util.find_spec("bcc") is None:
            raise DatapathUnavailable("bcc is not importable: no module named 'bcc'")
        self._ensure_bpffs()
        if self._stamp_found:  # see take_adopt_stamp; start() still fails if it cannot
            self._probe_clsact()
            return
        try:
            _bpf.load_in_child("int ax_probe(struct __sk_buff *skb) { return 0; }",
                               ("ax_probe",), (), cflags=()).cleanup()
        except Exception as e:
            raise DatapathUnavailable(f"compiling/loading a tc program failed: {e}") from e
        self._probe_clsact()

    def _ensure_bpffs(self) -> None:
        root = self.config.bpffs_root
        if _bpffs_mounted(root):
            return
        mnt = "/sys/fs/bpf"
        if root.startswith(mnt + "/") or root == mnt:
            rc = os.system(f"mount -t bpf bpf {mnt} >/dev/null 2>&1")
            if rc == 0 and _bpffs_mounted(root):
                LOG.info("mounted bpffs at %s", mnt)
                return
        raise DatapathUnavailable(f"no bpf filesystem mounted at {root} (mount -t bpf bpf /sys/fs/bpf)")

    def _probe_clsact(self) -> None:
        """Add a clsact qdisc to ``lo`` of a new, empty netns (made by a thread
        that unshares its netns; it goes with the socket)."""
        from axoneme.core.netlink import Rtnl

        try:
            with Rtnl.in_new_netns() as rtnl:
                rtnl.clsact_add(rtnl.link_index("lo"))
        except Exception as e:
            raise DatapathUnavailable(f"tc clsact is not supported: {e}") from e

    def _defines(self) -> dict[str, str | int]:
        return {
            "AX_PIN_ROOT": f'"{self.config.bpffs_root}"',
            "AX_POLICY_MAX": self._policy_total,
            "AX_IPCACHE_MAX": self.config.ipcache_max,
            "AX_CT_MAX": self.config.ct_max,
            "AX_EP_MAX": self._max_endpoints,
            "AX_RINGBUF_PAGES": self._ringbuf_pages,
        }

    def start(self) -> None:
        with self._lock:
            if self._bpf is not None:
                return
            if os.geteuid() != 0:
                raise DatapathUnavailable("the ebpf datapath needs root (CAP_BPF, CAP_NET_ADMIN)")
            self._ensure_bpffs()
            os.makedirs(self.config.bpffs_root, exist_ok=True)
            self._unpin_incompatible()
            t0 = time.monotonic()
            try:
                b = _bpf.compile_programs(self._defines())
            except Exception as e:
                raise DatapathUnavailable(f"compiling the tc programs failed: {e}") from e
            self._compile_seconds = time.monotonic() - t0
            self._bpf, self._fns = b, b.programs
            self._fds = {name: b.maps[name] for name in _bpf.PINNED_MAPS}
            self._index = None
            self._kinds_known = False
            self._ipcache_entries = None
            self._slots = None
            self._stopped.clear()
            self._host_attached = None  # programs are new: attach the host's again
            b.open_ring_buffer(_bpf.EVENTS_MAP, self._on_event)
            self._refresh_node_addresses(prune=True)
            adopted = self._reattach_all()
            self._reattach_node_devices()
            # after the swap: a previous version's programs, still attached until
            # then, look host addresses up in the trie only
            if self._move_host_entries():
                self._refresh_node_addresses(prune=True)  # prune the moved node entries too
            LOG.info("ebpf datapath started in %.2fs (bpffs %s, %d endpoints adopted)",
                     self._compile_seconds, self.config.bpffs_root, adopted)

    def _unpin_incompatible(self) -> None:
        """A pinned map whose layout differs from this version's (an upgrade)
        cannot be adopted: unpin it so a fresh one is created. Programs still
        attached keep the old one until their filters are replaced; the
        agent's restart sync refills policy, ipcache and endpoints."""
        for pin, want in L.PINNED_SIZES.items():
            path = os.path.join(self.config.bpffs_root, pin)
            got = _bpf.pinned_map_sizes(path)
            if got is not None and got != want:
                LOG.warning("pinned map %s has key/value sizes %s, this version needs %s: "
                            "replacing it", path, got, want)
                os.unlink(path)

    def take_adopt_stamp(self) -> str:
        """The stamp a clean stop left in the pinned ``axoneme_stamp_v1`` map,
        erased (see ``Datapath.take_adopt_stamp``); works before ``start``."""
        with self._lock:
            try:
                token = _bpf.stamp_take(os.path.join(self.config.bpffs_root, _bpf.STAMP_PIN))
            except OSError as e:
                LOG.warning("cannot read the adoption stamp: %s", e)
                return ""
            # an agent on this boot compiled and loaded the programs (and stopped
            # cleanly): probe() leaves the trial compile to start()'s own
            self._stamp_found = bool(token)
            return token.hex()

    def set_adopt_stamp(self, stamp: str) -> bool:
        try:
            token = bytes.fromhex(stamp)
        except ValueError:
            token = b""
        if len(token) != _bpf.STAMP_SIZE:
            token = hashlib.sha256(stamp.encode()).digest()
        with self._lock:
            try:
                _bpf.stamp_set(os.path.join(self.config.bpffs_root, _bpf.STAMP_PIN), token)
            except OSError as e:
                raise DatapathProgramError("adoption stamp", e.errno, str(e)) from e
        return True

    def stop(self) -> None:
        self._stopped.set()
        # wait for a poller to leave ring_buffer_poll before freeing it
        with self._poll_lock, self._lock:
            if self._bpf is not None:
                self._bpf.cleanup()
            self._bpf = None
            self._fns = {}
            self._fds = {}

    def cleanup(self) -> None:
        """Detach every filter recorded in the pinned endpoint map, unpin all maps."""
        self.stop()
        self._cleanup_node_devices()
        root = self.config.bpffs_root
        path = os.path.join(root, _bpf.PINNED_MAPS["ax_endpoints"])
        if os.path.exists(path):
            fd = _bpf.libbpf().bpf_obj_get(path.encode())
            if fd >= 0:
                try:
                    for key in list(_bpf.map_keys(fd, ct.c_uint32)):
                        val = L.Endpoint()
                        if _bpf.map_lookup(fd, key, val):
                            self._detach_if_ours(int(key.value), val.ifname.decode(errors="replace"))
                finally:
                    os.close(fd)
        if os.path.isdir(root):
            shutil.rmtree(root, ignore_errors=True)

    # ---- events ---------------------------------------------------------------------

    def _on_event(self, ctx: Any, data: Any, size: int) -> int:
        self._queue.append(L.Event.from_buffer_copy(ct.string_at(data, ct.sizeof(L.Event))))
        return 0

    def events(self) -> Iterator[Flow]:
        offset = _events.ktime_offset()
        while not self._stopped.is_set():
            with self._poll_lock:
                b = self._bpf
                if b is None or self._stopped.is_set():
                    break
                b.ring_buffer_poll(100)
            while self._queue:
                yield _events.to_flow(self._queue.popleft(), offset)
        while self._queue:
            yield _events.to_flow(self._queue.popleft(), offset)

    # ---- status -----------------------------------------------------------------------

    def _count_map(self, name: str, key_type: Any) -> int:
        return sum(1 for _ in _bpf.map_keys(self._fds[name], key_type))

    def metrics(self) -> Mapping[str, float]:
        with self._lock:
            out: dict[str, float] = {"map_full_errors": float(self._map_full_errors),
                                     "compile_seconds": self._compile_seconds}
            if self._bpf is None:
                return out
            out["policy_entries"] = float(sum(len(v) for v in self._keys_index().values()))
            out["ipcache_entries"] = float(self._ipcache_count())
            out["endpoints"] = float(self._count_map("ax_endpoints", ct.c_uint32))
            out["ct_entries"] = float(self._count_map("ax_ct", L.Tuple))
            for slot, name in L.METRIC_NAMES.items():
                out[name] = float(_bpf.percpu_u64_sum(self._fds["ax_metrics"], slot))
            return out

    def status(self) -> DatapathStatus:
        if self._bpf is None:
            return DatapathStatus(self.name, self.config.mode, False, "not started")
        m = self.metrics()
        detail = (f"bpffs {self.config.bpffs_root}: {int(m['endpoints'])} endpoints, "
                  f"{int(m['policy_entries'])} policy entries, {int(m['ipcache_entries'])} ipcache "
                  f"entries, {int(m['ct_entries'])} connections, {int(m['map_full_errors'])} map-full "
                  f"errors, {int(m['events_suppressed'])} events suppressed")
        return DatapathStatus(self.name, self.config.mode, True, detail)

    # ---- for tests and benchmarks --------------------------------------------------

    def program_fd(self, which: str) -> int:
        """fd of a loaded program: ``from_container``, ``to_container``, ``from_netdev``,
        ``to_netdev``, ``from_overlay`` or ``to_overlay``."""
        self._require()
        name = {"from_container": _bpf.FROM_CONTAINER, "to_container": _bpf.TO_CONTAINER,
                "from_netdev": _bpf.FROM_NETDEV, "to_netdev": _bpf.TO_NETDEV,
                "from_overlay": _bpf.FROM_OVERLAY, "to_overlay": _bpf.TO_OVERLAY}[which]
        return int(self._fns[name].fd)

    def map_fd(self, name: str) -> int:
        self._require()
        return self._fds[name]

    def bpf(self) -> Any:
        """The loaded programs' and maps' fds (``_bpf.Loaded``; tests poll its ring buffer)."""
        self._require()
        return self._bpf


__all__ = ["EbpfDatapath", "OPTIONS", "address_from_paddr", "entry_from_policy", "ipcache_key",
           "ipcache_map_of", "key_from_policy", "lxc_key", "net_from_ipcache", "paddr_key",
           "policy_entry", "policy_key", "policy_key_bytes", "policy_map_of", "skip_bit",
           "skip_flags"]
