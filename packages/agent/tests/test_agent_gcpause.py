"""_gcpause: the collector paused around bulk policy work, bulk allocations frozen."""

from __future__ import annotations

import gc
import weakref

import pytest
from axoneme.agent import _gcpause


class Obj:
    pass


@pytest.fixture(autouse=True)
def _collector_back() -> object:
    enabled = gc.isenabled()
    gc.enable()
    yield None
    gc.unfreeze()
    if not enabled:
        gc.disable()


def test_paused_nests_and_reenables_even_on_error() -> None:
    with _gcpause.paused():
        assert not gc.isenabled()
        with _gcpause.paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the outer pause still holds
    assert gc.isenabled()
    with pytest.raises(RuntimeError), _gcpause.paused():
        raise RuntimeError("boom")
    assert gc.isenabled()


def test_a_disabled_collector_stays_disabled() -> None:
    gc.disable()
    with _gcpause.paused():
        pass
    assert not gc.isenabled()


def test_small_block_is_not_frozen() -> None:
    before = gc.get_freeze_count()
    with _gcpause.paused():
        keep = [Obj() for _ in range(100)]
    assert gc.get_freeze_count() == before and len(keep) == 100


def test_bulk_block_is_frozen_and_still_freed_by_refcount() -> None:
    before = gc.get_freeze_count()
    with _gcpause.paused():
        bulk = [[Obj()] for _ in range(_gcpause.FREEZE_AFTER)]
    assert gc.get_freeze_count() >= before + _gcpause.FREEZE_AFTER
    probe = weakref.ref(bulk[0][0])
    del bulk  # the policy goes: reference counting frees frozen objects too
    assert probe() is None
    assert gc.get_freeze_count() < before + _gcpause.FREEZE_AFTER


def test_a_bulk_blocks_cyclic_garbage_is_collected_not_frozen() -> None:
    """A cycle that became garbage inside a bulk block (a restart's rebuild
    made 251k such objects at 50k peers) is freed when the block ends; what
    the block keeps is frozen."""
    with _gcpause.paused():
        bulk = [[Obj()] for _ in range(_gcpause.FREEZE_AFTER)]
        cyc = Obj()
        cyc.me = cyc  # type: ignore[attr-defined]
        probe = weakref.ref(cyc)
        del cyc  # garbage now, but only the cyclic collector can free it
        assert probe() is not None
    assert probe() is None
    assert gc.is_tracked(bulk[0]) and gc.get_freeze_count() >= _gcpause.FREEZE_AFTER


def _rss_anon_kb() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    return 0


def test_bulk_block_gives_the_freed_heap_back() -> None:
    """A bulk block's transient garbage (here ~64 MB of malloc'd buffers, freed
    before the block ends) does not stay in the process once it is over."""
    if not _gcpause.trim_heap() and _rss_anon_kb() == 0:
        pytest.skip("no glibc malloc_trim or no /proc/self/status RssAnon")
    base = _rss_anon_kb()
    with _gcpause.paused():
        keep = [[Obj()] for _ in range(_gcpause.FREEZE_AFTER)]
        # bytes > 512 come from malloc; interleaved with kept ones so the heap
        # top alone would not hold them
        junk = [bytearray(1024) for _ in range(64_000)]
        peak = _rss_anon_kb()
        del junk
    after = _rss_anon_kb()
    assert peak - base > 40_000, (base, peak)
    assert after - base < (peak - base) // 2, (base, peak, after)
    assert len(keep) == _gcpause.FREEZE_AFTER


