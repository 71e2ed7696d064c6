"""Small regenerations run on the agent's loop while they stay cheap (_regenerator):
what counts is the write's own time, not a worker thread's hand-off."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace
from typing import Any

import pytest
from axoneme.agent import _regenerator
from axoneme.agent._metrics import AgentMetrics
from axoneme.agent._regenerator import Regenerator


def test_a_slow_thread_hand_off_does_not_keep_small_changes_off_the_loop(
        monkeypatch: pytest.MonkeyPatch) -> None:
    engine = SimpleNamespace(pending_size=lambda: 1)
    store = SimpleNamespace(endpoints={})
    regen = Regenerator(engine, store, AgentMetrics(), proxies=None)  # type: ignore[arg-type]
    on_loop: list[bool] = []

    def regenerate_sync() -> dict[int, str]:
        on_loop.append(threading.current_thread() is threading.main_thread())
        return {}

    monkeypatch.setattr(regen, "regenerate_sync", regenerate_sync)
    real = asyncio.to_thread

    async def slow_hand_off(fn: Any, *args: Any) -> Any:
        await asyncio.sleep(5 * _regenerator.INLINE_COST_S)  # a loaded machine's thread wake-up
        return await real(fn, *args)

    monkeypatch.setattr(asyncio, "to_thread", slow_hand_off)

    async def run() -> None:
        for _ in range(3):
            await regen.regenerate()

    asyncio.run(run())
    # the first has no cost known yet: a thread; then its write was cheap: the loop
    assert on_loop == [False, True, True]
