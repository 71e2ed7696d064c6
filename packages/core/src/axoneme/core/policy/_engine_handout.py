"""What the engine hands out per endpoint: its MapState (a copy, or one
looked-up decision), enforcement and selecting rules, and the MapState
changes since the last hand-out (``pending_changes``; ``_handout``)."""

from __future__ import annotations

from axoneme.core.errors import PolicyError
from axoneme.core.mapstate import Decision, Direction, MapChanges, MapState, Protocol
from axoneme.core.policy._engine_state import EngineState
from axoneme.core.policy._handout import touched_changes
from axoneme.core.policy.api import Rule


class EngineHandout(EngineState):
    """Per-endpoint reads and the pending MapState changes."""

    def mark_synced(self, endpoint_id: int) -> None:
        """The datapath was just made to hold the endpoint's whole resolved
        policy (a full ``sync``): nothing of it is pending any more, and the
        next change is a diff against it."""
        with self._lock:
            pol = self._policies.get(endpoint_id)
            if pol is None:
                return
            self._base.pop(endpoint_id, None)
            pol.touched = {}
            self._dirty.discard(endpoint_id)

    def regenerate(self, endpoint_id: int) -> MapState:
        """Recompute one endpoint from scratch (drift, restart, benchmarks); returns its MapState."""
        with self._lock:
            if endpoint_id not in self._endpoints:
                raise PolicyError(f"no endpoint {endpoint_id}")
            self._recompute({endpoint_id}, full=True)
            return self._policy(endpoint_id).snapshot()

    def resolve(self, endpoint_id: int) -> MapState:
        with self._lock:  # a copy, not kept (a 100k-peer policy's is 10 MB)
            return MapState(self._policy(endpoint_id).state)

    def entry_count(self, endpoint_id: int) -> int:
        """How many entries the endpoint's MapState holds (O(1))."""
        with self._lock:
            return len(self._policy(endpoint_id).state)

    def enforcement(self, endpoint_id: int) -> tuple[bool, bool]:
        with self._lock:
            pol = self._policy(endpoint_id)
            return pol.ingress, pol.egress

    def selecting_rules(self, endpoint_id: int) -> list[Rule]:
        """The rules that select an endpoint (for trace and endpoint get)."""
        with self._lock:
            return list(self._policy(endpoint_id).rules)

    def pending_size(self) -> int:
        """An upper bound of what ``pending_changes`` + ``pending_ipcache_changes``
        would hand out now (keys and prefixes; O(changed endpoints))."""
        with self._lock:
            size = len(self._ipc_dirty) + len(self._ipc_before)
            for eid in self._dirty:
                pol = self._policies.get(eid)
                if pol is not None:
                    size += len(pol.state) + len(self._base.get(eid, ())) \
                        if pol.touched is None else len(pol.touched)
            return size

    def pending_changes(self) -> dict[int, MapChanges]:
        """Per endpoint, the MapState changes since the last call (new endpoints: everything).

        Removed endpoints are not listed: the datapath drops their state on
        ``endpoint_removed``. Only the keys a change touched are compared."""
        with self._lock:
            out: dict[int, MapChanges] = {}
            for eid in sorted(self._dirty):
                pol = self._policies.get(eid)
                if pol is None:
                    continue
                if pol.touched is None:  # rebuilt (or new): against the previous hand-out
                    changes = MapState.view(self._base.pop(eid, {})).diff(
                        MapState.view(pol.state))
                else:
                    changes = touched_changes(pol)
                pol.touched = {}
                if changes.adds or changes.deletes:  # MapChanges.__bool__ without its call
                    out[eid] = changes
            self._dirty.clear()
            return out

    def explain(self, endpoint_id: int, direction: Direction, peer_identity: int,
                protocol: Protocol, port: int, peer_address: str | None = None) -> Decision:
        """The decision for one packet and the entry that made it (derived_from names rules).

        On the live entries under the lock (no O(entries) snapshot per flow:
        every allowed flow's attribution asks this)."""
        with self._lock:
            return MapState.view(self._policy(endpoint_id).state).lookup(
                peer_identity, direction, protocol, port, peer_address)


__all__ = ["EngineHandout"]
