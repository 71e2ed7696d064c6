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
"""

from __future__ import annotations

import collections
import ctypes as ct
import errno
import hashlib
import ipaddress
import logging
import os
import shutil
import socket
import struct
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import fields
from typing import Any, Literal, overload

from axoneme.core.datapath import (
    Datapath,
    DatapathConfig,
    DatapathOption,
    DatapathStatus,
    IPCacheChanges,
    IPNetwork,
    check_options,
)
from axoneme.core.endpoint import HOST_ENDPOINT_ID, Endpoint
from axoneme.core.errors import DatapathProgramError, DatapathUnavailable, MapFullError
from axoneme.core.flow import Flow
from axoneme.core.mapstate import (
    ADDRESS_IDENTITY,
    Direction,
    Entry,
    Key,
    MapChanges,
    MapState,
    Protocol,
)
from axoneme.datapath.ebpf import _bpf, _events, _tc
from axoneme.datapath.ebpf import _layout as L
from axoneme.datapath.ebpf._hostep import HostEndpointMixin
from axoneme.datapath.ebpf._nodedev import NodeDevicesMixin

LOG = logging.getLogger(__name__)

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


# ---- conversions between core types and map structs -------------------------


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


def _ipcache_write(fd: int, keys: list[bytes], values: list[bytes]) -> None:
    """Batch update; one by one where the map type has no batch op (an LPM
    trie before kernel 5.x' generic batch ops: EINVAL/ENOTSUPP, nothing written)."""
    try:
        _bpf.map_update_batch(fd, keys, values)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, 524) or getattr(e, "written", 0):
            raise
        for k, v in zip(keys, values, strict=True):
            _bpf.map_update(fd, k, v)


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
# more entries than this: a dump walks the whole map instead of a lookup per key
_BIG_ENDPOINT = 4096


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


