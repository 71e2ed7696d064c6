"""``IdentityAllocator.snapshot()``'s read-only view (issue 17: RSS).

The allocator keeps the sorted label strings of cluster identities; those of
CIDR identities (``PrefixLabels``) are made when read, so a 100k-prefix
policy's identities keep no list each.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from axoneme.core.labels import PrefixLabels


class IdentitySnapshot(Mapping[int, list[str]]):
    """Non-reserved identities -> sorted label strings: the lists kept for
    cluster identities (``plain``) and, made when read, those of CIDR
    identities (in ``by_id``, not in ``plain``). Numbers below
    ``reserved_below`` (but 0) are reserved: not listed."""

    __slots__ = ("_plain", "_by_id", "_reserved_below")

    def __init__(self, plain: dict[int, list[str]], by_id: dict[int, Any],  # Identity
                 reserved_below: int) -> None:
        self._plain = plain
        self._by_id = by_id
        self._reserved_below = reserved_below

    def __getitem__(self, number: int) -> list[str]:
        found = self._plain.get(number)
        if found is not None:
            return found
        ident = self._by_id.get(number)
        if ident is None or not isinstance(ident.labels, PrefixLabels):
            raise KeyError(number)
        strings: list[str] = ident.label_strings()
        return strings

    def __iter__(self) -> Iterator[int]:
        yield from self._plain
        for number, ident in self._by_id.items():
            if isinstance(ident.labels, PrefixLabels):
                yield number

    def __len__(self) -> int:
        # every non-reserved identity is listed: plain or CIDR
        by_id = self._by_id
        return len(by_id) - sum(1 for n in range(1, self._reserved_below) if n in by_id)


__all__ = ["IdentitySnapshot"]
