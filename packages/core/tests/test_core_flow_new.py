"""``new_flow`` is ``Flow(...)``: the same fields, defaults and behaviour."""

from __future__ import annotations

import dataclasses

import pytest
from axoneme.core.flow import DropReason, Flow, FlowEndpoint, FlowPolicy, FlowVerdict, new_flow

SRC = FlowEndpoint(identity=42, namespace="ns", pod_name="a", labels=("k8s:app=a",), id=7)
DST = FlowEndpoint(identity=43)
BASE = (1764930000.25, FlowVerdict.FORWARDED, "10.0.0.1", "10.0.0.2", SRC, DST, "INGRESS")


def _slots(f: Flow) -> dict[str, object]:
    return {x.name: getattr(f, x.name) for x in dataclasses.fields(Flow)}


@pytest.mark.parametrize("kw", [
    {},
    {"type": "L7", "event_type": "l7", "l4": {"TCP": {"source_port": 1, "destination_port": 80}},
     "l7": {"type": "REQUEST"}, "is_reply": False, "summary": "s", "ip_version": "IPv6"},
    {"drop_reason": DropReason.POLICY_DENIED, "match_type": "L3_L4", "uuid": "u",
     "interface": (3, "eth0"), "ethernet": ("a", "b"), "source_names": ("x.example",),
     "ingress_denied_by": (FlowPolicy("p", "ns", "CiliumNetworkPolicy"),)},
])
def test_new_flow_equals_flow(kw: dict[str, object]) -> None:
    fast, slow = new_flow(*BASE, **kw), Flow(*BASE, **kw)
    assert type(fast) is Flow
    assert fast == slow and hash(fast) == hash(slow)
    assert _slots(fast) == _slots(slow)  # every field set, defaults included
    assert fast.to_json() == slow.to_json() and fast.compact() == slow.compact()
    assert dataclasses.replace(fast, uuid="z") == dataclasses.replace(slow, uuid="z")


def test_new_flow_defaults_are_fresh_and_frozen() -> None:
    a, b = new_flow(*BASE), new_flow(*BASE)
    assert a.l4 == {} and a.l4 is not b.l4  # default_factory, called per Flow
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.uuid = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        new_flow(*BASE[:6])  # traffic_direction is required, as in Flow
