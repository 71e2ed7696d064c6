"""CIDR identities kept compact (issue 17: agent RSS at 100k CIDR identities).

Their labels are made when read (``PrefixLabels``), they are found by prefix
rather than in the label index, and ``snapshot()`` makes their lists when
read: every answer must equal what full ``Labels`` objects gave.
"""

from __future__ import annotations

import ipaddress

import pytest
from axoneme.core.identity import Identity, IdentityAllocator, cidr_labels
from axoneme.core.labels import Label, Labels, PrefixLabels
from axoneme.core.selectors import LabelSelector

NETS = [ipaddress.ip_network(n) for n in
        ("10.244.128.1/32", "10.0.0.0/8", "2001:db8::/64", "2001:db8::7/128")]


@pytest.mark.parametrize("net", NETS, ids=str)
def test_prefix_labels_equal_the_full_labels(net: ipaddress.IPv4Network) -> None:
    lazy, full = PrefixLabels(net), cidr_labels(net)
    assert lazy == full and full == lazy and hash(lazy) == hash(full)
    assert lazy.sorted_strings() == full.sorted_strings() and list(lazy) == list(full)
    assert len(lazy) == len(full) == 2 and dict(lazy) == dict(full)
    assert sorted(lazy.values()) == sorted(full.values())
    text = str(net).replace(":", "-")
    for source, key in (("cidr", text), ("any", text), ("reserved", "world"), ("any", "world"),
                        ("cidr", "world"), ("k8s", text), ("reserved", text), ("k8s", "app")):
        assert lazy.lookup(source, key) == full.lookup(source, key), (source, key)
    extra = Label("k8s", "app", "x")
    assert lazy.union([extra]) == full.union([extra])
    assert Identity(5, lazy, net) == Identity(5, full, net)
    for sel in (LabelSelector.build(match_labels={"reserved:world": ""}),
                LabelSelector.build(match_labels={f"cidr:{text}": ""}),
                LabelSelector.build(match_labels={"app": "x"})):
        assert sel.matches(lazy) == sel.matches(full)


def test_allocator_finds_and_lists_cidr_identities_as_before() -> None:
    a = IdentityAllocator()
    app = a.allocate(Labels.from_strings(["k8s:app=web"]))
    snap = a.snapshot()  # a live view: kept current
    idents = [a.allocate_cidr(n) for n in NETS]
    for ident, net in zip(idents, NETS, strict=True):
        assert isinstance(ident.labels, PrefixLabels)
        assert a.allocate_cidr(net) is ident and a.get(ident.id) is ident
        assert a.lookup(cidr_labels(net)) is ident  # by its label set, too
        assert snap[ident.id] == cidr_labels(net).sorted_strings()
    assert a.lookup(Labels.from_strings(["cidr:10.244.128.1", "reserved:world"])) is None
    assert a.lookup(Labels.from_strings(["cidr:not-a-prefix", "reserved:world"])) is None
    want = {app.id: app.label_strings(), **{i.id: i.label_strings() for i in idents}}
    assert dict(snap) == want and len(snap) == len(want) == len(a.snapshot())
    assert set(snap) == set(want) and 1 not in snap  # reserved ones are not listed
    with pytest.raises(KeyError):
        snap[1]
    # allocate() of a CIDR label set answers the CIDR identity, as the label index did
    assert a.allocate(cidr_labels(NETS[0])) is idents[0]


