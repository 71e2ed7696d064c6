"""Glue: keep a policy engine's toFQDNs selectors in step with an FQDNCache.

The engine (``axoneme.core.policy.engine.PolicyEngine``, or anything with the
same two methods) says which ``FQDNPeer`` selectors its policies use
(``fqdn_selectors()``) and takes the IPs each one currently stands for
(``update_fqdn(peer, ips)``). This binds the two: every cache change updates
the selectors matching a changed name, and ``resync()`` (after a policy
change or a restore) updates them all.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import Any, Protocol

from axoneme.l7.dns._cache import FQDNCache
from axoneme.l7.dns._match import rule_matches

LOG = logging.getLogger(__name__)

__all__ = ["FQDNEngine", "FQDNSelectorSync"]


class FQDNEngine(Protocol):
    def fqdn_selectors(self) -> Iterable[Any]: ...

    def update_fqdn(self, peer: Any, ips: Iterable[str]) -> None: ...


class FQDNSelectorSync:
    """Subscribes to ``cache``; ``close()`` unsubscribes."""

    def __init__(self, cache: FQDNCache, engine: FQDNEngine, *, initial_sync: bool = True) -> None:
        self.cache = cache
        self.engine = engine
        # one update at a time, so two changes cannot reach the engine out of order
        self._lock = threading.Lock()
        self._unsubscribe = cache.subscribe(self._on_change)
        if initial_sync:
            self.resync()

    def _on_change(self, names: frozenset[str]) -> None:
        with self._lock:
            for peer in list(self.engine.fqdn_selectors()):
                if any(rule_matches(peer, n) for n in names):
                    self._update(peer)

    def _update(self, peer: Any) -> None:
        try:
            self.engine.update_fqdn(peer, sorted(self.cache.lookup(peer)))
        except Exception:
            LOG.exception("fqdn sync: update_fqdn(%r) failed", peer)

    def resync(self) -> None:
        """Push the cache's view of every selector the engine uses."""
        with self._lock:
            for peer in list(self.engine.fqdn_selectors()):
                self._update(peer)

    def close(self) -> None:
        self._unsubscribe()
