"""Loopback harness for the DNS tests: a dnslib upstream and a background loop."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

_spec = importlib.util.spec_from_file_location("axoneme_dns_upstream",
                                               Path(__file__).with_name("dns_upstream.py"))
assert _spec is not None and _spec.loader is not None
dns_upstream = importlib.util.module_from_spec(_spec)
sys.modules["axoneme_dns_upstream"] = dns_upstream
_spec.loader.exec_module(dns_upstream)

UPSTREAM_SCRIPT = Path(__file__).with_name("dns_upstream.py")


class Loop:
    """An asyncio loop in a daemon thread; ``run(coro)`` waits for the result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 10) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def dns_loop() -> Iterator[Loop]:
    loop = Loop()
    try:
        yield loop
    finally:
        loop.close()


@pytest.fixture
def upstream() -> Iterator[Any]:
    up = dns_upstream.Upstream().start()
    try:
        yield up
    finally:
        up.stop()


@pytest.fixture
def dnsutil() -> Any:
    """The helper module: ``Upstream``, ``udp_ask``, ``tcp_ask``, ``ZONE``."""
    return dns_upstream
