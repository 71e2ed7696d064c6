"""The FQDN cache: names learned from DNS answers -> IPs, with TTLs (toFQDNs).

The DNS proxy records every allowed answer here before the client sees it;
the policy engine asks ``lookup(FQDNPeer)`` for the IPs a ``toFQDNs``
selector currently stands for and subscribes to change notifications to
re-resolve those selectors.

Semantics (Cilium pkg/fqdn, ``--tofqdns-*`` flags):

1. An answer's IPs belong to the query name and to every CNAME of its chain.
2. Each (name, IP) pair expires at ``now + max(ttl, min_ttl)``; a newer
   answer can only extend the expiry, never shorten it.
3. ``min_ttl`` defaults to 0: the upstream's TTLs are honoured, as in
   current Cilium (``--tofqdns-min-ttl=0``; older releases defaulted to
   3600 s). An agent that wants stability over freshness passes e.g. 3600.
4. At most ``max_ips_per_name`` (default 50, Cilium
   ``--tofqdns-endpoint-max-ip-per-hostname``) IPs per name; the pair with
   the oldest expiry goes first. Cilium spares IPs still used by live
   connections; this cache has no connection view, so an agent that keeps
   long-lived connections should raise ``min_ttl`` instead.
5. Nothing expires by itself: ``expire(now)`` removes what is due and
   reports the names whose IP set changed, so the policy engine sees
   exactly the changes the cache makes (one clock, one place).

Names are stored in normal form (lower-case, trailing dot). Thread-safe:
the proxy (asyncio) and the agent's engine (any thread) share one cache;
callbacks run outside the lock.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from axoneme.l7.dns._match import normalize_name, rule_matches

LOG = logging.getLogger(__name__)

__all__ = ["FQDNCache", "FQDNEntry", "DEFAULT_MIN_TTL", "DEFAULT_MAX_IPS_PER_NAME",
           "SNAPSHOT_VERSION"]

DEFAULT_MIN_TTL = 0
DEFAULT_MAX_IPS_PER_NAME = 50
SNAPSHOT_VERSION = 1

ChangeCallback = Callable[[frozenset[str]], None]


@dataclass(frozen=True, slots=True)
class FQDNEntry:
    """One learned (name, IP) pair."""

    name: str
    ip: str
    expires: float  # unix time
    learned: float  # when the pair was first seen (kept across refreshes)


def _norm_ip(ip: str) -> str:
    return str(ipaddress.ip_address(ip))


class FQDNCache:
    """name -> {IP -> expiry}, fed by DNS answers, read by toFQDNs selectors."""

    def __init__(self, *, min_ttl: int = DEFAULT_MIN_TTL,
                 max_ips_per_name: int = DEFAULT_MAX_IPS_PER_NAME,
                 clock: Callable[[], float] = time.time,
                 on_change: ChangeCallback | None = None) -> None:
        if min_ttl < 0:
            raise ValueError("min_ttl must be >= 0")
        if max_ips_per_name < 1:
            raise ValueError("max_ips_per_name must be >= 1")
        self.min_ttl = min_ttl
        self.max_ips_per_name = max_ips_per_name
        self._clock = clock
        self._lock = threading.Lock()
        self._names: dict[str, dict[str, FQDNEntry]] = {}
        self._subscribers: list[ChangeCallback] = []
        if on_change is not None:
            self._subscribers.append(on_change)

    # --- notifications ------------------------------------------------------

    def subscribe(self, callback: ChangeCallback) -> Callable[[], None]:
        """Call ``callback(names)`` with the names whose IP set changed after
        every change. Returns a function that unsubscribes."""
        with self._lock:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)
        return unsubscribe

    def _notify(self, changed: set[str]) -> frozenset[str]:
        names = frozenset(changed)
        if not names:
            return names
        with self._lock:
            subs = list(self._subscribers)
        for cb in subs:
            try:
                cb(names)
            except Exception:  # a subscriber bug must not break DNS
                LOG.exception("fqdn cache subscriber %r failed", cb)
        return names

    # --- writes -------------------------------------------------------------

    def record(self, name: str, ips: Iterable[str], ttl: int, *,
               now: float | None = None) -> frozenset[str]:
        """Learn ``ips`` for ``name`` valid for ``ttl`` seconds (raised to
        ``min_ttl``). Returns (and notifies) the names whose IP set changed."""
        return self.record_many([name], ips, ttl, now=now)

    def record_many(self, names: Iterable[str], ips: Iterable[str], ttl: int, *,
                    now: float | None = None) -> frozenset[str]:
        """Learn the same ``ips`` for several names (an answer's CNAME chain)."""
        now = self._clock() if now is None else now
        expires = now + max(int(ttl), self.min_ttl)
        ip_list = [_norm_ip(ip) for ip in ips]
        changed: set[str] = set()
        if not ip_list:
            return frozenset()
        with self._lock:
            for raw in names:
                name = normalize_name(raw)
                entries = self._names.setdefault(name, {})
                for ip in ip_list:
                    old = entries.get(ip)
                    if old is None:
                        entries[ip] = FQDNEntry(name, ip, expires, now)
                        changed.add(name)
                    elif expires > old.expires:
                        entries[ip] = FQDNEntry(name, ip, expires, old.learned)
                if len(entries) > self.max_ips_per_name:
                    # Evict the pairs closest to expiry (oldest information)
                    # but never one just learned from this answer.
                    fresh = set(ip_list)
                    victims = sorted((e for e in entries.values() if e.ip not in fresh),
                                     key=lambda e: (e.expires, e.learned))
                    for e in victims[:len(entries) - self.max_ips_per_name]:
                        del entries[e.ip]
                        changed.add(name)
                    while len(entries) > self.max_ips_per_name:  # answer itself too big
                        del entries[next(iter(entries))]
        return self._notify(changed)

    def record_answer(self, answer: Any, *, now: float | None = None) -> frozenset[str]:
        """Learn from a parsed answer (``DnsAnswer``): its IPs for every name of
        its CNAME chain, with its (lowest) TTL. Non-NOERROR answers teach nothing."""
        if answer.rcode != 0 or not answer.ips:
            return frozenset()
        return self.record_many(answer.names, answer.ips, answer.ttl, now=now)

    def forget(self, name: str) -> frozenset[str]:
        """Drop everything learned for ``name`` (``axoneme fqdn cache clean``)."""
        name = normalize_name(name)
        with self._lock:
            gone = self._names.pop(name, None)
        return self._notify({name} if gone else set())

    def clear(self) -> frozenset[str]:
        with self._lock:
            names = set(self._names)
            self._names.clear()
        return self._notify(names)

    def expire(self, now: float | None = None) -> frozenset[str]:
        """Remove pairs whose expiry is <= ``now``; returns (and notifies) the
        names whose IP set changed."""
        now = self._clock() if now is None else now
        changed: set[str] = set()
        with self._lock:
            for name in list(self._names):
                entries = self._names[name]
                for ip in [ip for ip, e in entries.items() if e.expires <= now]:
                    del entries[ip]
                    changed.add(name)
                if not entries:
                    del self._names[name]
        return self._notify(changed)

    def next_expiry(self) -> float | None:
        """The earliest expiry held (for scheduling ``expire``), None if empty."""
        with self._lock:
            return min((e.expires for es in self._names.values() for e in es.values()),
                       default=None)

    async def run_expiry(self, *, max_interval: float = 5.0, min_interval: float = 0.1) -> None:
        """Expire entries as they fall due, forever (run it as a task; cancel to
        stop). Sleeps until the next expiry, at most ``max_interval`` (new
        entries may expire sooner than what was due when it went to sleep)."""
        import asyncio
        while True:
            self.expire()
            nxt = self.next_expiry()
            delay = max_interval if nxt is None else nxt - self._clock()
            await asyncio.sleep(min(max(delay, min_interval), max_interval))

    # --- reads --------------------------------------------------------------

    def lookup_name(self, name: str) -> frozenset[str]:
        """IPs currently held for exactly ``name``."""
        with self._lock:
            return frozenset(self._names.get(normalize_name(name), {}))

    def lookup(self, selector: Any) -> frozenset[str]:
        """IPs of every name a ``toFQDNs`` selector (``FQDNPeer``: match_name or
        match_pattern; also a ``DNSRule`` or a ``{matchName|matchPattern}``
        mapping) selects."""
        with self._lock:
            items = [(n, list(es)) for n, es in self._names.items()]
        out: set[str] = set()
        for name, ips in items:
            if rule_matches(selector, name):
                out.update(ips)
        return frozenset(out)

    def names_matching(self, selector: Any) -> frozenset[str]:
        with self._lock:
            names = list(self._names)
        return frozenset(n for n in names if rule_matches(selector, n))

    def names_for_ip(self, ip: str) -> frozenset[str]:
        """Names an IP was learned for (Hubble ``destination_names``)."""
        ip = _norm_ip(ip)
        with self._lock:
            return frozenset(n for n, es in self._names.items() if ip in es)

    def entries(self) -> list[FQDNEntry]:
        """Every pair, sorted by name then IP (``axoneme fqdn cache list``)."""
        with self._lock:
            return sorted((e for es in self._names.values() for e in es.values()),
                          key=lambda e: (e.name, e.ip))

    def names(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._names)

    def __len__(self) -> int:
        with self._lock:
            return sum(len(es) for es in self._names.values())

    # --- persistence --------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """A JSON-able copy (absolute expiry times) for the agent's state dir."""
        return {"version": SNAPSHOT_VERSION,
                "min_ttl": self.min_ttl,
                "max_ips_per_name": self.max_ips_per_name,
                "entries": [{"name": e.name, "ip": e.ip, "expires": e.expires,
                             "learned": e.learned} for e in self.entries()]}

    def restore(self, data: dict[str, Any], *, now: float | None = None) -> frozenset[str]:
        """Merge a ``snapshot()`` back in (after an agent restart), skipping
        pairs that expired meanwhile and malformed items. Returns (and
        notifies) the names whose IP set changed."""
        if not isinstance(data, dict) or data.get("version") != SNAPSHOT_VERSION:
            raise ValueError("not an FQDN cache snapshot of version "
                             f"{SNAPSHOT_VERSION}")
        now = self._clock() if now is None else now
        changed: set[str] = set()
        with self._lock:
            for item in data.get("entries", []):
                try:
                    name = normalize_name(str(item["name"]))
                    ip = _norm_ip(str(item["ip"]))
                    expires = float(item["expires"])
                    learned = float(item.get("learned", now))
                except (KeyError, TypeError, ValueError):
                    LOG.warning("fqdn cache snapshot: skipping bad entry %r", item)
                    continue
                if expires <= now:
                    continue
                entries = self._names.setdefault(name, {})
                old = entries.get(ip)
                if old is None:
                    changed.add(name)
                    entries[ip] = FQDNEntry(name, ip, expires, learned)
                elif expires > old.expires:
                    entries[ip] = FQDNEntry(name, ip, expires, old.learned)
            for name in changed:
                entries = self._names[name]
                while len(entries) > self.max_ips_per_name:
                    victim = min(entries.values(), key=lambda e: (e.expires, e.learned))
                    del entries[victim.ip]
        return self._notify(changed)

    @classmethod
    def from_snapshot(cls, data: dict[str, Any], *, now: float | None = None,
                      **kwargs: Any) -> FQDNCache:
        kwargs.setdefault("min_ttl", int(data.get("min_ttl", DEFAULT_MIN_TTL)))
        kwargs.setdefault("max_ips_per_name",
                          int(data.get("max_ips_per_name", DEFAULT_MAX_IPS_PER_NAME)))
        cache = cls(**kwargs)
        cache.restore(data, now=now)
        return cache
