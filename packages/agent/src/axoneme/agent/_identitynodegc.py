"""A deleted Node's identities, collected within seconds (CRD identities, issue 20).

The periodic collector (``_identityk8s.IdentityGC``) deletes an identity
``identity_heartbeat_timeout`` seconds (900) after marking it unused: the long
timeout makes it safe against caches that lag. A Node's delete is a stronger
signal: the Node's pods go with it (every agent drops them from its ipcache at
once; the pod garbage collector deletes the Pod objects 40 s or more later),
so the identities that only they held are unused from that moment. On a Node's
delete every agent runs a targeted pass over exactly those numbers, with a
short grace (``identity_node_gc_grace``, 2 s; 0 turns the pass off) in place
of the timeout. Every other identity keeps the periodic path.

The pass (``NodeDeleteGC``), a round every ``STEP`` seconds:

1. Candidates: the numbers that hold the label set of a pod bound to the deleted
   Node (the pods cache still lists those pods).
2. A candidate this agent judges used leaves the pass (``IdentityGC.user``: this
   node's endpoints or other nodes' pods reference it, or a pod on a Node that
   still exists has its labels). From then on the periodic path handles it, as any
   other identity.
3. Unused and unmarked: it is marked (the collector's conditional merge patch),
   and marked again a grace later if the object has not changed meanwhile (the
   write failed, e.g. the API server did not answer).
4. Unused and marked: the grace starts when this agent first sees that version
   (resourceVersion) of the object marked, whichever agent marked it. When the
   grace ends, the object is deleted with uid and that resourceVersion as
   preconditions.
5. A candidate seen marked (or marked by this pass) and later unmarked, in a newer
   version, leaves the pass: the agent that took
   the mark back uses it, or did until its own caches caught up. In that case the
   agent's own pass, started by the same Node delete, marks the identity again.
6. A candidate that is gone (this pass's delete or another agent's) is settled.
   After ``max(30 s, 10 x grace)`` the pass stops, and the periodic path handles
   whatever is left.

Why it is safe. Here the grace does the heartbeat timeout's job, for the short
time that matters:

- An agent that starts using a candidate (a pod with the same labels anywhere)
  takes the mark back: at once if its cache already shows the mark
  (``CRDIdentityStore.acquire``), or when its watch brings the mark
  (``IdentitySync``: an identity this node references that is marked gets
  unmarked). Either write moves the resourceVersion on, so the delete, which is
  conditional on the marked version, fails with 409.
- Several agents can run the pass at once. The first mark wins and the others get
  409 and then see the mark through the watch; the first delete wins and the others
  get 404 or 409.
- If a watch is slower than the grace, the delete can go through while another node
  uses the identity. That node's watch then brings the DELETED event, and, as after
  any delete of an identity in use, the node creates it again with the same number
  and labels (``IdentitySync.repair``). The periodic path behaves the same way when
  a cache lags past its timeout.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from axoneme.agent._identitycrd import CRDIdentityStore, marked_at, meta_field, object_labels
from axoneme.agent._k8sinformer import Event, Obj

LOG = logging.getLogger(__name__)

__all__ = ["NodeDeleteGC", "NodePass"]

STEP = 0.25  # seconds between a pass's rounds


class Collector(Protocol):
    """What a pass uses of the periodic collector (``_identityk8s.IdentityGC``; a
    protocol so that this module does not import that one, which imports this):
    its judgement and its conditional writes."""

    store: CRDIdentityStore

    def user(self) -> Callable[[int, Obj], bool]: ...

    def execute(self, plan: Sequence[tuple[str, int, Obj]], why: str = "") -> None: ...


class NodePass:
    """One Node delete's pass over ``numbers``: ``plan`` (on the agent's loop)
    then ``IdentityGC.execute`` (a worker thread), until ``pending`` is empty."""

    def __init__(self, nodes: Sequence[str], numbers: set[int], grace: float,
                 started: float) -> None:
        self.nodes = tuple(nodes)
        self.pending = set(numbers)
        self.grace = grace
        self.deadline = started + max(30.0, 10 * grace)
        self.seen: dict[int, tuple[str, float]] = {}  # number -> (marked version, first seen)
        # number -> (the version this pass marked, when)
        self.marking: dict[int, tuple[str, float]] = {}
        self.collected: set[int] = set()  # gone while the pass ran (whoever deleted them)

    def plan(self, gc: Collector, now: float) -> list[tuple[str, int, Obj]]:
        """The writes of one round (steps 2-6 of the module docstring)."""
        used = gc.user()
        out: list[tuple[str, int, Obj]] = []
        for number in sorted(self.pending):
            obj = gc.store.objects.get(number)
            if obj is None:  # 6: gone
                self.pending.discard(number)
                self.collected.add(number)
                continue
            if used(number, obj):  # 2
                self.pending.discard(number)
                continue
            rv = meta_field(obj, "resourceVersion")
            if marked_at(obj) is None:
                tried = self.marking.get(number)
                if tried is not None and tried[0] == rv and now - tried[1] < self.grace:
                    continue  # the version this pass marked: its write or its event is on the way
                if number in self.seen or (tried is not None and tried[0] != rv):
                    self.pending.discard(number)  # 5: someone took the mark back
                    continue
                self.marking[number] = (rv, now)  # 3 (again if the write failed: an outage)
                out.append(("mark", number, obj))
                continue
            first = self.seen.get(number)
            if first is None or first[0] != rv:  # 4: the grace starts now
                self.seen[number] = (rv, now)
            elif now - first[1] >= self.grace:
                out.append(("delete", number, obj))
        return out


class NodeDeleteGC:
    """Starts a ``NodePass`` when the nodes informer reports a Node deleted.
    ``pods_on(nodes)`` are the identity label sets of the pods bound to them."""

    def __init__(self, gc: Collector,
                 pods_on: Callable[[set[str]], set[tuple[str, ...]]], grace: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.gc = gc
        self.pods_on = pods_on
        self.grace = grace
        self.clock = clock
        self.passes = 0
        self.collected = 0
        self.active: set[asyncio.Task[None]] = set()

    def start(self, nodes: set[str]) -> NodePass | None:
        """The pass of ``nodes``' delete (None: they held no identity)."""
        keys = self.pods_on(nodes)
        numbers = {n for n, obj in dict(self.gc.store.objects).items()
                   if tuple(object_labels(obj)) in keys}
        if not numbers:
            return None
        self.passes += 1
        LOG.info("node %s deleted: collecting identities %s unless used within %gs",
                 ",".join(sorted(nodes)), ",".join(map(str, sorted(numbers))), self.grace)
        return NodePass(sorted(nodes), numbers, self.grace, self.clock())

    def finished(self, p: NodePass) -> None:
        self.collected += len(p.collected)
        if p.pending:
            LOG.info("node %s: identities %s left to the periodic collector",
                     ",".join(p.nodes), ",".join(map(str, sorted(p.pending))))

    async def on_nodes(self, events: Sequence[Event], initial: bool) -> None:
        """A nodes informer listener (after ``RemotePods`` dropped the Node's pods)."""
        gone = {str((obj.get("metadata") or {}).get("name") or "")
                for kind, obj in events if kind == "DELETED"}
        gone.discard("")
        if self.grace <= 0 or not gone:
            return
        p = self.start(gone)
        if p is not None:
            task = asyncio.create_task(self.run(p))
            self.active.add(task)
            task.add_done_callback(self.active.discard)

    async def run(self, p: NodePass) -> None:
        why = f"since node {','.join(p.nodes)} was deleted"
        try:
            while p.pending and self.clock() < p.deadline:
                plan = p.plan(self.gc, self.clock())  # judged on the loop, written from a thread
                if plan:
                    await asyncio.to_thread(self.gc.execute, plan, why)
                await asyncio.sleep(STEP)
        except Exception:
            LOG.warning("identity gc after node %s's delete failed", ",".join(p.nodes),
                        exc_info=True)
        finally:
            self.finished(p)

    def view(self) -> dict[str, Any]:
        return {"grace": self.grace, "passes": self.passes, "collected": self.collected,
                "running": len(self.active)}
