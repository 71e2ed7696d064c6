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


def trim_heap() -> bool:
    """Give the C heap's free pages back to the OS (glibc ``malloc_trim``)."""
    try:
        return bool(ctypes.CDLL(None).malloc_trim(0))
    except (OSError, AttributeError):  # not glibc
        LOG.debug("malloc_trim unavailable", exc_info=True)
        return False


__all__ = ["FREEZE_AFTER", "TRIM_VIEW_BYTES", "paused", "trim_heap"]
