"""toFQDNs in the agent: one DNS cache per node, bound to the policy engine.

The DNS proxy (``axoneme.l7.dns``, loaded by entry point) records every
answer it relays in the node's ``FQDNCache``; an ``FQDNSelectorSync`` turns
cache changes into ``engine.update_fqdn`` calls (``/32`` CIDR identities in
the ipcache). ``on_answer`` -- awaited by the proxy *before* it relays the
answer, as Cilium holds DNS responses -- pushes the resulting ipcache and
MapState changes to the datapath, so the client's first connection to a
freshly resolved IP is already allowed. Expiry revokes; the cache is saved
in the state dir (atomically, on change) and restored at start, so learned
names survive an agent restart.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from axoneme.agent._config import AgentConfig
from axoneme.agent._metrics import AgentMetrics
from axoneme.agent._statefile import StateCorrupt, read_json, write_json_atomic
from axoneme.core.errors import ConfigError
from axoneme.core.hookspecs import hookimpl
from axoneme.core.l7 import FQDNParser, fqdn_parser
from axoneme.core.policy.engine import PolicyEngine

LOG = logging.getLogger(__name__)

FQDN_STATE_FILE = "fqdn-cache.json"
REJECT_RCODES = ("REFUSED", "NXDOMAIN")
# how long at most a snapshot may lag behind TTL refreshes (which are not
# cache "changes" but move expiries)
SNAPSHOT_REFRESH = 5.0


class FQDNManager:
    """The agent's toFQDNs state. ``start()`` on the agent loop, ``stop()`` at shutdown.

    ``proxy_kwargs(parser)`` is what the agent passes to
    ``ProxyManager.acquire`` for that parser (only the DNS parser gets any).
    ``regenerate`` is the regenerator's ``regenerate_sync`` (the only writer
    to the datapath); ``lock`` the agent's state lock; ``pm`` the plugin
    manager it registers its policy-change hook with."""

    def __init__(self, config: AgentConfig, engine: PolicyEngine,
                 regenerate: Callable[[], dict[int, str]], pm: Any, lock: asyncio.Lock,
                 metrics: AgentMetrics | None = None) -> None:
        self.engine = engine
        self.regenerate = regenerate
        self.pm = pm
        self.lock = lock
        self.metrics = metrics
        self.cache: Any = None
        self.sync: Any = None
        self._parser: FQDNParser | None = None
        self.path = os.path.join(config.state_dir, FQDN_STATE_FILE)
        self._dirty = False  # the cache changed: push and save a snapshot
        self._regen = False  # the toFQDNs selectors changed: push
        self._selectors: frozenset[Any] = frozenset()  # as of the last policy_changed
        self._changed_at: float | None = None  # first cache change not pushed yet (perf_counter)
        self._last_write = 0.0
        self._push_lock = threading.Lock()
        self._unsubscribe: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[Any] | None = None
        self._pending: set[asyncio.Future[Any]] = set()
        rcode = str(getattr(config, "dns_reject_rcode", "REFUSED") or "REFUSED").upper()
        if rcode == "NAMEERROR":
            rcode = "NXDOMAIN"
        if rcode not in REJECT_RCODES:
            raise ConfigError(f"dns_reject_rcode must be one of {', '.join(REJECT_RCODES)}, "
                              f"got {rcode!r}")
        self.reject_rcode = rcode
        self.min_ttl = int(getattr(config, "tofqdns_min_ttl", 0) or 0)
        if self.min_ttl < 0:
            raise ConfigError(f"tofqdns_min_ttl must be >= 0, got {self.min_ttl}")

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> bool:
        """Build the cache (restored from the state dir) and bind it to the engine.

        Call after the persisted policies are back in the engine and before
        the endpoints are synced, so the first sync already holds the learned
        IPs. False (and toFQDNs stays empty) when no installed L7 parser
        learns DNS names."""
        parser = fqdn_parser()
        if parser is None:
            LOG.info("no installed L7 parser learns DNS names: toFQDNs selectors select nothing")
            return False
        self._parser = parser
        self.cache = parser.new_fqdn_cache(min_ttl=self.min_ttl)
        try:
            data = read_json(self.path)
        except StateCorrupt as e:
            LOG.warning("ignoring the FQDN cache snapshot: %s", e)
            data = None
        if data is not None:
            try:
                self.cache.restore(data)
                LOG.info("restored %d learned DNS names", len(self.cache.names()))
            except (ValueError, TypeError) as e:
                LOG.warning("ignoring the FQDN cache snapshot %s: %s", self.path, e)
        self._unsubscribe = self.cache.subscribe(self._on_change)
        self._selectors = frozenset(self.engine.fqdn_selectors())
        self.sync = parser.bind_engine(self.cache, self.engine)  # resyncs once
        self.pm.register(_PolicyHook(self), name=f"axoneme-fqdn-{id(self)}")
        try:
            self._loop = asyncio.get_running_loop()
            self._task = asyncio.create_task(self._expiry_loop())
        except RuntimeError:  # no loop (unit use): the caller runs expire_now()
            self._loop = None
        return True

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        if self.cache is not None:
            await asyncio.to_thread(self.save, True)
        if self.sync is not None:
            self.sync.close()
        if self._unsubscribe is not None:
            self._unsubscribe()

    def proxy_kwargs(self, parser: str) -> dict[str, Any]:
        """Extra ``ProxyManager.acquire`` arguments: the DNS proxy's toFQDNs hooks."""
        if self.cache is None or self._parser is None or parser != self._parser.name:
            return {}
        # the agent reaches the DNS plugin only through its entry point (import rules)
        return {"cache": self.cache, "on_answer": self.on_answer,
                "dns_config": self._parser.proxy_config(reject_rcode=self.reject_rcode)}

    # -- the hooks -------------------------------------------------------------------
    def _on_change(self, names: frozenset[str]) -> None:
        if self._changed_at is None:
            self._changed_at = time.perf_counter()
        self._dirty = True
        LOG.debug("DNS cache changed: %s", ", ".join(sorted(names)))

    async def on_answer(self, name: str, ips: frozenset[str], ttl: int) -> None:
        """Awaited by the DNS proxy (on its own loop) before the answer is relayed.

        The cache (recorded just before) has already updated the engine; this
        pushes the ipcache and policy changes into the kernel; the time from
        the cache change to here is the ``answer -> allowed`` metric."""
        since = await asyncio.to_thread(self.push)
        if since is not None and self.metrics is not None:
            self.metrics.fqdn_allowed.observe(time.perf_counter() - since)

    def push(self) -> float | None:
        """Datapath update + snapshot when the cache changed (any thread).

        Returns when the pushed change was first seen (perf_counter), or None."""
        with self._push_lock:
            changed, self._dirty = self._dirty, False  # the cache changed
            regen, self._regen = changed or self._regen, False  # ... or the selectors
            since, self._changed_at = self._changed_at, None
            if regen:
                try:
                    errors = self.regenerate()
                    if errors:
                        LOG.error("toFQDNs update failed for endpoints %s", errors)
                except Exception:
                    LOG.exception("pushing toFQDNs changes to the datapath failed")
            if changed or time.monotonic() - self._last_write > SNAPSHOT_REFRESH:
                self.save()
            return since if changed else None

    def save(self, force: bool = False) -> None:
        """Atomic snapshot of the cache into the state dir."""
        if self.cache is None:
            return
        try:
            write_json_atomic(self.path, self.cache.snapshot())
            self._last_write = time.monotonic()
        except OSError as e:
            LOG.warning("cannot save the FQDN cache to %s: %s", self.path, e)

    def expire_now(self) -> frozenset[str]:
        """Drop due entries and push the revocation (any thread)."""
        if self.cache is None:
            return frozenset()
        changed: frozenset[str] = self.cache.expire()
        if changed:
            LOG.info("DNS names expired: %s", ", ".join(sorted(changed)))
            self.push()
        return changed

    async def _expiry_loop(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.expire_now)
            except Exception:
                LOG.exception("FQDN cache expiry failed")
            nxt = self.cache.next_expiry()
            delay = 5.0 if nxt is None else nxt - time.time()
            await asyncio.sleep(min(max(delay, 0.1), 5.0))

    def policy_changed(self) -> None:
        """New or removed toFQDNs selectors: give them the cache's IPs, then push.

        A policy change that leaves the set of toFQDNs selectors as it was
        (most: the others already hold the cache's IPs) costs nothing here:
        no resync, no second regeneration, no snapshot write."""
        if self.sync is None:
            return
        selectors = frozenset(self.engine.fqdn_selectors())
        if selectors == self._selectors:
            return
        self._selectors = selectors
        self.sync.resync()
        self._regen = True
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._spawn_push)

    def _spawn_push(self) -> None:
        task = asyncio.ensure_future(self._push_locked())
        self._pending.add(task)  # a reference until done (the loop only keeps weak ones)
        task.add_done_callback(self._pending.discard)

    async def _push_locked(self) -> None:
        async with self.lock:
            await asyncio.to_thread(self.push)

    def view(self) -> list[dict[str, Any]]:
        """The learned names (for status/debugging)."""
        if self.cache is None:
            return []
        return [{"name": e.name, "ip": e.ip, "expires": e.expires} for e in self.cache.entries()]


class _PolicyHook:
    """pluggy plugin: resync toFQDNs selectors after every policy change."""

    def __init__(self, mgr: FQDNManager) -> None:
        self.mgr = mgr

    @hookimpl
    def axoneme_policy_changed(self, revision: int, added: list[Any], removed: list[Any]) -> None:
        self.mgr.policy_changed()


__all__ = ["FQDNManager", "FQDN_STATE_FILE", "REJECT_RCODES"]
