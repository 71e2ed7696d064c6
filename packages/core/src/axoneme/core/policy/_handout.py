"""What the engine handed the datapath, kept as the changes since (issue 17: RSS).

``PolicyEngine.pending_changes`` hands out each endpoint's MapState changes.
It used to keep a copy of everything it handed out per endpoint (a dict of
200k entries for a 100k-peer policy) to compare against. Instead the
endpoint's ``EndpointPolicy.touched`` maps each key changed since the last
hand-out to its entry *then* (None: it had none): what was handed out is the
state with those entries put back. Only a rebuilt policy (a new
``EndpointPolicy``, touched None) needs the old one's hand-out in full
(``handed_out``), until the next hand-out diffs against it.
"""

from __future__ import annotations

from axoneme.core.mapstate import Entry, Key, MapChanges
from axoneme.core.policy._resolve import EndpointPolicy


def handed_out(pol: EndpointPolicy) -> dict[Key, Entry] | None:
    """What was last handed out of ``pol`` (None: it was never handed out)."""
    if pol.touched is None:
        return None
    out = dict(pol.state)
    for key, was in pol.touched.items():
        if was is None:
            out.pop(key, None)
        else:
            out[key] = was
    return out


def touched_changes(pol: EndpointPolicy) -> MapChanges:
    """The changes since the last hand-out (``pol.touched`` not None)."""
    assert pol.touched is not None
    adds: dict[Key, Entry] = {}
    deletes: set[Key] = set()
    state = pol.state
    for key, was in pol.touched.items():
        new = state.get(key)
        if new is None:
            if was is not None:
                deletes.add(key)
        elif was is None or was != new or was.l7 != new.l7:
            adds[key] = new
    return MapChanges(adds, frozenset(deletes))


__all__ = ["handed_out", "touched_changes"]
