"""Compiling the tc programs with BCC and raw map access through libbpf.

The C sources are assembled into one translation unit (local ``lib/*.h``
includes inlined once) so BCC's rewriter sees every map access, and compiled
once per ``start()`` in a child process (``load_in_child``: the agent holds the
programs' and maps' fds, never libbcc or LLVM); per-endpoint data lives in the
pinned maps.
"""

from __future__ import annotations

import ctypes as ct
import errno as errno_mod
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from typing import Any

from axoneme.core import marks

LOG = logging.getLogger(__name__)

PROGRAM_FILES = ("from_container.c", "to_container.c", "host.c", "overlay.c")
FROM_CONTAINER = "ax_from_container"
TO_CONTAINER = "ax_to_container"
FROM_NETDEV = "ax_from_netdev"  # on the node's devices: host firewall, local delivery (host.c)
TO_NETDEV = "ax_to_netdev"
FROM_OVERLAY = "ax_from_overlay"  # on the tunnel device: the VNI's identity (overlay.c)
TO_OVERLAY = "ax_to_overlay"
PROGRAMS = (FROM_CONTAINER, TO_CONTAINER, FROM_NETDEV, TO_NETDEV, FROM_OVERLAY, TO_OVERLAY)

# C map variable (kernel map name, <= 15 chars) -> pin file name under bpffs_root.
PINNED_MAPS = {
    "ax_policy": "axoneme_policy_v1",
    "ax_policy_hash": "axoneme_policy_hash_v1",
    "ax_ipcache_host": "axoneme_ipcache_host_v1",
    "ax_paddr": "axoneme_paddr_v1",
    "ax_ipcache": "axoneme_ipcache_v1",
    "ax_endpoints": "axoneme_endpoints_v1",
    "ax_lxc": "axoneme_lxc_v1",
    "ax_ct": "axoneme_ct_v1",
    "ax_metrics": "axoneme_metrics_v1",
    "ax_rev": "axoneme_rev_v1",
}

# The skb marks the programs set and test, generated from axoneme.core.marks
# (their one definition) into every translation unit (lib/common.h uses them).
MARK_DEFINES: dict[str, str | int] = {
    "AX_MARK_MAGIC_MASK": f"{marks.MARK_MAGIC_HOST_MASK:#06x}",
    "AX_MARK_MAGIC_TO_PROXY": f"{marks.MARK_MAGIC_TO_PROXY:#06x}",
    "AX_MARK_MAGIC_PROXY_INGRESS": f"{marks.MARK_MAGIC_PROXY_INGRESS:#06x}",
    "AX_MARK_MAGIC_CHECKED": f"{marks.MARK_MAGIC_CHECKED:#06x}",
    "AX_MARK_TO_PROXY_IDENTITY": f"{marks.MARK_TO_PROXY_IDENTITY:#06x}",
    "AX_PROXY_MARK_PORT_BASE": marks.PROXY_MARK_PORT_BASE,
    "AX_PROXY_MARK_PORT_SPAN": marks.PROXY_MARK_PORT_SPAN,
    "AX_MAX_MARK_IDENTITY": f"{marks.MAX_MARK_IDENTITY:#x}",
}

_INCLUDE = re.compile(r'^#include "(lib/[A-Za-z0-9_]+\.h)"\s*$', re.M)


def bpf_dir() -> str:
    return str(resources.files("axoneme.datapath.ebpf") / "bpf")


def assemble_source(defines: dict[str, str | int], files: tuple[str, ...] = PROGRAM_FILES) -> str:
    """One translation unit: the mark ``#define``s (``MARK_DEFINES``), ``defines``,
    then each file with local includes inlined once."""
    root = bpf_dir()
    seen: set[str] = set()

    def inline(rel: str) -> str:
        with open(os.path.join(root, rel), encoding="utf-8") as f:
            text = f.read()

        def repl(m: re.Match[str]) -> str:
            name = m.group(1)
            if name in seen:
                return ""
            seen.add(name)
            return inline(name)

        return _INCLUDE.sub(repl, text)

    head = "".join(f"#define {k} {v}\n" for k, v in {**MARK_DEFINES, **defines}.items())
    return head + "\n".join(inline(f) for f in files)


