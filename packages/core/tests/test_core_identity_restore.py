"""Restoring saved identities (issue 17: a restart at 100k CIDR identities).

CIDR identities are restored lazily (their numbers noted, made when a policy
allocates the prefix again or anything else reads the allocator): whatever
the order of calls, the allocator must answer exactly as an eager restore.
"""

from __future__ import annotations

import ipaddress

from axoneme.core.identity import LOCAL_IDENTITY_FLAG, IdentityAllocator
from axoneme.core.labels import Labels

NETS = [ipaddress.ip_network(n) for n in
        ("10.244.128.1/32", "10.0.0.0/8", "2001:db8::/64", "198.51.100.7/32")]


def _saved() -> tuple[dict[int, list[str]], dict[str, int]]:
    a = IdentityAllocator()
    app = a.allocate(Labels.from_strings(["k8s:app=web", "k8s:io.kubernetes.pod.namespace=x"]))
    by_net = {str(n): a.allocate_cidr(n).id for n in NETS}
    by_net["app"] = app.id
    return {k: list(v) for k, v in a.snapshot().items()}, by_net


def test_cidr_identities_keep_their_numbers_when_a_policy_asks_again() -> None:
    saved, numbers = _saved()
    b = IdentityAllocator()
    b.restore(saved)
    for n in reversed(NETS):  # any order
        ident = b.allocate_cidr(n)
        assert ident.id == numbers[str(n)]
        assert ident.cidr == n and ident.local
        assert ident.label_strings() == saved[ident.id]
    fresh = b.allocate_cidr(ipaddress.ip_network("203.0.113.0/24"))
    assert fresh.id & LOCAL_IDENTITY_FLAG and fresh.id not in saved  # no collision
    assert {k: list(v) for k, v in b.snapshot().items()} == {
        **saved, fresh.id: fresh.label_strings()}


def test_reads_see_restored_cidr_identities_nobody_asked_for() -> None:
    saved, numbers = _saved()
    for read in ("get", "lookup", "all", "count", "snapshot", "cidr_identities", "allocate"):
        b = IdentityAllocator()
        b.restore(saved)
        number = numbers["10.0.0.0/8"]
        if read == "get":
            got = b.get(number)
            assert got is not None and got.cidr == NETS[1]
        elif read == "lookup":
            got = b.lookup(Labels.from_strings(saved[number]))
            assert got is not None and got.id == number
        elif read == "all":
            assert {i.id for i in b.all()} >= set(saved)
        elif read == "count":
            eager = IdentityAllocator()
            eager.restore(saved)
            eager.get(number)
            assert b.count() == eager.count() == len(saved) + len(IdentityAllocator().all())
        elif read == "snapshot":
            assert {k: list(v) for k, v in b.snapshot().items()} == saved
        elif read == "cidr_identities":
            assert {str(n): i.id for n, i in b.cidr_identities().items()} == {
                str(n): numbers[str(n)] for n in NETS}
        else:  # a cluster identity's allocation settles too, its number unchanged
            app = b.allocate(Labels.from_strings(saved[numbers["app"]]))
            assert app.id == numbers["app"]
            assert b.get(numbers["198.51.100.7/32"]) is not None
        # once settled, a policy asking for the prefix gets the same object back
        assert b.allocate_cidr(NETS[1]).id == number
        assert b.allocate_cidr(NETS[1]) is b.allocate_cidr(NETS[1])


def test_a_restored_prefix_is_released_as_an_eager_restore_would() -> None:
    saved, numbers = _saved()
    got = []
    for settle_first in (True, False):
        b = IdentityAllocator()
        b.restore(saved)
        if settle_first:
            b.count()  # every restored identity made now: the eager behaviour
        ident = b.allocate_cidr(NETS[0])
        got.append((ident.id, b.references(), b.release(ident), b.get(ident.id) is None,
                    {k: list(v) for k, v in b.snapshot().items()}))
    assert got[0] == got[1]
    assert got[0][0] == numbers[str(NETS[0])]
