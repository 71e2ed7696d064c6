"""Audit: staged policies and audit mode as one MapState the datapaths enforce.

Two inputs per endpoint: the *enforced* MapState (the rules that enforce)
and the *combined* one (enforced + staged rules). ``stage`` builds the map
the datapath gets: it forwards and drops exactly as the enforced map does,
and where the enforced map allows a packet that the combined map would
drop, the deciding entry carries ``audit`` (the datapath then reports the
flow as AUDIT) and ``audited_by`` (the policies that would drop it).

Agent-wide and per-endpoint audit mode (Cilium's PolicyAuditMode) are the
same construction against a relaxed baseline: ``relax(enforced)`` allows
everything the enforced map allows or drops (L7 redirects kept), and the
enforced map itself plays "combined": every would-be drop is forwarded as
AUDIT.

Why keys are refined: the lookup takes the longest match per peer category
(the peer's identity, the wildcard identity 0) and a deny anywhere wins, so
marking an enforced entry as audited would mark packets the combined map
still allows. The output therefore holds, per direction, every wildcard key
of either map and, for every identity either map names, every key of that
identity and every wildcard key re-keyed to it; each entry is the enforced
map's *whole decision* for the packets the key is the longest match of
(the keys of one category nest, so that decision is constant there). An
identity's own keys then always decide for it (a tie goes to the specific
key) and a wildcard deny can only be a deny of the enforced map, so every
packet gets the enforced map's verdict. A re-keyed wildcard key is then
dropped again where the lookup without it decides the same (the common
case: a staged policy over many identities costs their own keys only).
Address keys (NetworkPolicy
ipBlock over pods, per-pod named ports) are kept as the enforced map has
them and are not audited: their flows are reported at identity level.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence

from axoneme.core.mapstate import (
    ADDRESS_IDENTITY,
    Decision,
    Direction,
    Entry,
    Key,
    MapState,
    decide,
)
from axoneme.core.policy._resolve import Resolved
from axoneme.core.policy.api import Rule

_Index = dict[tuple[int, Direction], list[tuple[Key, Entry]]]


def _index(state: MapState) -> _Index:
    out: _Index = {}
    for key, entry in state.items():
        if not key.is_address:
            out.setdefault((key.identity, key.direction), []).append((key, entry))
    return out


def _cover(idx: _Index, identity: int, key: Key) -> tuple[Key, Entry] | None:
    """The longest key of ``identity`` (same direction) that covers ``key``'s L4."""
    best: tuple[Key, Entry] | None = None
    for k, e in idx.get((identity, key.direction), ()):
        if k.covers_l4(key) and (best is None or k.l4_prefix > best[0].l4_prefix):
            best = (k, e)
    return best


def _decision(idx: _Index, identity: int, key: Key) -> Decision:
    specific = _cover(idx, identity, key) if identity else None
    return decide(specific, None, _cover(idx, 0, key))


def policy_names(derived: Iterable[str]) -> frozenset[str]:
    """``derived_from`` strings ("Kind ns/name path") -> policy refs ("Kind ns/name")."""
    return frozenset(" ".join(d.split(" ")[:2]) for d in derived if " " in d)


def stage(enforced: MapState, combined: MapState,
          default_deniers: Mapping[Direction, frozenset[str]]) -> MapState:
    """The map that enforces ``enforced`` and reports what ``combined`` would drop.

    ``default_deniers``: per direction, the policies that put the endpoint
    into default deny in ``combined`` (named by a flow that nothing allows
    there). ``audited_by`` holds the deny entry's ``derived_from`` (rule
    references) or those policy names. The result equals ``enforced`` when
    no packet is audited.
    """
    e_idx, s_idx = _index(enforced), _index(combined)
    out: dict[Key, Entry] = {k: v for k, v in enforced.items() if k.is_address}
    audited = False

    def entry_at(ident: int, key: Key) -> Entry | None:
        nonlocal audited
        entry = _decision(e_idx, ident, key).entry
        if entry is None:
            return None  # the enforced map has nothing here either: default deny
        if not entry.deny and not entry.is_redirect:
            ds = _decision(s_idx, ident, key)
            if not ds.allowed:
                by = ds.entry.derived_from if ds.entry is not None else default_deniers.get(key.direction)
                entry = dataclasses.replace(entry, audit=True, audited_by=by or frozenset())
                audited = True
        return entry

    for d in (Direction.INGRESS, Direction.EGRESS):
        wild = {k for idx in (e_idx, s_idx) for k, _ in idx.get((0, d), ())}
        for key in wild:
            if (entry := entry_at(0, key)) is not None:
                out[key] = entry
        idents = {i for idx in (e_idx, s_idx) for (i, dd) in idx if dd == d and i not in (0, ADDRESS_IDENTITY)}
        for ident in idents:
            own: list[tuple[Key, Entry]] = []
            for key in {k for idx in (e_idx, s_idx) for k, _ in idx.get((ident, d), ())}:
                if (entry := entry_at(ident, key)) is not None:
                    own.append((key, entry))
                    out[key] = entry
            # A wildcard key re-keyed to the identity is needed only where the
            # lookup without it (the identity's keys so far, shorter first,
            # against the wildcard entry) would decide otherwise: keeps the map small.
            own_idx: _Index = {(ident, d): own}
            for w in sorted(wild, key=lambda k: k.l4_prefix):
                key = Key(ident, d, w.protocol, w.port, w.prefix_len)
                if key in out or (entry := entry_at(ident, key)) is None:
                    continue
                w_entry = out.get(w)
                if w_entry is not None:
                    dec = decide(_cover(own_idx, ident, key), None, (w, w_entry))
                    if dec.entry == entry and dec.entry is not None and dec.entry.audited_by == entry.audited_by:
                        continue
                own.append((key, entry))
                out[key] = entry
    return MapState(out) if audited else enforced


def relax(enforced: MapState) -> MapState:
    """Audit mode's baseline: the enforced map's allows and redirects, no
    denies, and everything else allowed."""
    out = {k: v for k, v in enforced.items() if not v.deny}
    for d in (Direction.INGRESS, Direction.EGRESS):
        out.setdefault(Key(0, d), Entry())
    return MapState(out)


def resolve_audited(rules: Sequence[Rule], audit_mode: bool,
                    resolve: Callable[[Sequence[Rule]], Resolved]) -> Resolved:
    """Resolve an endpoint whose selecting ``rules`` include staged ones
    (``Rule.audit``) or that is in audit mode; ``resolve`` resolves a rule
    list (``_resolve.resolve_endpoint`` bound to the endpoint). Enforcement
    flags and ``rules`` (what trace and flow attribution name as deciding)
    are the enforced rules' own: staging never changes them."""
    enforced_rules = [r for r in rules if not r.audit]
    base = resolve(enforced_rules)
    full = resolve(rules) if len(enforced_rules) != len(rules) else base
    deniers = {d: frozenset(str(r.ref) for r in rules if r.enforces(d))
               for d in (Direction.INGRESS, Direction.EGRESS)}
    state = stage(relax(base.state) if audit_mode else base.state, full.state, deniers)
    return dataclasses.replace(
        base, state=state, deps=base.deps | full.deps,
        uses_named_ports=base.uses_named_ports or full.uses_named_ports,
        uses_addresses=base.uses_addresses or full.uses_addresses)


__all__ = ["policy_names", "relax", "resolve_audited", "stage"]
