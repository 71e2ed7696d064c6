"""Unit tests of the core contracts: labels, selectors, identities, MapState."""

from __future__ import annotations

import ipaddress

import pytest
from axoneme.core.identity import (
    LOCAL_IDENTITY_FLAG,
    MIN_CLUSTER_IDENTITY,
    IdentityAllocator,
    ReservedIdentity,
)
from axoneme.core.labels import Label, Labels
from axoneme.core.mapstate import (
    DENY,
    Direction,
    Entry,
    Key,
    MapState,
    Protocol,
    Verdict,
    port_range_to_prefixes,
)
from axoneme.core.selectors import LabelSelector, Operator, Requirement

ING, EG = Direction.INGRESS, Direction.EGRESS
TCP, UDP = Protocol.TCP, Protocol.UDP


def test_label_parse_and_canonical_form():
    assert str(Label.parse("k8s:app=web")) == "k8s:app=web"
    assert Label.parse("app.kubernetes.io/name=x") == Label("k8s", "app.kubernetes.io/name", "x")
    assert Label.parse("reserved:host") == Label("reserved", "host", "")
    labels = Labels.from_strings(["k8s:b=2", "k8s:a=1"])
    assert labels.sorted_strings() == ["k8s:a=1", "k8s:b=2"]
    assert labels == Labels.from_strings(["k8s:a=1", "k8s:b=2"])
    assert hash(labels) == hash(Labels.from_strings(["k8s:a=1", "k8s:b=2"]))


def test_selector_sources_and_operators():
    labels = Labels.from_strings(["k8s:app=web", "k8s:io.kubernetes.pod.namespace=x"])
    assert LabelSelector.build({"app": "web"}).matches(labels)
    assert LabelSelector.build({"k8s:app": "web"}).matches(labels)
    assert not LabelSelector.build({"reserved:app": "web"}).matches(labels)
    assert LabelSelector.build({"any:app": "web"}).matches(labels)
    assert LabelSelector().matches(labels)
    notin = Requirement("app", Operator.NOT_IN, frozenset({"db"}))
    assert LabelSelector.build(match_expressions=[notin]).matches(labels)
    assert LabelSelector.build(match_expressions=[notin]).matches(Labels())
    exists = Requirement("tier", Operator.EXISTS)
    assert not LabelSelector.build(match_expressions=[exists]).matches(labels)
    dne = Requirement("tier", Operator.DOES_NOT_EXIST)
    assert LabelSelector.build(match_expressions=[dne]).matches(labels)


def test_identity_allocation_is_deterministic_and_restorable():
    a, b = IdentityAllocator(), IdentityAllocator()
    web = Labels.from_strings(["k8s:app=web"])
    db = Labels.from_strings(["k8s:app=db"])
    ia, ib = a.allocate(web), b.allocate(db)
    assert b.allocate(web).id == ia.id  # same labels, same number on another "node"
    assert ia.id >= MIN_CLUSTER_IDENTITY and ib.id >= MIN_CLUSTER_IDENTITY
    assert a.allocate(web) == ia  # idempotent
    restored = IdentityAllocator()
    restored.restore(a.snapshot())
    assert restored.lookup(web).id == ia.id
    assert a.get(int(ReservedIdentity.HOST)).labels.sorted_strings() == ["reserved:host"]


def test_cidr_identities_are_local_and_survive_restore():
    a = IdentityAllocator()
    net = ipaddress.ip_network("198.51.100.0/24")
    ident = a.allocate_cidr(net)
    assert ident.id & LOCAL_IDENTITY_FLAG and ident.cidr == net and ident.is_world
    assert "reserved:world" in ident.label_strings()
    assert a.allocate_cidr(net) == ident
    b = IdentityAllocator()
    b.restore(a.snapshot())
    assert b.cidr_identities()[net].id == ident.id
    assert b.allocate_cidr(ipaddress.ip_network("10.0.0.0/8")).id != ident.id


def test_release_frees_after_last_reference():
    a = IdentityAllocator()
    web = Labels.from_strings(["k8s:app=web"])
    i1 = a.allocate(web)
    a.allocate(web)
    assert not a.release(i1)
    assert a.release(i1)
    assert a.lookup(web) is None


@pytest.mark.parametrize("start,end", [(80, 80), (80, 83), (1000, 2000), (0, 65535), (1, 65534), (8080, 8089)])
def test_port_range_prefixes_cover_exactly_the_range(start, end):
    covered = set()
    for port, plen in port_range_to_prefixes(start, end):
        k = Key(1, ING, TCP, port, plen)
        lo, hi = k.port_range()
        assert not covered & set(range(lo, hi + 1))
        covered |= set(range(lo, hi + 1))
    assert covered == set(range(start, end + 1))


def test_key_validation():
    with pytest.raises(ValueError):
        Key(0, ING, Protocol.ANY, 80, 16)
    with pytest.raises(ValueError):
        Key(0, ING, TCP, 81, 14)


def test_lookup_deny_wins_across_identity_and_wildcard():
    ms = MapState({Key(0, ING): Entry(), Key(7, ING, TCP, 80, 16): DENY})
    assert ms.lookup(7, ING, TCP, 80).verdict is Verdict.DENIED_BY_RULE
    assert ms.lookup(7, ING, TCP, 81).verdict is Verdict.ALLOWED
    ms = MapState({Key(7, ING, TCP, 80, 16): Entry(), Key(0, ING, TCP, 0, 0): DENY})
    assert ms.lookup(7, ING, TCP, 80).verdict is Verdict.DENIED_BY_RULE


def test_lookup_longest_prefix_and_tie_to_identity():
    ms = MapState({
        Key(7, ING): Entry(),
        Key(0, ING, TCP, 80, 16): Entry(proxy_port=15001),
    })
    # the wildcard L4 entry is more specific than the L3-only one: it decides
    assert ms.lookup(7, ING, TCP, 80).verdict is Verdict.REDIRECTED
    ms2 = MapState({Key(7, ING, TCP, 80, 16): Entry(), Key(0, ING, TCP, 80, 16): Entry(proxy_port=15001)})
    assert ms2.lookup(7, ING, TCP, 80).verdict is Verdict.ALLOWED
    assert ms2.lookup(8, ING, TCP, 80).verdict is Verdict.REDIRECTED
    assert ms2.lookup(8, ING, UDP, 80).verdict is Verdict.DENIED
    assert ms2.lookup(7, EG, TCP, 80).verdict is Verdict.DENIED


def test_diff_and_apply_roundtrip():
    old = MapState({Key(1, ING): Entry(), Key(2, ING, TCP, 80, 16): Entry()})
    new = MapState({Key(1, ING): Entry(), Key(3, ING, UDP, 53, 16): Entry(), Key(2, ING, TCP, 80, 16): DENY})
    ch = old.diff(new)
    assert set(ch.adds) == {Key(3, ING, UDP, 53, 16), Key(2, ING, TCP, 80, 16)}
    assert ch.deletes == frozenset()
    assert old.apply(ch) == new
    assert not new.diff(new)
