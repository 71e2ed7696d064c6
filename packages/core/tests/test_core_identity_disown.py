"""``IdentityAllocator.disown``: a shared store gives a number this node still uses to other
labels (issue 20: its delete and re-creation crossed this node's use). The number stops being
the answer for its label set, holders move off it by allocating again, then ``forget`` and
``learn`` take what the store says. The agent's side: packages/agent/tests/
test_agent_identity_nodegc.py."""

from __future__ import annotations

from collections.abc import Mapping

from axoneme.core.identity import IdentityAllocator
from axoneme.core.labels import Labels


class Store:
    """A shared store that never refuses a claim (the walk's arbitration is not the point)."""

    def load(self) -> Mapping[int, list[str]]:
        return {}

    def claim(self, number: int, labels: list[str]) -> bool:
        return True


def test_disowned_number_is_no_answer_and_is_learned_anew_once_released() -> None:
    alloc = IdentityAllocator(Store(), preferred=lambda _key: 300)
    web, db = Labels.from_strings(["k8s:app=web"]), Labels.from_strings(["k8s:app=db"])
    held = alloc.allocate(web)
    assert held.id == 300
    assert not alloc.learn(300, db.sorted_strings())  # in use here for web: refused
    assert alloc.disown(300)
    assert alloc.lookup(web) is None and alloc.get(300) == held  # still held, no answer
    moved = alloc.allocate(web)  # the walk skips the number this node still holds
    assert moved.id == 301 and alloc.lookup(web) == moved
    alloc.release(held)
    assert alloc.references() == {301: 1}
    assert alloc.forget(300) and alloc.learn(300, db.sorted_strings())
    assert alloc.lookup(db).id == 300  # type: ignore[union-attr]
    assert alloc.lookup(web) == moved
    assert not alloc.disown(999) and not alloc.disown(1)  # unknown; reserved (host)
