"""The engine's compact reverse indexes (``_multimap``) against a dict of sets."""

from __future__ import annotations

from typing import Any

from axoneme.core.policy import _multimap as mm
from hypothesis import given, settings
from hypothesis import strategies as st

OPS = st.lists(st.tuples(st.sampled_from(["add", "discard", "pop"]), st.integers(0, 3),
                         st.one_of(st.integers(0, 4), st.tuples(st.integers(0, 2)))),
               max_size=60)


@settings(max_examples=300, deadline=None)
@given(OPS)
def test_behaves_as_a_dict_of_sets(ops: list[tuple[str, int, Any]]) -> None:
    d: dict[int, Any] = {}
    model: dict[int, set[Any]] = {}
    for op, key, member in ops:
        if op == "add":
            assert mm.add(d, key, member) == (key not in model)
            model.setdefault(key, set()).add(member)
        elif op == "discard":
            gone = key in model and model[key] == {member}
            assert mm.discard(d, key, member) == gone
            if key in model:
                model[key].discard(member)
                if not model[key]:
                    del model[key]
        else:
            assert set(mm.pop(d, key)) == model.pop(key, set())
        assert set(d) == set(model)  # no empty keys left behind
        for k, members in model.items():
            got = mm.members(d, k)
            assert set(got) == members and len(got) == len(members)
            # a lone member is kept bare: no set object for it
            assert (type(d[k]) is not mm._Many) == (len(members) == 1)
    assert tuple(mm.members(d, 99)) == ()


def test_a_tuple_member_is_never_taken_for_a_bag() -> None:
    d: dict[str, Any] = {}
    mm.add(d, "k", (1, 2))
    assert list(mm.members(d, "k")) == [(1, 2)]
    mm.add(d, "k", (1, 2))
    assert list(mm.members(d, "k")) == [(1, 2)]
    assert mm.discard(d, "k", (1, 2)) and d == {}
