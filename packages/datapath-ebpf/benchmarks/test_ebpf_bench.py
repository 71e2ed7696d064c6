"""ebpf datapath benchmarks (pytest-benchmark, marker bench; AXONEME_BENCH_QUICK=1
keeps N <= 1k and few rounds).

- per-packet cost of the real from-container program (BPF_PROG_TEST_RUN, kernel-
  measured ns/packet) with 10 / 1k / 10k / 100k policy entries, hot key
  (aim <= 150 ns, flat within 1.3x across sizes); enforcement is checked in the
  same run (allowed -> TC_ACT_OK, denied -> TC_ACT_SHOT, counters moved)
- start() (BCC compile + load; aim <= 2 s)
- populating 100k policy entries (aim <= 1 s) and process RSS afterwards
  (aim <= 250 MB)

Numbers are reported in ``extra_info`` (see --benchmark-json) and logged.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator

import pytest
from axoneme.core.datapath import DatapathConfig, IPCacheChanges
from axoneme.core.endpoint import Endpoint
from axoneme.core.labels import Labels
from axoneme.core.mapstate import ALLOW, Direction, Entry, Key, MapChanges, MapState, Protocol

pytestmark = [pytest.mark.bench, pytest.mark.privileged]
LOG = logging.getLogger(__name__)
QUICK = os.environ.get("AXONEME_BENCH_QUICK") == "1"
SIZES = [10, 1000] if QUICK else [10, 1000, 10_000, 100_000]
REPEAT = 20_000 if QUICK else 1_000_000
ROUNDS = 2 if QUICK else 5
POPULATE = 1000 if QUICK else 100_000
OK, SHOT = 0, 2
LO = 1  # test runs only: nothing is attached to lo
EP = Endpoint(id=11, identity=4011, labels=Labels(), ipv4="10.244.252.1")
PEER_IP, PEER = "10.244.252.2", 4999
HOT = Key(PEER, Direction.EGRESS, Protocol.TCP, 80, 16)


def filler(n: int, ep_identity_base: int = 100_000) -> dict[Key, Entry]:
    """n entries besides the hot key: distinct identities and ports (a bushy trie)."""
    out: dict[Key, Entry] = {}
    for i in range(n - 1):
        out[Key(ep_identity_base + i, Direction(i & 1), Protocol.TCP, 1 + (i * 7919) % 65000, 16)] = ALLOW
    out[HOT] = ALLOW
    return out


@pytest.fixture(scope="module")
def bench_dp() -> Iterator:  # type: ignore[type-arg]
    if os.geteuid() != 0:
        pytest.skip("needs root: loads BPF programs and pins maps")
    from axoneme.datapath.ebpf import EbpfDatapath

    root = f"/sys/fs/bpf/axoneme-bench-{uuid.uuid4().hex[:8]}"
    dp = EbpfDatapath(DatapathConfig(bpffs_root=root, policy_map_max=max(SIZES) + 10,
                                     ct_max=4096, ipcache_max=1024, options={"max_endpoints": 4}))
    try:
        dp.start()
        dp._register(EP, LO, "lo")
        dp.ipcache_apply(IPCacheChanges(upserts={ipaddress.ip_network(f"{PEER_IP}/32"): PEER}))
        yield dp
    finally:
        dp.cleanup()
        shutil.rmtree(root, ignore_errors=True)


def ct_packets(dp) -> int:  # type: ignore[no-untyped-def]
    from axoneme.datapath.ebpf import _bpf
    from axoneme.datapath.ebpf import _layout as L

    fd, total = dp.map_fd("ax_ct"), 0
    for k in list(_bpf.map_keys(fd, L.Tuple)):
        v = L.CTEntry()
        if _bpf.map_lookup(fd, k, v):
            total += v.packets
    return total


@pytest.mark.parametrize("path", ["cached", "full"])
@pytest.mark.parametrize("n_entries", SIZES)
def test_bench_from_container_hot_key(benchmark, bench_dp, n_entries: int, path: str) -> None:  # type: ignore[no-untyped-def]
    """``cached``: an established connection (CT verdict cache of the current
    policy revision). ``full``: every packet runs the whole decision, ipcache and
    policy lookups (forced with the proxy's mark, which bypasses the cache)."""
    from axoneme.core.marks import MARK_MAGIC_PROXY_INGRESS
    from axoneme.datapath.ebpf import _bpf
    from axoneme.datapath.ebpf import _packets as P

    mark = MARK_MAGIC_PROXY_INGRESS if path == "full" else 0

    dp = bench_dp
    dp.sync(EP, MapState(filler(n_entries)))
    fd = dp.program_fd("from_container")
    allowed = P.ipv4(EP.ipv4, PEER_IP, sport=40000 + n_entries % 20000, dport=80,
                     flags=P.TCP_ACK, payload=b"x" * 64)
    denied = P.ipv4(EP.ipv4, PEER_IP, sport=40001, dport=81)
    pk0, _ = dp.policy_counters(EP, HOT)
    ct0 = ct_packets(dp)
    assert _bpf.prog_test_run(fd, allowed).retval == OK
    assert _bpf.prog_test_run(fd, denied).retval == SHOT
    durations: list[int] = []

    def once() -> None:
        r = _bpf.prog_test_run(fd, allowed, repeat=REPEAT, mark=mark)
        assert r.retval == OK
        durations.append(r.duration_ns)

    benchmark.pedantic(once, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    pk1, _ = dp.policy_counters(EP, HOT)
    # the hot entry decided: every packet on the full path; on the cached path
    # the first packet (and the first after each policy change)
    assert pk1 - pk0 >= (1 + REPEAT * ROUNDS if path == "full" else 1)
    assert ct_packets(dp) - ct0 >= REPEAT * ROUNDS  # every allowed packet was tracked
    best = min(durations)
    benchmark.extra_info.update({"ns_per_packet": best, "ns_per_packet_all": durations,
                                 "policy_entries": n_entries, "path": path})
    LOG.warning("from_container hot key, %s path, %d entries: %d ns/packet (rounds %s)",
                path, n_entries, best, durations)


def test_bench_start_compile(benchmark) -> None:  # type: ignore[no-untyped-def]
    if os.geteuid() != 0:
        pytest.skip("needs root: loads BPF programs and pins maps")
    from axoneme.datapath.ebpf import EbpfDatapath

    root = f"/sys/fs/bpf/axoneme-bench-{uuid.uuid4().hex[:8]}"
    times: list[float] = []

    def once() -> None:
        dp = EbpfDatapath(DatapathConfig(bpffs_root=root, ct_max=4096, ipcache_max=1024))
        t0 = time.perf_counter()
        dp.start()
        times.append(time.perf_counter() - t0)
        dp.stop()

    try:
        benchmark.pedantic(once, rounds=2 if QUICK else 3, iterations=1)
    finally:
        EbpfDatapath(DatapathConfig(bpffs_root=root)).cleanup()
        shutil.rmtree(root, ignore_errors=True)
    benchmark.extra_info["start_seconds"] = min(times)
    LOG.warning("start() (compile+load): %.3f s (rounds %s)", min(times), times)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def test_bench_populate(benchmark, bench_dp) -> None:  # type: ignore[no-untyped-def]
    dp = bench_dp
    ep = Endpoint(id=12, identity=4012, labels=Labels())
    entries = filler(POPULATE, ep_identity_base=300_000)
    times: list[float] = []

    def setup() -> tuple[tuple, dict]:  # type: ignore[type-arg]
        dp.sync(ep, MapState())
        return (), {}

    def once() -> None:
        t0 = time.perf_counter()
        dp.apply(ep, MapChanges(adds=entries))
        times.append(time.perf_counter() - t0)

    benchmark.pedantic(once, setup=setup, rounds=2 if QUICK else 3, iterations=1)
    assert len(dp.dump(ep)) == POPULATE
    rss = _rss_mb()
    dp.sync(ep, MapState())
    benchmark.extra_info.update({"populate_seconds": min(times), "entries": POPULATE,
                                 "rss_mb_after": rss})
    LOG.warning("populate %d entries: %.3f s (rounds %s); RSS after: %.0f MB",
                POPULATE, min(times), times, rss)
