"""The policy engine's memory on B5's workload (issue 17: agent RSS at 100k identities).

A server endpoint with an N-peer ``fromCIDR`` policy (/32s, TCP and UDP: 2N
entries, N CIDR identities), its changes handed out as the agent does; then
the process's RSS, and with ``--trace DEPTH`` the live allocations the load
added, grouped by where they were made (tracemalloc; slow)::

    .venv/bin/python tests/bench/engine_rss.py 100000
    .venv/bin/python tests/bench/engine_rss.py 100000 --trace 1 --top 30
    .venv/bin/python tests/bench/engine_rss.py 100000 --replace 3

``--replace K`` then replaces the policy K times by one with N other peers
(the CIDR identities of the peers a policy no longer uses are released).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import profile_engine as pe  # noqa: E402
from axoneme.core.policy.parse import parse_policy_obj  # noqa: E402


def rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _load(engine: object, n: int, first: int) -> int:
    """Apply (or replace) the N-peer policy, peers from ``first``; entries handed out."""
    obj = pe._cnp("peers", [{"fromCIDR": [f"{pe.FAKE.network_address + 1 + first + i}/32"
                                          for i in range(n)],
                             "toPorts": pe._ports("TCP", "UDP")}])
    engine.upsert_policy(parse_policy_obj(obj, "bench", 0))  # type: ignore[attr-defined]
    del obj  # the policy keeps its own copy (Policy.raw); the agent keeps a packed one (f02b4e7)
    adds = len(engine.pending_changes()[1].adds)  # type: ignore[attr-defined]
    engine.pending_ipcache_changes()  # type: ignore[attr-defined]
    return adds


def _settled_rss() -> float:
    gc.collect()
    ctypes.CDLL(None).malloc_trim(0)  # as the agent after a bulk block (_gcpause)
    return rss_mb()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("n", type=int, nargs="?", default=100_000)
    ap.add_argument("--trace", type=int, default=0, metavar="DEPTH",
                    help="tracemalloc with this many frames (0: off)")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--replace", type=int, default=0, metavar="K",
                    help="then replace the policy K times, N other peers each time")
    a = ap.parse_args(argv)
    before = rss_mb()
    if a.trace:
        tracemalloc.start(a.trace)
    engine = pe.server_and_client()
    snap0 = tracemalloc.take_snapshot() if a.trace else None
    t0 = time.perf_counter()
    adds = _load(engine, a.n, 0)
    took = time.perf_counter() - t0
    print(f"N={a.n:,}: {adds:,} entries in {took:.2f} s; RSS {before:.0f} -> {_settled_rss():.0f} MB")
    for k in range(1, a.replace + 1):
        t0 = time.perf_counter()
        _load(engine, a.n, k * a.n)
        took = time.perf_counter() - t0
        print(f"replaced by {a.n:,} other peers ({k}) in {took:.2f} s: RSS {_settled_rss():.0f} MB, "
              f"{len(engine.allocator.cidr_identities()):,} CIDR identities held"
              + (f", live allocations {tracemalloc.get_traced_memory()[0] / 2**20:.1f} MB"
                 if a.trace else ""))
    if snap0 is not None:
        stats = tracemalloc.take_snapshot().compare_to(snap0, "traceback")
        print(f"allocations the load left: {sum(s.size_diff for s in stats) / 2**20:.1f} MB")
        for s in stats[:a.top]:
            where = " <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}"
                                for f in s.traceback)
            print(f"{s.size_diff / 2**20:8.1f} MB {s.count_diff:9,d}  {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
