"""``endpoint get``'s entry list (mapstate_view) at scale: the same output as
formatting each entry on its own, in Key order."""

from __future__ import annotations

import random
from typing import Any

from axoneme.agent._views import mapstate_view
from axoneme.core.mapstate import ADDRESS_IDENTITY, Direction, Entry, Key, MapState, Protocol


def _plain_view(ms: MapState) -> list[dict[str, Any]]:
    """The straightforward formatting (what mapstate_view was before issue 17)."""
    return [{"key": str(k), "identity": k.identity, "direction": k.direction.name,
             "protocol": str(k.protocol), "port": k.port, "prefix_len": k.prefix_len,
             "address": k.address, "entry": str(ms[k]), "deny": ms[k].deny,
             "proxy_port": ms[k].proxy_port, "derived_from": sorted(ms[k].derived_from)}
            for k in sorted(ms)]


def test_view_equals_per_entry_formatting() -> None:
    rnd = random.Random(17)
    shared = Entry(derived_from=frozenset({"CiliumNetworkPolicy/ns/a ingress[0]", "b"}))
    deny = Entry(deny=True, derived_from=frozenset({"x"}))
    proxy = Entry(proxy_port=15001)
    entries: dict[Key, Entry] = {}
    for _ in range(3000):
        d = rnd.choice(list(Direction))
        proto = rnd.choice([Protocol.ANY, Protocol.TCP, Protocol.UDP, Protocol.ICMP])
        if proto is Protocol.ANY:
            port, plen = 0, 0
        else:
            plen = rnd.choice([0, 16, 12])
            port = rnd.randrange(0, 65536) & ((0xFFFF << (16 - plen)) & 0xFFFF) if plen else 0
        kind = rnd.random()
        if kind < 0.1:
            key = Key.for_address(f"10.244.0.{rnd.randrange(256)}", d, proto, port, plen)
            assert key.identity == ADDRESS_IDENTITY
        elif kind < 0.15:
            key = Key(0, d, proto, port, plen)
        else:
            key = Key(rnd.randrange(1, 1 << 25), d, proto, port, plen)
        entries[key] = rnd.choice([shared, shared, deny, proxy, Entry()])
    ms = MapState(entries)
    assert mapstate_view(ms) == _plain_view(ms)
    assert mapstate_view(MapState()) == []


def test_chunked_json_is_the_apis_json() -> None:
    """endpoint get's answer, serialized a batch at a time in chunks
    (json_chunks), is byte for byte json.dumps(view, default=str): lists of
    one, many (several batches) or no entries, a missing list (null), text
    that needs escaping, values only default=str can print."""
    import json
    import pathlib

    from axoneme.agent._views import json_chunks

    entries = [{"key": f"ingress id={i} TCP/80", "derived_from": ["p \"q\" é"], "n": i}
               for i in range(1500)]
    cases: list[tuple[dict[str, Any], dict[str, Any]]] = [
        ({"id": 1, "policy": 0, "datapath": 0, "in_sync": True, "p": pathlib.Path("/x")},
         {"policy": entries, "datapath": entries[:1]}),
        ({"id": 2, "labels": ["k8s:a=\u0000b"], "policy": 0, "datapath": 0},
         {"policy": [], "datapath": None}),
        ({"id": 3}, {}),
    ]
    for view, lists in cases:
        want = json.dumps({**view, **lists}, default=str).encode()
        for size in (1, 100, 1 << 18):
            chunks = json_chunks(view, {k: None if v is None else iter(v)
                                        for k, v in lists.items()}, size)
            assert b"".join(chunks) == want
            assert size > 1 or not lists or len(chunks) > 3
            assert all(chunks)
