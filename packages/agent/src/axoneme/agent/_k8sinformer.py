"""One Kubernetes resource followed with informer semantics, in a worker thread.

List (remember the list's resourceVersion), then watch from it with
bookmarks; a watch that ends (server timeout, dead connection noticed by the
read timeout, API server restarted) resumes from the last resourceVersion
seen; 410 Gone (that version was compacted away) re-lists and diffs the new
list against the cache: what vanished is delivered as DELETED. Errors back
off exponentially up to a cap. An object whose resourceVersion the cache
already holds is never delivered again, so nothing is applied twice.

The `kubernetes` client is synchronous: each informer runs in its own thread
and hands its changes to the agent's asyncio loop, where they are applied
under the agent's lock (``deliver`` blocks until they are, so the order of
the stream is the order of application).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

LOG = logging.getLogger(__name__)

# a watch the server ends after this long (it is then resumed); bookmarks
# come about once a minute, so a read timeout above it notices a dead
# connection without cutting a healthy one
WATCH_SECONDS = 30
READ_TIMEOUT = WATCH_SECONDS + 15
CONNECT_TIMEOUT = 5
BACKOFF_FIRST = 0.25
BACKOFF_CAP = 8.0

Obj = dict[str, Any]
Event = tuple[str, Obj]  # ("ADDED" | "MODIFIED" | "DELETED", object)


def obj_key(obj: Obj) -> str:
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace") or ""
    return f"{ns}/{meta.get('name', '')}" if ns else str(meta.get("name", ""))


def resource_version(obj: Obj) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")


class Gone(Exception):
    """The watch's resourceVersion is too old (410): list again."""


@dataclass
class InformerStats:
    lists: int = 0
    watches: int = 0
    events: int = 0
    errors: int = 0
    last_error: str = ""
    last_error_at: float = 0.0


