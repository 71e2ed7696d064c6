"""After a compile the agent pages out the compiler's code (issue 17: RSS).

A file named like the compiler library, mapped read-only and touched, loses
its resident pages to ``page_out_compiler``; a writable mapping and a file of
another name keep theirs. No root, no BPF: only mmap and /proc/self/smaps.
"""

from __future__ import annotations

import mmap
from pathlib import Path

from axoneme.datapath.ebpf import _bpf

SIZE = 4 << 20


def _resident_kb(path: Path) -> int:
    """Rss of this process's mappings of ``path`` (kB)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and ":" not in head[0]:
            inside = line.rstrip().endswith(str(path))
        elif inside and head[0] == "Rss:":
            total += int(head[1])
    return total


def _mapped(path: Path, writable: bool = False) -> mmap.mmap:
    path.write_bytes(b"\x5a" * SIZE)
    with open(path, "r+b" if writable else "rb") as f:
        m = mmap.mmap(f.fileno(), SIZE, mmap.MAP_PRIVATE,
                      mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0))
    for off in range(0, SIZE, mmap.PAGESIZE):
        m[off]  # fault every page in
    return m


def test_compiler_code_pages_are_paged_out(tmp_path: Path) -> None:
    llvm, other = tmp_path / "libLLVM-test.so.1", tmp_path / "libother-test.so"
    maps = [_mapped(llvm), _mapped(other)]
    try:
        assert _resident_kb(llvm) >= SIZE // 1024 * 3 // 4
        advised = _bpf.page_out_compiler()
        assert advised >= SIZE
        assert _resident_kb(llvm) < SIZE // 1024 // 4, "the compiler's pages stayed resident"
        assert _resident_kb(other) >= SIZE // 1024 * 3 // 4, "another file's pages went too"
    finally:
        for m in maps:
            m.close()


def test_writable_mappings_are_left_alone(tmp_path: Path) -> None:
    lib = tmp_path / "libclang-test.so"
    m = _mapped(lib, writable=True)
    try:
        m[0:4] = b"edit"  # a private dirty page: MADV_PAGEOUT must never be asked for it
        before = _resident_kb(lib)
        assert _bpf.page_out_compiler() == 0 or _resident_kb(lib) == before
        assert m[0:4] == b"edit"
    finally:
        m.close()