EVENTS_MAP = "ax_events"  # the ring buffer of flow events (not pinned)

# The compile runs in a child process (issue 17: RSS): BCC's libbcc maps libLLVM
# and libclang-cpp, whose relocated data (~10 MB) and the compile's own heap
# (~12 MB) an agent that compiled in-process kept for good. The child compiles
# and loads with BCC and hands the programs' and maps' fds over a socketpair
# (SCM_RIGHTS); the agent holds fds only and reads the event ring buffer with
# libbpf. The child's stdin: {"text", "cflags", "programs", "maps"}.
_CHILD = r"""
import json, socket, sys
req = json.loads(sys.stdin.read())
import bcc
b = bcc.BPF(text=req["text"].encode(), cflags=req["cflags"])
fds = [b.load_func(n.encode(), bcc.BPF.SCHED_CLS).fd for n in req["programs"]]
fds += [int(b[n.encode()].map_fd) for n in req["maps"]]
s = socket.socket(fileno=int(sys.argv[1]))
socket.send_fds(s, [b"ok"], fds)
s.recv(1)
"""


class Program:
    """A loaded program: its fd (held by the agent) and name."""

    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name


_RingBufferCallback = ct.CFUNCTYPE(ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_size_t)


class Loaded:
    """What a compile child loaded, as fds: the maps by C name, the programs,
    and the event ring buffer read through libbpf (BCC's method names, so a
    poller calls ``ring_buffer_poll`` as before)."""

    def __init__(self, programs: dict[str, Program], maps: dict[str, int]) -> None:
        self.programs = programs
        self.maps = maps
        self._rb: int | None = None
        self._cb: Any = None

    def open_ring_buffer(self, name: str, callback: Any) -> None:
        """``callback(ctx, data, size) -> int`` for each record of map ``name``."""
        lib = libbpf()
        self._cb = _RingBufferCallback(callback)  # kept: libbpf calls it later
        rb = lib.ring_buffer__new(self.maps[name], self._cb, None, None)
        if not rb:
            e = ct.get_errno() or errno_mod.EINVAL
            raise OSError(e, f"ring_buffer__new: {os.strerror(e)}")
        self._rb = rb

    def ring_buffer_poll(self, timeout_ms: int) -> None:
        if self._rb:
            libbpf().ring_buffer__poll(self._rb, timeout_ms)

    def cleanup(self) -> None:
        """Free the ring buffer and close every fd (attached filters and pins keep theirs)."""
        if self._rb:
            libbpf().ring_buffer__free(self._rb)
            self._rb = None
        for fd in [*self.maps.values(), *(p.fd for p in self.programs.values())]:
            try:
                os.close(fd)
            except OSError:
                pass
        self.maps, self.programs = {}, {}


def load_in_child(text: str, programs: tuple[str, ...], maps: tuple[str, ...],
                  cflags: tuple[str, ...] = ("-Wno-unused-function",)) -> Loaded:
    """Compile ``text`` and load ``programs`` (tc) in a child process; its
    fds for ``programs`` and the maps ``maps``. OSError with the child's
    stderr when it fails."""
    import json
    import socket
    import subprocess
    import sys
    import tempfile

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(theirs.fileno())],
                                    pass_fds=[theirs.fileno()], stdin=subprocess.PIPE,
                                    stdout=subprocess.DEVNULL, stderr=err)
        finally:
            theirs.close()
        try:
            assert proc.stdin is not None
            with proc.stdin:
                proc.stdin.write(json.dumps({"text": text, "cflags": list(cflags),
                                             "programs": list(programs),
                                             "maps": list(maps)}).encode())
            _msg, fds, _flags, _addr = socket.recv_fds(ours, 16, len(programs) + len(maps) + 8)
            if fds:
                ours.send(b"x")  # the child may exit: ours are duplicates
        finally:
            rc = proc.wait()
        if len(fds) != len(programs) + len(maps):
            for fd in fds:
                os.close(fd)
            err.seek(0)
            tail = err.read().decode(errors="replace").strip().splitlines()[-6:]
            raise OSError(errno_mod.EIO, f"the compile child exited {rc}: " + " | ".join(tail))
    progs = {n: Program(fd, n) for n, fd in zip(programs, fds[:len(programs)], strict=True)}
    return Loaded(progs, dict(zip(maps, fds[len(programs):], strict=True)))