def test_a_large_endpoint_view_is_followed_by_a_trim(monkeypatch: pytest.MonkeyPatch) -> None:
    """GET /v1/endpoints/<id> of a large policy (its entries' JSON: transient)
    trims the heap once the answer is sent; a small one does not. The
    answer is the JSON of endpoint_get, sent in chunks."""
    import asyncio
    from types import SimpleNamespace

    from aiohttp.test_utils import TestClient, TestServer
    from axoneme.agent._api import build_app

    trims: list[int] = []
    monkeypatch.setattr(_gcpause, "trim_heap", lambda: trims.append(1) or True)
    from axoneme.agent._views import json_chunks

    sizes = {1: _gcpause.TRIM_VIEW_BYTES // 16, 2: 3}  # entries of >= 16 bytes each
    views = SimpleNamespace(endpoint_get_json=lambda i: json_chunks(
        {"id": i, "policy": None}, {"policy": ({"key": str(n)} for n in range(sizes[i]))}))
    adopted = asyncio.Event()
    adopted.set()
    agent = SimpleNamespace(adopted=adopted, views=views, endpoints=None, policies=None,
                            namespaces=None, pods=None,
                            config=SimpleNamespace(k8s_mode=False, flow_injection=False))

    async def get(ep: int) -> int:
        async with TestClient(TestServer(build_app(agent))) as client:  # type: ignore[arg-type]
            resp = await client.get(f"/v1/endpoints/{ep}")
            assert resp.status == 200
            return len((await resp.json())["policy"])

    assert asyncio.run(get(2)) == 3 and trims == []
    assert asyncio.run(get(1)) == sizes[1] and trims == [1]


_HEAP_CHILD = r"""
import ctypes, sys, threading
from axoneme.agent import _gcpause
libc = ctypes.CDLL(None)
glibc = hasattr(libc, "mallopt") and hasattr(libc, "malloc_info")
tuned = sys.argv[1] == "tuned" and _gcpause.tune_heap()
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]

def anon_kb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])

# a freed 16 MB table raises glibc's moving mmap threshold to 16 MB ...
big = libc.malloc(16 << 20); libc.memset(big, 1, 16 << 20); libc.free(big)
base = anon_kb()
# ... then an 8 MB one comes from the heap, and stays there once freed
table = libc.malloc(8 << 20); libc.memset(table, 1, 8 << 20); libc.free(table)
kept_kb = anon_kb() - base
# a thread's allocations: an arena of its own unless tuned
t = threading.Thread(target=lambda: libc.free(libc.malloc(1000)))
t.start(); t.join()
libc.open_memstream.restype = ctypes.c_void_p
buf, size = ctypes.c_char_p(), ctypes.c_size_t()
fp = libc.open_memstream(ctypes.byref(buf), ctypes.byref(size))
libc.malloc_info(0, ctypes.c_void_p(fp)); libc.fflush(ctypes.c_void_p(fp))
heaps = buf.value.decode().count("<heap nr=")
libc.fclose(ctypes.c_void_p(fp))
print(int(glibc), int(bool(tuned)), kept_kb, heaps)
"""


def _heap_child(mode: str) -> tuple[int, int, int, int]:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _HEAP_CHILD, mode], capture_output=True,
                         text=True, timeout=60, check=True).stdout.split()
    glibc, tuned, kept_kb, heaps = (int(x) for x in out)
    return glibc, tuned, kept_kb, heaps


def test_tuned_heap_returns_freed_tables_and_keeps_one_arena() -> None:
    """``tune_heap`` (the agent's start): a large freed block leaves no pages
    behind even after a larger one moved glibc's threshold, and a thread
    allocates from the one arena. The untuned child shows both effects: an
    8 MB table kept resident after its free, a second arena."""
    glibc, tuned, kept_kb, heaps = _heap_child("tuned")
    if not glibc:
        pytest.skip("not glibc: no mallopt or malloc_info")
    assert tuned
    assert kept_kb < 1024, kept_kb
    assert heaps == 1, heaps
    _, _, kept_untuned, heaps_untuned = _heap_child("plain")
    assert kept_untuned > 6 * 1024 and heaps_untuned >= 2, (kept_untuned, heaps_untuned)


def test_the_agent_tunes_the_heap_before_its_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    from axoneme.agent import _daemon

    order: list[str] = []

    def tune() -> bool:
        order.append("tune")
        return True

    monkeypatch.setattr(_gcpause, "tune_heap", tune)

    async def serve(config: object) -> int:
        order.append("serve")
        return 0

    monkeypatch.setattr(_daemon, "_serve", serve)
    assert _daemon.run_agent(object()) == 0  # type: ignore[arg-type]
    assert order == ["tune", "serve"]
