"""The cyclic garbage collector paused around bulk policy work.

A 50k-peer policy allocates about a million container objects (selectors,
identities, map keys, their sets and dicts). With the collector on, every
700 allocations start a young collection and each 25 % of heap growth a
full one, so loading that policy spent ~60 % of its time in the collector
(issue 17: 5.4 s -> 2.2 s for the engine alone). The objects are long
lived: they stay until the policy goes, and then reference counting frees
them (cycles are rare; a full ``gc.collect()`` after such a load finds none).

``paused()`` disables the collector for the block (nesting allowed; only on
the agent's loop thread). When the block allocated more than
``FREEZE_AFTER`` objects, the cyclic garbage the block made is collected
first (one ``gc.collect()``: it scans the objects not frozen yet, which are
about the block's; ~0.1 s per million), then the survivors are moved to the
permanent generation (``gc.freeze()``, O(1)) instead of being scanned again
at every full collection later; anything frozen is still freed by reference
counting. Without that collection a restart's background rebuild froze its
cycles for good (issue 17: 251k garbage objects at 50k peers). A cycle that
becomes garbage after its objects were frozen still stays until the process
ends. Small blocks (one policy change) just re-enable.

After such a bulk block the C heap is trimmed (``malloc_trim``): a large
policy's load or a restart's recompute frees as much transient memory
(request bodies, parse trees, old map states) as it keeps, and glibc holds
freed pages inside the heap until asked; the agent is long lived.

What a trim cannot give back is free space scattered between live blocks,
and the C heap scatters it unless tuned at the agent's start
(``tune_heap``): glibc gives each thread that allocates an arena of its own
(up to 8 per CPU) and, once a large freed block has raised its moving
``mmap`` threshold, serves the large blocks (a dict or set table of a
100k-entry policy: 1-16 MB) from those arenas instead of pages of their
own. A restart's rebuild runs in worker threads and makes and drops such
tables (the kernel's dumps, the comparison's maps): at 100k peers the
restarted agent held 0-17 MB more than the one that loaded the same policy,
with the same live objects and the same bytes in use, by which threads
happened to run what (issue 17, RESTARTRSS in bench-results/ANALYSIS.md).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

LOG = logging.getLogger(__name__)
FREEZE_AFTER = 200_000  # container objects allocated in one pause
TRIM_VIEW_BYTES = 4 << 20  # an endpoint view this large is followed by trim_heap (the API)

_depth = 0
_was_enabled = False


@contextmanager
def paused() -> Iterator[None]:
    global _depth, _was_enabled
    if _depth == 0:
        _was_enabled = gc.isenabled()
        gc.disable()
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0 and _was_enabled:
            if gc.get_count()[0] >= FREEZE_AFTER:
                gc.collect()  # the block's cycles, before freezing keeps them
                gc.freeze()
                trim_heap()
            gc.enable()


@contextlib.asynccontextmanager
async def paused_async() -> AsyncIterator[None]:
    """``paused()`` around a coroutine's awaits (the block still begins and
    ends on the loop thread; its worker threads run with the collector off
    too: it is process-wide)."""
    with paused():
        yield


# glibc's mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
MMAP_THRESHOLD = 256 << 10  # a block this large gets pages of its own, returned when freed
ARENA_MAX = 1  # threads run Python under one lock: one arena loses nothing to contention


def tune_heap() -> bool:
    """Set the C heap up for a long-lived process that makes and drops large
    tables: one arena for every thread, and blocks of ``MMAP_THRESHOLD`` or
    more mapped on their own (a fixed threshold: glibc's moving one is
    turned off). Call before the process starts threads. False when this is
    not glibc."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        LOG.debug("mallopt unavailable", exc_info=True)
        return False
    return bool(mallopt(_M_ARENA_MAX, ARENA_MAX)) and bool(
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def trim_heap() -> bool:
    """Give the C heap's free pages back to the OS (glibc ``malloc_trim``)."""
    try:
        return bool(ctypes.CDLL(None).malloc_trim(0))
    except (OSError, AttributeError):  # not glibc
        LOG.debug("malloc_trim unavailable", exc_info=True)
        return False


__all__ = ["FREEZE_AFTER", "TRIM_VIEW_BYTES", "paused", "trim_heap", "tune_heap"]