def compile_programs(defines: dict[str, str | int]) -> Loaded:
    """Compile with BCC (in a child process) and load the tc programs."""
    return load_in_child(assemble_source(defines), PROGRAMS, (*PINNED_MAPS, EVENTS_MAP))


# ---- libbpf map operations --------------------------------------------------

_libbpf: Any = None


def libbpf() -> Any:
    global _libbpf
    if _libbpf is None:
        lib = ct.CDLL("libbpf.so.1", use_errno=True)
        for name, args in (
            ("bpf_map_update_elem", [ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_uint64]),
            ("bpf_map_lookup_elem", [ct.c_int, ct.c_void_p, ct.c_void_p]),
            ("bpf_map_delete_elem", [ct.c_int, ct.c_void_p]),
            ("bpf_map_get_next_key", [ct.c_int, ct.c_void_p, ct.c_void_p]),
            ("bpf_obj_get", [ct.c_char_p]),
            ("bpf_obj_pin", [ct.c_int, ct.c_char_p]),
            ("bpf_map_create", [ct.c_int, ct.c_char_p, ct.c_uint32, ct.c_uint32, ct.c_uint32,
                                ct.c_void_p]),
            ("bpf_prog_test_run_opts", [ct.c_int, ct.c_void_p]),
            ("bpf_map_update_batch", [ct.c_int, ct.c_void_p, ct.c_void_p,
                                      ct.POINTER(ct.c_uint32), ct.c_void_p]),
            ("bpf_obj_get_info_by_fd", [ct.c_int, ct.c_void_p, ct.POINTER(ct.c_uint32)]),
            ("bpf_map_delete_batch", [ct.c_int, ct.c_void_p, ct.POINTER(ct.c_uint32), ct.c_void_p]),
            ("bpf_map_lookup_batch", [ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_void_p, ct.c_void_p,
                                      ct.POINTER(ct.c_uint32), ct.c_void_p]),
            ("ring_buffer__poll", [ct.c_void_p, ct.c_int]),
        ):
            fn = getattr(lib, name)
            fn.argtypes = args
            fn.restype = ct.c_int
        lib.ring_buffer__new.argtypes = [ct.c_int, _RingBufferCallback, ct.c_void_p, ct.c_void_p]
        lib.ring_buffer__new.restype = ct.c_void_p
        lib.ring_buffer__free.argtypes = [ct.c_void_p]
        lib.ring_buffer__free.restype = None
        _libbpf = lib
    return _libbpf


BPF_ANY = 0
BPF_NOEXIST = 1


def _err(rc: int) -> int:
    return -rc if rc < 0 else (ct.get_errno() or errno_mod.EIO)


def _ref(obj: Any) -> Any:
    """bytes go as their buffer, ctypes objects by reference."""
    return obj if isinstance(obj, bytes) else ct.byref(obj)


def map_update(fd: int, key: Any, value: Any, flags: int = BPF_ANY) -> None:
    rc = libbpf().bpf_map_update_elem(fd, _ref(key), _ref(value), flags)
    if rc != 0:
        e = _err(rc)
        raise OSError(e, os.strerror(e))


def map_update_batch(fd: int, keys: list[bytes], values: list[bytes]) -> int:
    """BPF_MAP_UPDATE_BATCH (BPF_ANY). Returns how many were written; on error
    raises OSError with ``.written`` set to the number written before it."""
    if not keys:
        return 0
    n = ct.c_uint32(len(keys))
    rc = libbpf().bpf_map_update_batch(fd, b"".join(keys), b"".join(values), ct.byref(n), None)
    if rc != 0:
        e = _err(rc)
        err = OSError(e, os.strerror(e))
        err.written = int(n.value)  # type: ignore[attr-defined]
        raise err
    return int(n.value)


