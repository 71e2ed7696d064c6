"""MapState.lookup on a big MapState (probing the candidate keys) decides
exactly as the scan over every entry does."""

from __future__ import annotations

import random

import pytest
from axoneme.core import mapstate
from axoneme.core.mapstate import ADDRESS_IDENTITY, Direction, Entry, Key, MapState, Protocol

PROTOS = [Protocol.TCP, Protocol.UDP, Protocol.ICMP]


def _random_state(rnd: random.Random, n: int) -> MapState:
    entries: dict[Key, Entry] = {}
    allow, deny, proxy = Entry(), Entry(deny=True), Entry(proxy_port=15001)
    while len(entries) < n:
        d = rnd.choice(list(Direction))
        ident = rnd.choice([0, 0, rnd.randrange(1, 6), rnd.randrange(1, 6), ADDRESS_IDENTITY])
        address = f"10.0.0.{rnd.randrange(4)}" if ident == ADDRESS_IDENTITY else ""
        if rnd.random() < 0.15:
            key = Key(ident, d, Protocol.ANY, 0, 0, address)
        else:
            plen = rnd.choice([0, 16, 16, 14, 8, 15])
            port = rnd.choice([80, 81, 443, 8080, 0, 65535]) & mapstate.port_mask(plen)
            key = Key(ident, d, rnd.choice(PROTOS), port, plen, address)
        entries[key] = rnd.choice([allow, allow, deny, proxy])
    return MapState(entries)


@pytest.mark.parametrize("seed", range(8))
def test_indexed_lookup_equals_scan(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rnd = random.Random(seed)
    ms = _random_state(rnd, 300)
    queries = [(rnd.choice([0, 1, 2, 3, 4, 5, 7, ADDRESS_IDENTITY]), rnd.choice(list(Direction)),
                rnd.choice([*PROTOS, Protocol.ANY]), rnd.choice([80, 81, 443, 8080, 0, 65535, 82]),
                rnd.choice([None, "10.0.0.1", "10.0.0.3", "10.0.0.9"])) for _ in range(3000)]
    queries = [(i, d, p, 0 if p is Protocol.ANY else port, a) for i, d, p, port, a in queries]
    assert len(ms) > mapstate._SCAN_MAX
    indexed = [ms.lookup(*q) for q in queries]
    monkeypatch.setattr(mapstate, "_SCAN_MAX", 10**9)
    scanned = [ms.lookup(*q) for q in queries]
    assert indexed == scanned
    assert any(d.entry is not None for d in indexed)  # the queries do hit entries


def test_view_does_not_copy() -> None:
    entries = {Key(1, Direction.INGRESS): Entry()}
    view = MapState.view(entries)
    entries[Key(2, Direction.INGRESS)] = Entry(deny=True)
    assert len(view) == 2 and view.lookup(2, Direction.INGRESS, Protocol.TCP, 80).entry is not None