class Informer:
    """``lister(**kwargs)`` is a list call of the `kubernetes` client
    (``CoreV1Api.list_pod_for_all_namespaces``, ...); ``deliver(events, initial)``
    applies a batch on the agent's loop and returns when it is applied."""

    def __init__(self, name: str, lister: Callable[..., Any],
                 deliver: Callable[[Sequence[Event], bool], None],
                 stop: threading.Event, *, optional: bool = False,
                 watch_seconds: int = WATCH_SECONDS) -> None:
        self.name = name
        self.lister = lister
        self.deliver = deliver
        self.stopping = stop
        # a resource whose API may be missing (a CRD not installed): 404 is
        # an empty list, synced, and listed again with back-off
        self.optional = optional
        self.watch_seconds = watch_seconds
        self.cache: dict[str, Obj] = {}
        self.rv = ""
        self.synced = threading.Event()
        self.connected = False
        self.missing = False  # the optional API answered 404
        self.stats = InformerStats()
        self._resp: Any = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name=f"k8s-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        resp = self._resp
        sock = getattr(getattr(resp, "connection", None), "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # the reading thread notices at once
            except OSError:
                pass

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> None:
        backoff = BACKOFF_FIRST
        need_list = True
        while not self.stopping.is_set():
            try:
                if need_list:
                    self.relist()
                    need_list = False
                self.watch()
                backoff = BACKOFF_FIRST  # a watch that ended normally
            except Exception as e:
                if not isinstance(e, Gone) and _status(e) != 410:
                    if self._failed(e, need_list):
                        return
                    need_list = need_list or not self.rv or _status(e) == 404
                    self.stopping.wait(backoff)
                    backoff = min(BACKOFF_CAP, backoff * 2)
                    continue
                LOG.info("kubernetes %s: resourceVersion %s is gone (410): listing again",
                         self.name, self.rv)
                need_list = True

    def _failed(self, e: BaseException, listing: bool) -> bool:
        """Record a failure; True when the informer is stopping."""
        if self.stopping.is_set():
            return True
        self.connected = False
        if _status(e) == 404 and self.optional and listing:
            self._missing(e)
        else:
            self._error(e)
        return False

    def relist(self) -> None:
        resp = self.lister(_preload_content=False,
                           _request_timeout=(CONNECT_TIMEOUT, READ_TIMEOUT))
        data = json.loads(resp.data)
        self.stats.lists += 1
        self.connected = True
        self.missing = False
        items = [_trim(self._with_kind(i, data)) for i in data.get("items") or []]
        new = {obj_key(o): o for o in items}
        events: list[Event] = []
        for key, obj in new.items():
            old = self.cache.get(key)
            if old is None:
                events.append(("ADDED", obj))
            elif resource_version(old) != resource_version(obj):
                events.append(("MODIFIED", obj))
        for key in sorted(set(self.cache) - set(new)):
            events.append(("DELETED", self.cache[key]))
        initial = not self.synced.is_set()
        if events or initial:
            self.deliver(events, initial)
        self.cache = new
        self.rv = str((data.get("metadata") or {}).get("resourceVersion") or "")
        self.synced.set()
        LOG.info("kubernetes %s: listed %d at resourceVersion %s (%d changes)", self.name,
                 len(new), self.rv, len(events))

    def watch(self) -> None:
        # the client's own stream reader; not Watch.stream, which loses the
        # status of an ERROR event when objects are not deserialized
        from kubernetes.watch.watch import iter_resp_lines

        self.stats.watches += 1
        resp = self.lister(watch=True, resource_version=self.rv, allow_watch_bookmarks=True,
                           timeout_seconds=self.watch_seconds, _preload_content=False,
                           _request_timeout=(CONNECT_TIMEOUT, READ_TIMEOUT))
        self._resp = resp
        try:
            for line in iter_resp_lines(resp):  # type: ignore[no-untyped-call]
                if self.stopping.is_set():
                    return
                if not line.strip():
                    continue
                ev = json.loads(line)
                self.connected = True
                self.apply_event(str(ev.get("type")), _trim(ev.get("object") or {}))
        finally:
            self._resp = None
            resp.close()
            resp.release_conn()

    def apply_event(self, kind: str, obj: Obj) -> None:
        """One watch event: deliver it unless the cache already has it."""
        rv = resource_version(obj)
        if kind == "BOOKMARK":
            self.rv = rv or self.rv
            return
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise Gone()
            raise RuntimeError(f"watch error: {obj.get('reason')}: {obj.get('message')}")
        key = obj_key(obj)
        old = self.cache.get(key)
        self.stats.events += 1
        if kind == "DELETED":
            if old is not None:
                self.deliver([("DELETED", obj)], False)
                del self.cache[key]
        elif kind in ("ADDED", "MODIFIED"):
            if old is None or resource_version(old) != rv:
                self.deliver([("MODIFIED" if old is not None else "ADDED", obj)], False)
                self.cache[key] = obj
        self.rv = rv or self.rv

    # -- helpers -----------------------------------------------------------------------------
    @staticmethod
    def _with_kind(obj: Obj, listing: Obj) -> Obj:
        """List items carry no kind/apiVersion: take them from the list's."""
        if "kind" not in obj:
            kind = str(listing.get("kind", ""))
            obj["kind"] = kind[:-4] if kind.endswith("List") else kind
        if "apiVersion" not in obj and listing.get("apiVersion"):
            obj["apiVersion"] = listing["apiVersion"]
        return obj

    def _error(self, e: BaseException) -> None:
        self.stats.errors += 1
        self.stats.last_error = f"{type(e).__name__}: {short_error(e)}"
        self.stats.last_error_at = time.time()
        LOG.warning("kubernetes %s: %s (retrying)", self.name, self.stats.last_error)

    def _missing(self, e: BaseException) -> None:
        if not self.missing:
            LOG.warning("kubernetes %s: the API answers 404 (CRD not installed?): none "
                        "until it appears", self.name)
        self.missing = True
        self.connected = True
        self.stats.last_error = "not found (404): CRD not installed?"
        self.stats.last_error_at = time.time()
        if not self.synced.is_set():
            self.deliver([], True)
            self.synced.set()
        elif self.cache:  # the CRD was removed: its objects are gone
            self.deliver([("DELETED", o) for o in self.cache.values()], False)
            self.cache = {}
        self.rv = ""

    def view(self) -> dict[str, Any]:
        s = self.stats
        return {"synced": self.synced.is_set(), "connected": self.connected,
                "count": len(self.cache), "resource_version": self.rv,
                "missing": self.missing, "lists": s.lists, "watches": s.watches,
                "events": s.events, "errors": s.errors, "last_error": s.last_error}


def _trim(obj: Obj) -> Obj:
    """Drop what no handler reads and the cache would hold for every object."""
    meta = obj.get("metadata")
    if isinstance(meta, dict):
        meta.pop("managedFields", None)
    return obj


def _status(e: BaseException) -> int | None:
    status = getattr(e, "status", None)
    return status if isinstance(status, int) else None


def short_error(e: BaseException) -> str:
    """One line for a client error: its HTTP status, else its first line."""
    status = _status(e)
    if status is not None:
        reason = getattr(e, "reason", "") or ""
        return f"HTTP {status} {reason}".strip()
    text = str(e).splitlines()[0] if str(e) else ""
    return text[:300]