def map_delete_batch(fd: int, keys: list[bytes]) -> None:
    """BPF_MAP_DELETE_BATCH; keys already gone count as deleted (idempotent).
    On another error raises OSError with ``.written`` = how many were deleted."""
    start = 0
    while start < len(keys):
        n = ct.c_uint32(len(keys) - start)
        rc = libbpf().bpf_map_delete_batch(fd, b"".join(keys[start:]), ct.byref(n), None)
        if rc == 0:
            return
        e = _err(rc)
        done = start + int(n.value)
        if e != errno_mod.ENOENT:
            err = OSError(e, os.strerror(e))
            err.written = done  # type: ignore[attr-defined]
            raise err
        start = done + 1  # skip the missing key


def map_lookup(fd: int, key: Any, value: Any) -> bool:
    rc = libbpf().bpf_map_lookup_elem(fd, _ref(key), ct.byref(value))
    if rc == 0:
        return True
    e = _err(rc)
    if e == errno_mod.ENOENT:
        return False
    raise OSError(e, os.strerror(e))


def map_delete(fd: int, key: Any) -> bool:
    """Delete; ENOENT counts as success (idempotent) and returns False."""
    rc = libbpf().bpf_map_delete_elem(fd, _ref(key))
    if rc == 0:
        return True
    e = _err(rc)
    if e == errno_mod.ENOENT:
        return False
    raise OSError(e, os.strerror(e))


def map_keys(fd: int, key_type: type[Any]) -> Iterator[Any]:
    """Every key (a snapshot walk; keys deleted meanwhile may end the walk early)."""
    lib = libbpf()
    prev: Any = None
    while True:
        nxt = key_type()
        rc = lib.bpf_map_get_next_key(fd, ct.byref(prev) if prev is not None else None, ct.byref(nxt))
        if rc != 0:
            e = _err(rc)
            if e == errno_mod.ENOENT:
                return
            raise OSError(e, os.strerror(e))
        yield nxt
        prev = nxt


class _MapInfo(ct.Structure):
    # the first fields of struct bpf_map_info (uapi/linux/bpf.h)
    _fields_ = [
        ("type", ct.c_uint32),
        ("id", ct.c_uint32),
        ("key_size", ct.c_uint32),
        ("value_size", ct.c_uint32),
        ("max_entries", ct.c_uint32),
        ("map_flags", ct.c_uint32),
        ("name", ct.c_char * 16),
    ]


def pinned_map_sizes(path: str) -> tuple[int, int] | None:
    """(key_size, value_size) of a pinned map, None if it is not there."""
    lib = libbpf()
    fd = lib.bpf_obj_get(path.encode())
    if fd < 0:
        return None
    try:
        info = _MapInfo()
        n = ct.c_uint32(ct.sizeof(info))
        if lib.bpf_obj_get_info_by_fd(fd, ct.byref(info), ct.byref(n)) != 0:
            return None
        return int(info.key_size), int(info.value_size)
    finally:
        os.close(fd)


def _lookup_batches(fd: int, key_size: int, value_size: int,
                    batch: int) -> Iterator[tuple[int, ct.Array[ct.c_char], ct.Array[ct.c_char]]]:
    """BPF_MAP_LOOKUP_BATCH over the whole map: (count, key buffer, value
    buffer) per batch; the buffers are reused by the next batch."""
    lib = libbpf()
    kbuf = ct.create_string_buffer(key_size * batch)
    vbuf = ct.create_string_buffer(value_size * batch)
    in_b = ct.create_string_buffer(max(key_size, 8))
    out_b = ct.create_string_buffer(max(key_size, 8))
    first = True
    while True:
        n = ct.c_uint32(batch)
        rc = lib.bpf_map_lookup_batch(fd, None if first else in_b, out_b, kbuf, vbuf, ct.byref(n), None)
        e = _err(rc) if rc != 0 else 0
        if rc != 0 and e != errno_mod.ENOENT:
            raise OSError(e, os.strerror(e))
        yield n.value, kbuf, vbuf
        if rc != 0:  # ENOENT: the walk is complete
            return
        ct.memmove(in_b, out_b, len(out_b))
        first = False