@pytest.mark.parametrize("net", NETS, ids=str)
def test_label_selectors_find_cidr_identities_without_an_index_entry(
        net: ipaddress.IPv4Network) -> None:
    """The selector cache leaves CIDR identities out of its label index; a
    label selector on reserved:world or the cidr label still selects them,
    selected first or added first, and lets them go."""
    from axoneme.core.identity import RESERVED_IDENTITIES, ReservedIdentity
    from axoneme.core.policy._selectorcache import SelectorCache

    text = str(net).replace(":", "-")
    sels = {"world": LabelSelector.build(match_labels={"reserved:world": ""}),
            "cidr": LabelSelector.build(match_labels={f"cidr:{text}": ""}),
            "any": LabelSelector.build(match_labels={f"any:{text}": ""}),
            "other": LabelSelector.build(match_labels={"cidr:192.0.2.0/24": ""})}
    worlds = {int(ReservedIdentity.WORLD)}  # world-ipv4/-ipv6 carry labels of their own
    for selector_first in (True, False):
        cache = SelectorCache()
        for ident in RESERVED_IDENTITIES:
            cache.add_identity(ident)
        if selector_first:
            for sel in sels.values():
                cache.add_selector(sel)
        ident = IdentityAllocator().allocate_cidr(net)
        changed = cache.add_identity(ident)
        if not selector_first:
            for sel in sels.values():
                cache.add_selector(sel)
        else:
            assert changed == {sels["world"], sels["cidr"], sels["any"]}
        assert cache.cidr_identity(net) is ident and cache.cidr_identity(str(net)) is ident
        assert set(cache.selected(sels["world"])) == worlds | {ident.id}
        assert set(cache.selected(sels["cidr"])) == set(cache.selected(sels["any"])) == {ident.id}
        assert set(cache.selected(sels["other"])) == set()
        assert cache.add_identity(ident) == set()  # a second reference
        assert cache.remove_identity(ident.id) == set() and ident.id in cache
        assert cache.remove_identity(ident.id) == {sels["world"], sels["cidr"], sels["any"]}
        assert ident.id not in cache and cache.cidr_identity(net) is None
        assert set(cache.selected(sels["world"])) == worlds


@pytest.mark.parametrize("net", [n for n in NETS if n.prefixlen == n.max_prefixlen], ids=str)
def test_host_prefix_selectors_are_found_without_an_index_entry(
        net: ipaddress.IPv4Network) -> None:
    """A host prefix's CIDR selectors are not indexed by prefix: an identity
    added after them still finds each (every ``match``), a wider one too."""
    from axoneme.core.policy._selectorcache import SelectorCache
    from axoneme.core.policy.api import CIDRPeer

    cache = SelectorCache()
    wide = CIDRPeer(ipaddress.ip_network(f"{net.network_address}/{net.max_prefixlen - 8}",
                                         strict=False))
    sels = [CIDRPeer(net, (), frozenset(m)) for m in ((), ("pods",), ("nodes",), ("pods", "nodes"))]
    nothing = CIDRPeer(net, (net,))  # its except is all of it
    for sel in (*sels, wide, nothing):
        cache.add_selector(sel)
    assert not any(sel in by_addr.values() for by_addr in cache._sel_by_cidr.values()
                   for sel in sels)
    ident = IdentityAllocator().allocate_cidr(net)
    assert cache.add_identity(ident) == {*sels, wide}
    assert all(set(cache.selected(s)) == {ident.id} for s in (*sels, wide))
    assert set(cache.selected(nothing)) == set()
    assert cache.remove_identity(ident.id) == {*sels, wide}
    for sel in (*sels, wide, nothing):
        cache.remove_selector(sel)
    assert cache._sel == {} and cache._sel_by_cidr == {} and cache._by_id == {}


def test_restored_cidr_identities_keep_no_count_and_no_table() -> None:
    """A restart's CIDR identities, asked for again by the restored policy, are
    made as new ones (no reference count entry each) and the emptied table
    of the ones not asked for yet goes."""
    a = IdentityAllocator()
    numbers = {n: a.allocate_cidr(n).id for n in NETS}
    saved = {k: list(v) for k, v in a.snapshot().items()}
    b = IdentityAllocator()
    b.restore(saved)
    for net in NETS:
        assert b.allocate_cidr(net).id == numbers[net]
    assert not any(n in b._refs for n in numbers.values())
    assert b._lazy_cidr == {} and b.references() == a.references() == {}
    assert dict(b.snapshot()) == saved