class EbpfDatapath(HostEndpointMixin, NodeDevicesMixin, Datapath):
    """tc programs compiled with BCC; per-endpoint state in pinned maps.

    Thread-safe: map writers hold one lock; ``events()`` may run in its own
    thread and returns once ``stop()`` is called.
    """

    name = "ebpf"
    # each is proven by a test named in tests/test_ebpf_contract.py
    capabilities = frozenset({"l7_redirect", "events", "ipv6", "fail_closed", "ipcache_dump",
                              "host_policy", "tunnel_identity", "proxy_identity_mark"})
    options = OPTIONS

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
        self._index: dict[int, dict[bytes, Key]] | None = None
        # ep id -> {NO_* flag: how many of its keys rule it out}; built with _index
        self._kinds: dict[int, dict[int, int]] = {}
        self._ifindex: dict[int, int] = {}  # ep id -> host ifindex of its record (_register)
        self._ipcache_keys: set[bytes] | None = None  # what ax_ipcache holds (counted once)
        # ep id -> {peer address: its slot} of the address keys (axoneme_paddr_v1)
        self._slots: dict[int, dict[str, int]] | None = None
        self._map_full_errors = 0
        self._compile_seconds = 0.0
        # ep id -> EP_F_FAIL_CLOSED_* bits the agent asked for; an endpoint not
        # in here keeps the bits its pinned record has (adoption after restart)
        self._fail_closed: dict[int, int] = {}
        self._stamp_found = False  # take_adopt_stamp found a clean stop's stamp

    # ---- lifecycle -------------------------------------------------------------

    def probe(self) -> None:
        if os.geteuid() != 0:
            raise DatapathUnavailable("the ebpf datapath needs root (CAP_BPF, CAP_NET_ADMIN)")
        try:
            import bcc  # type: ignore[import-untyped]  # noqa: F401
        except Exception as e:  # ImportError or a broken libbcc
            raise DatapathUnavailable(f"bcc is not importable: {e}") from e
        self._ensure_bpffs()
        if self._stamp_found:  # see take_adopt_stamp; start() still fails if it cannot
            self._probe_clsact()
            return
        try:
            import bcc as _bcc

            b = _bcc.BPF(text=b"int ax_probe(struct __sk_buff *skb) { return 0; }")
            b.load_func(b"ax_probe", _bcc.BPF.SCHED_CLS)
            b.cleanup()
            _bpf.release_compiler_memory(b)
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
        from pyroute2 import IPRoute, netns  # type: ignore[import-untyped]

        name = f"axprobe-{uuid.uuid4().hex[:8]}"
        try:
            netns.create(name)
            with IPRoute(netns=name) as ipr:
                lo = ipr.link_lookup(ifname="lo")[0]
                ipr.tc("add", "clsact", lo)
        except Exception as e:
            raise DatapathUnavailable(f"tc clsact is not supported: {e}") from e
        finally:
            try:
                netns.remove(name)
            except Exception:
                LOG.debug("removing probe netns %s failed", name, exc_info=True)

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
                b, fns = _bpf.compile_programs(self._defines())
            except Exception as e:
                raise DatapathUnavailable(f"compiling the tc programs failed: {e}") from e
            self._compile_seconds = time.monotonic() - t0
            self._bpf, self._fns = b, fns
            self._fds = {name: int(b[name.encode()].map_fd) for name in _bpf.PINNED_MAPS}
            self._index = None
            self._ipcache_keys = None
            self._slots = None
            self._stopped.clear()
            self._host_attached = None  # programs are new: attach the host's again
            b[b"ax_events"].open_ring_buffer(self._on_event)
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

    @staticmethod
    def _detach_if_ours(ifindex: int, ifname: str) -> None:
        # an ifindex can be reused by an unrelated interface: check the name
        current = _tc.ifname_of(ifindex)
        if current and (not ifname or current == ifname):
            _tc.detach(ifindex)

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

    # ---- endpoints ---------------------------------------------------------------

    def _endpoint_struct(self, ep: Endpoint, ifindex: int, ifname: str, enforce_ingress: bool,
                         enforce_egress: bool) -> L.Endpoint:
        v = L.Endpoint()
        v.ep_id = ep.id
        v.identity = ep.identity
        v.ifindex = ifindex
        v.flags = (L.EP_F_ENFORCE_INGRESS if enforce_ingress else 0) | (
            L.EP_F_ENFORCE_EGRESS if enforce_egress else 0) | self._fail_closed.get(ep.id, 0) \
            | self._skip_flags(ep.id)
        if ep.ipv4:
            ct.memmove(v.ipv4, ipaddress.IPv4Address(ep.ipv4.split("/")[0]).packed, 4)
        if ep.ipv6:
            ct.memmove(v.ipv6, ipaddress.IPv6Address(ep.ipv6.split("/")[0]).packed, 16)
        v.ifname = ifname.encode()[:15]
        return v

    def _endpoints(self) -> dict[int, L.Endpoint]:
        fd = self._fds["ax_endpoints"]
        out: dict[int, L.Endpoint] = {}
        for key in list(_bpf.map_keys(fd, ct.c_uint32)):
            val = L.Endpoint()
            if _bpf.map_lookup(fd, key, val):
                out[int(key.value)] = val
        return out

    def endpoint_added(self, endpoint: Endpoint, enforce_ingress: bool, enforce_egress: bool) -> None:
        with self._lock:
            self._require()
            if endpoint.is_host:
                self._host_added(endpoint, enforce_ingress, enforce_egress)
                return
            ifindex = endpoint.host_ifindex or (_tc.ifindex_of(endpoint.host_ifname)
                                                if endpoint.host_ifname else 0)
            if not ifindex:
                raise DatapathProgramError("endpoint_added", errno.ENODEV,
                                           f"no host interface {endpoint.host_ifname!r} for endpoint {endpoint.id}")
            ifname = endpoint.host_ifname or _tc.ifname_of(ifindex)
            self._register(endpoint, ifindex, ifname, enforce_ingress, enforce_egress)
            self._attach(ifindex)
            self._refresh_node_addresses()
            self._bump_revision()

    def _register(self, endpoint: Endpoint, ifindex: int, ifname: str, enforce_ingress: bool = True,
                  enforce_egress: bool = True) -> None:
        """Write the endpoint records (no tc attach: benchmarks use this with test runs)."""
        self._require()
        if endpoint.id not in self._fail_closed:
            # a restarted agent adopts the record: a fail-closed endpoint stays so
            # until the agent says otherwise
            old = L.Endpoint()
            if _bpf.map_lookup(self._fds["ax_endpoints"], ct.c_uint32(ifindex), old) \
                    and old.ep_id == endpoint.id:
                bits = old.flags & (L.EP_F_FAIL_CLOSED_INGRESS | L.EP_F_FAIL_CLOSED_EGRESS)
                if bits:
                    self._fail_closed[endpoint.id] = bits
        val = self._endpoint_struct(endpoint, ifindex, ifname, enforce_ingress, enforce_egress)
        try:
            # a stale record of the same endpoint on another interface goes first
            for idx, old in self._endpoints().items():
                if old.ep_id == endpoint.id and idx != ifindex:
                    _bpf.map_delete(self._fds["ax_endpoints"], ct.c_uint32(idx))
            for ip in (endpoint.ipv4, endpoint.ipv6):
                if ip:
                    _bpf.map_update(self._fds["ax_lxc"], lxc_key(ip), val)
            _bpf.map_update(self._fds["ax_endpoints"], ct.c_uint32(ifindex), val)
            self._ifindex[endpoint.id] = ifindex
            self._bump_revision()
        except OSError as e:
            if e.errno in _FULL_ERRNOS:
                self._map_full_errors += 1
                raise MapFullError(f"endpoint map full adding endpoint {endpoint.id}") from e
            raise DatapathProgramError("endpoint map update", e.errno, str(e)) from e

    def _attach(self, ifindex: int) -> None:
        fc, tc_ = self._fns[_bpf.FROM_CONTAINER], self._fns[_bpf.TO_CONTAINER]
        try:
            _tc.attach(ifindex, fc.fd, fc.name.decode() if isinstance(fc.name, bytes) else fc.name,
                       tc_.fd, tc_.name.decode() if isinstance(tc_.name, bytes) else tc_.name)
        except Exception as e:
            code = getattr(e, "code", None)
            raise DatapathProgramError("tc attach", code, f"ifindex {ifindex}: {e}") from e

    def _reattach_all(self) -> int:
        n = 0
        for ifindex, val in self._endpoints().items():
            name = _tc.ifname_of(ifindex)
            if name and name == val.ifname.decode(errors="replace"):
                if val.ep_id == HOST_ENDPOINT_ID:
                    self._attach_host(ifindex)  # a device of the host firewall
                else:
                    self._attach(ifindex)
                n += 1
        return n

    def endpoint_fail_closed(self, endpoint: Endpoint, directions: frozenset[Direction]) -> None:
        """Set the endpoint's FAIL_CLOSED flags in both endpoint maps (see lib/endpoint.h)."""
        bits = (L.EP_F_FAIL_CLOSED_INGRESS if Direction.INGRESS in directions else 0) | (
            L.EP_F_FAIL_CLOSED_EGRESS if Direction.EGRESS in directions else 0)
        mask = L.EP_F_FAIL_CLOSED_INGRESS | L.EP_F_FAIL_CLOSED_EGRESS
        with self._lock:
            self._require()
            self._fail_closed[endpoint.id] = bits
            found = False
            try:
                found = self._set_flags(endpoint.id, mask, bits)
            except OSError as e:
                raise DatapathProgramError("endpoint fail-closed", e.errno, str(e)) from e
            finally:
                self._bump_revision()  # cached CT verdicts must be decided again
            if not found and bits:
                raise DatapathProgramError("endpoint fail-closed", errno.ENOENT,
                                           f"endpoint {endpoint.id} has no record")

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

    def endpoint_removed(self, endpoint: Endpoint) -> None:
        with self._lock:
            self._require()
            if endpoint.is_host:
                self._host_attached = None
                if not any(v.ep_id == endpoint.id for v in self._endpoints().values()):
                    return  # no host firewall here (an agent start checks): nothing to walk
            self._fail_closed.pop(endpoint.id, None)
            self._ifindex.pop(endpoint.id, None)
            for idx, old in self._endpoints().items():
                if old.ep_id == endpoint.id:
                    if not (endpoint.is_host and idx in self.node_device_ifindexes()):
                        self._detach_if_ours(idx, old.ifname.decode(errors="replace"))
                    _bpf.map_delete(self._fds["ax_endpoints"], ct.c_uint32(idx))
                    for family, raw in ((4, bytes(old.ipv4)), (6, bytes(old.ipv6))):
                        if any(raw):
                            k = L.LxcKey()
                            k.family = family
                            ct.memmove(k.addr, raw + bytes(16 - len(raw)), 16)
                            _bpf.map_delete(self._fds["ax_lxc"], k)
            for ip in (endpoint.ipv4, endpoint.ipv6):
                if ip:
                    _bpf.map_delete(self._fds["ax_lxc"], lxc_key(ip))
            for fd in self._policy_fds():
                for k in [k for k in _bpf.map_keys(fd, L.PolicyKey) if k.ep_id == endpoint.id]:
                    _bpf.map_delete(fd, k)
            for address in self._slots_index().pop(endpoint.id, {}):
                _bpf.map_delete(self._fds["ax_paddr"], paddr_key(endpoint.id, address))
            if self._index is not None:
                self._index.pop(endpoint.id, None)
                self._kinds.pop(endpoint.id, None)
            self._bump_revision()

    # ---- ipcache -------------------------------------------------------------------

    def _refresh_node_addresses(self, prune: bool = False) -> None:
        """The node's own addresses are the host identity (unless the agent says otherwise).

        ``prune`` also removes node entries for addresses the node no longer has
        (a full ipcache walk: only at start)."""
        fd = self._fds["ax_ipcache_host"]  # node addresses are host entries
        self._ipcache_keys = None  # node entries change outside ipcache_apply: count again
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
            self._ipcache_keys = None  # counted again
        return moved

    def ipcache_apply(self, changes: IPCacheChanges) -> None:
        with self._lock:
            self._require()
            fds = self._fds
            known = self._ipcache_keys
            try:
                for net in changes.deletes:
                    if net not in changes.upserts:
                        _bpf.map_delete(fds[ipcache_map_of(net)], ipcache_key(net))
                        if known is not None:
                            known.discard(bytes(ipcache_key(net)))
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
                    _ipcache_write(fds[name], ks, vs)
                    if known is not None:
                        known.update(ks)
            except OSError as e:
                self._ipcache_keys = None  # counted from the kernel again
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

    # ---- policy ---------------------------------------------------------------------

    def _policy_items(self) -> Iterator[tuple[L.PolicyKey, L.PolicyEntry]]:
        """Every policy entry of every endpoint (one kernel-side walk)."""
        ksz, vsz = ct.sizeof(L.PolicyKey), ct.sizeof(L.PolicyEntry)
        for fd in self._policy_fds():
            for kb, vb in _bpf.map_items_batch(fd, ksz, vsz):
                yield L.PolicyKey.from_buffer_copy(kb), L.PolicyEntry.from_buffer_copy(vb)

    def _policy_fds(self) -> list[int]:
        """The two policy maps (lib/policy.h): the hash, then the trie."""
        return list(dict.fromkeys((self._fds["ax_policy_hash"], self._fds["ax_policy"])))

    def _pfd(self, raw: bytes) -> int:
        return self._fds[policy_map_of(raw)]

    def _keys_index(self) -> dict[int, dict[bytes, Key]]:
        """ep id -> {raw policy key bytes: Key} of what the kernel holds."""
        if self._index is None:
            index: dict[int, dict[bytes, Key]] = collections.defaultdict(dict)
            kinds: dict[int, dict[int, int]] = collections.defaultdict(dict)
            for k, _ in self._policy_items():
                key = self._key_of(k)
                if key is not None:
                    index[k.ep_id][bytes(k)] = key
                    bit = skip_bit(key)
                    if bit:
                        kinds[k.ep_id][bit] = kinds[k.ep_id].get(bit, 0) + 1
            self._index = dict(index)
            self._kinds = dict(kinds)
        return self._index

    def _skip_flags(self, ep_id: int) -> int:
        """The NO_* flags the endpoint's records may carry (lib/endpoint.h)."""
        self._keys_index()
        return skip_flags(self._kinds.get(ep_id, {}))

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

    def _drop_unused_slots(self, ep_id: int, held: Mapping[bytes, Key]) -> None:
        """Remove the slots of addresses that have no key left (after their keys)."""
        mine = self._slots_index().get(ep_id, {})
        live = {k.address for k in held.values() if k.is_address}
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
        held = self._keys_index().get(ep_id, {})
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
                if pk not in held and k in adds:
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
        for k in deletes:
            held.pop(pkeys[k], None)
        for k in adds:
            held[pkeys[k]] = k
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

    def sync(self, endpoint: Endpoint, state: MapState) -> MapChanges:
        with self._lock:
            self._require()
            if len(self._keys_index().get(endpoint.id, ())) > _BIG_ENDPOINT:
                return self._sync_big(endpoint.id, state)
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

    def _sync_big(self, ep_id: int, state: MapState) -> MapChanges:
        """``sync`` of an endpoint holding many entries (a restart's comparison
        at 100k peers): the kernel's values compared as bytes, only what
        differs decoded."""
        # the index's Keys came from the kernel's dump (a restart): hold the state's
        # equal ones instead, one Key per entry in the process (issue 17: RSS); first,
        # so the dump below is keyed by the state's own objects (dict hits by identity,
        # no Key.__eq__ per entry)
        canon = {k: k for k in state}
        for kb, k in (held := self._keys_index().get(ep_id, {})).items():
            held[kb] = canon.get(k, k)
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
        held = self._keys_index().get(ep_id, {})
        if len(held) > _BIG_ENDPOINT:
            # big endpoint: one kernel walk beats a syscall per key
            ksz, vsz = ct.sizeof(L.PolicyKey), ct.sizeof(L.PolicyEntry)
            for fd in self._policy_fds():
                for kb, vb in _bpf.map_items_batch(fd, ksz, vsz):
                    k = held.get(kb)
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
        for raw, k in list(held.items()):
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

    def _ipcache_count(self) -> int:
        """Entries in the ipcache: counted from the kernel once, then kept by
        ipcache_apply (status and metrics must not cost O(policy size))."""
        if self._ipcache_keys is None:
            self._ipcache_keys = {bytes(k) for name in ("ax_ipcache_host", "ax_ipcache")
                                  for k in _bpf.map_keys(self._fds[name], L.IPCacheKey)}
        return len(self._ipcache_keys)

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
        """The BCC object (layout checks read its generated Key/Leaf types)."""
        self._require()
        return self._bpf