def map_items_batch(fd: int, key_size: int, value_size: int,
                    batch: int = 4096) -> Iterator[tuple[bytes, bytes]]:
    """Every (key, value) as bytes via BPF_MAP_LOOKUP_BATCH: the kernel walks
    the map, a few syscalls instead of two per entry."""
    for n, kbuf, vbuf in _lookup_batches(fd, key_size, value_size, batch):
        kraw, vraw = kbuf.raw, vbuf.raw
        for i in range(n):
            yield kraw[i * key_size:(i + 1) * key_size], vraw[i * value_size:(i + 1) * value_size]


def map_count_batch(fd: int, key_size: int, value_size: int, batch: int = 4096) -> int:
    """How many entries the map holds: ``map_items_batch``'s walk, nothing
    decoded (100k entries: ~35 ms)."""
    return sum(n for n, _, _ in _lookup_batches(fd, key_size, value_size, batch))


# ---- the adoption stamp (Datapath.take_adopt_stamp) ---------------------------

STAMP_PIN = "axoneme_stamp_v1"  # under bpffs_root; made from here, no program reads it
STAMP_SIZE = 32
_BPF_MAP_TYPE_ARRAY = 2


def stamp_take(path: str) -> bytes:
    """The token in the pinned stamp map at ``path`` (b"" if none), erased:
    one array slot of ``STAMP_SIZE`` bytes, all zero when there is none."""
    lib = libbpf()
    fd = lib.bpf_obj_get(path.encode())
    if fd < 0:
        return b""
    try:
        key, value = ct.c_uint32(0), (ct.c_uint8 * STAMP_SIZE)()
        if not map_lookup(fd, key, value):
            return b""
        token = bytes(value)
        if any(token):
            map_update(fd, key, (ct.c_uint8 * STAMP_SIZE)())
        return token if any(token) else b""
    finally:
        os.close(fd)


def stamp_set(path: str, token: bytes) -> None:
    """Write ``token`` (``STAMP_SIZE`` bytes) into the stamp map at ``path``,
    creating and pinning the map when it is not there. OSError on failure."""
    lib = libbpf()
    fd = lib.bpf_obj_get(path.encode())
    if fd < 0:
        fd = lib.bpf_map_create(_BPF_MAP_TYPE_ARRAY, b"ax_stamp", 4, STAMP_SIZE, 1, None)
        if fd < 0:
            e = _err(fd)
            raise OSError(e, f"creating the stamp map: {os.strerror(e)}")
        rc = lib.bpf_obj_pin(fd, path.encode())
        if rc != 0:
            e = _err(rc)
            os.close(fd)
            raise OSError(e, f"pinning {path}: {os.strerror(e)}")
    try:
        value = (ct.c_uint8 * STAMP_SIZE).from_buffer_copy(token.ljust(STAMP_SIZE, b"\0")[:STAMP_SIZE])
        map_update(fd, ct.c_uint32(0), value)
    finally:
        os.close(fd)


def possible_cpus(path: str = "/sys/devices/system/cpu/possible") -> int:
    """How many CPUs a per-CPU map has a slot for (what ``bcc.utils`` reads,
    without loading libbcc): ranges like ``0-3,8``."""
    with open(path) as f:
        text = f.read().strip()
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


def percpu_u64_sum(fd: int, slot: int) -> int:
    n = possible_cpus()
    vals = (ct.c_uint64 * n)()
    key = ct.c_uint32(slot)
    rc = libbpf().bpf_map_lookup_elem(fd, ct.byref(key), ct.byref(vals))
    if rc != 0:
        return 0
    return int(sum(vals))


# ---- BPF_PROG_TEST_RUN --------------------------------------------------------


