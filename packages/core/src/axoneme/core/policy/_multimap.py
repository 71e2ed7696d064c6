"""A dict of sets that keeps a lone member without a set (issue 17: RSS).

The engine's reverse indexes (identity -> selectors selecting it, CIDR slot
-> selectors, selector -> endpoints and peer rules using it) mostly hold ONE
member per key: a 100k-peer ``fromCIDR`` policy has 100k selectors, each
selecting one identity, used by one rule of one endpoint. An empty ``set``
costs 216 bytes; a lone member is stored as itself (0 bytes more) and only
the second one makes a set (``_Many``, so a member can never be mistaken
for a bag). Members must be hashable and not ``_Many``.

``members`` gives a read-only iterable (the set itself, or a 1-tuple).
"""

from __future__ import annotations

import sys
from collections.abc import Collection, Hashable, MutableMapping
from typing import Any, TypeVar, cast

K = TypeVar("K")
V = TypeVar("V", bound=Hashable)

_NONE: tuple[Any, ...] = ()


class _Many(set):  # type: ignore[type-arg]
    """Two or more members of one key."""

    __slots__ = ()


# for readers that inline ``members`` on a hot path: ``type(cur) is MANY``
MANY = _Many


def add(d: MutableMapping[K, Any], key: K, member: Hashable) -> bool:
    """Add ``member`` under ``key``; True when the key is new."""
    cur = d.get(key, _NONE)
    if cur is _NONE:
        d[key] = member
        return True
    if type(cur) is _Many:
        cur.add(member)
    elif cur != member:
        d[key] = _Many((cur, member))
    return False


def discard(d: MutableMapping[K, Any], key: K, member: Hashable) -> bool:
    """Remove ``member`` from ``key``; True when the key is gone now (it held
    nothing else), False when it still holds members or was never there."""
    cur = d.get(key, _NONE)
    if cur is _NONE:
        return False
    if type(cur) is _Many:
        cur.discard(member)
        if len(cur) == 1:
            d[key] = next(iter(cur))
        elif not cur:  # pragma: no cover - a _Many never shrinks below 1 here
            del d[key]
            return True
        return False
    if cur == member:
        del d[key]
        return True
    return False


def ref(more: dict[K, int], key: K) -> None:
    """One more reference to ``key`` beyond its first (which its presence
    elsewhere stands for): a count of 1, the usual one, takes no entry."""
    more[key] = more.get(key, 0) + 1


def unref(more: dict[K, int], key: K) -> bool:
    """Drop one of the references beyond the first; False when there was
    none (the caller drops the last one)."""
    n = more.get(key)
    if n is None:
        return False
    if n == 1:
        del more[key]
        if len(more) << 8 < sys.getsizeof(more) and sys.getsizeof(more) > _SHRINK_FROM:
            shrink(more)
    else:
        more[key] = n - 1
    return True


# A dict keeps the table of its largest size after its keys go. The counts of
# references beyond the first burst while a policy is replaced by an equal or
# overlapping one (both reference each selector and prefix until the old one
# is released: 100k entries, a 5 MB table, left empty; issue 17, B5HIST), so
# ``unref`` rebuilds the table once it holds fewer than one entry per 256
# bytes (the rebuilds as it drains cost O(the burst) in all).
_SHRINK_FROM = 4096  # bytes: small dicts are left alone


def shrink(d: dict[K, Any]) -> None:
    """Rebuild ``d``'s table for the entries it holds now (in place)."""
    items = list(d.items())
    d.clear()
    d.update(items)


def members(d: MutableMapping[K, Any] | dict[K, Any], key: K) -> Collection[Any]:
    """The members of ``key`` (empty if none). Do not mutate."""
    cur = d.get(key, _NONE)
    if cur is _NONE:
        return ()
    # no typing.cast here: a call on every lookup of the engine's indexes (issue 17, B5ENGINE)
    many: Collection[Any] = cur
    return many if type(cur) is _Many else (cur,)


def pop(d: MutableMapping[K, Any], key: K) -> Collection[Any]:
    """Remove ``key``; its members (empty if none)."""
    cur = d.pop(key, _NONE)
    if cur is _NONE:
        return ()
    return cast("Collection[Any]", cur) if type(cur) is _Many else (cur,)


__all__ = ["MANY", "add", "discard", "members", "pop", "ref", "shrink", "unref"]