class _TestRunOpts(ct.Structure):
    # mirrors struct bpf_test_run_opts in libbpf 1.x bpf.h
    _fields_ = [
        ("sz", ct.c_size_t),
        ("data_in", ct.c_void_p),
        ("data_out", ct.c_void_p),
        ("data_size_in", ct.c_uint32),
        ("data_size_out", ct.c_uint32),
        ("ctx_in", ct.c_void_p),
        ("ctx_out", ct.c_void_p),
        ("ctx_size_in", ct.c_uint32),
        ("ctx_size_out", ct.c_uint32),
        ("retval", ct.c_uint32),
        ("repeat", ct.c_int),
        ("duration", ct.c_uint32),
        ("flags", ct.c_uint32),
        ("cpu", ct.c_uint32),
        ("batch_size", ct.c_uint32),
    ]


class SkBuffCtx(ct.Structure):
    """The first fields of struct __sk_buff (uapi), enough to set ifindex/mark."""

    _fields_ = [
        ("len", ct.c_uint32),
        ("pkt_type", ct.c_uint32),
        ("mark", ct.c_uint32),
        ("queue_mapping", ct.c_uint32),
        ("protocol", ct.c_uint32),
        ("vlan_present", ct.c_uint32),
        ("vlan_tci", ct.c_uint32),
        ("vlan_proto", ct.c_uint32),
        ("priority", ct.c_uint32),
        ("ingress_ifindex", ct.c_uint32),
        ("ifindex", ct.c_uint32),
        ("tc_index", ct.c_uint32),
        ("cb", ct.c_uint32 * 5),
        ("hash", ct.c_uint32),
        ("tc_classid", ct.c_uint32),
        ("data", ct.c_uint32),
        ("data_end", ct.c_uint32),
        ("napi_id", ct.c_uint32),
        ("family", ct.c_uint32),
        ("remote_ip4", ct.c_uint32),
        ("local_ip4", ct.c_uint32),
        ("remote_ip6", ct.c_uint32 * 4),
        ("local_ip6", ct.c_uint32 * 4),
        ("remote_port", ct.c_uint32),
        ("local_port", ct.c_uint32),
        ("data_meta", ct.c_uint32),
        ("flow_keys", ct.c_uint64),
        ("tstamp", ct.c_uint64),
        ("wire_len", ct.c_uint32),
        ("gso_segs", ct.c_uint32),
        ("sk", ct.c_uint64),
        ("gso_size", ct.c_uint32),
        ("tstamp_type", ct.c_uint8),
        ("pad", ct.c_uint8 * 3),
        ("hwtstamp", ct.c_uint64),
    ]


@dataclass(frozen=True, slots=True)
class TestRunResult:
    retval: int
    duration_ns: int  # kernel's average per repetition
    mark: int


def prog_test_run(prog_fd: int, packet: bytes, repeat: int = 1, ifindex: int = 0,
                  mark: int = 0) -> TestRunResult:
    """Run a tc program on ``packet`` (Ethernet frame) via BPF_PROG_TEST_RUN."""
    data = ct.create_string_buffer(packet, len(packet))
    out = ct.create_string_buffer(len(packet) + 256)
    ctx_in = SkBuffCtx()
    ctx_in.ifindex = ifindex
    ctx_in.mark = mark
    ctx_out = SkBuffCtx()
    opts = _TestRunOpts()
    opts.sz = ct.sizeof(_TestRunOpts)
    opts.data_in = ct.cast(data, ct.c_void_p)
    opts.data_size_in = len(packet)
    opts.data_out = ct.cast(out, ct.c_void_p)
    opts.data_size_out = len(out)
    opts.ctx_in = ct.cast(ct.pointer(ctx_in), ct.c_void_p)
    opts.ctx_size_in = ct.sizeof(SkBuffCtx)
    opts.ctx_out = ct.cast(ct.pointer(ctx_out), ct.c_void_p)
    opts.ctx_size_out = ct.sizeof(SkBuffCtx)
    opts.repeat = repeat
    rc = libbpf().bpf_prog_test_run_opts(prog_fd, ct.byref(opts))
    if rc != 0:
        e = _err(rc)
        raise OSError(e, os.strerror(e))
    return TestRunResult(int(opts.retval), int(opts.duration), int(ctx_out.mark))
