"""The flow enricher fills in a datapath event's sides (pod, namespace, labels)
and shares them between the flows of one endpoint or identity: the flow ring
(4,095 flows) kept a copy of each side's label strings per flow, ~1.3 KB of a
flow's ~2.5 KB (issue 17, B5HIST)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from axoneme.agent._views import FlowEnricher
from axoneme.core.flow import Flow, FlowEndpoint, FlowVerdict
from axoneme.core.labels import Labels

POD = Labels.from_strings(["k8s:app=cli", "k8s:io.kubernetes.pod.namespace=bench"])
WORLD = Labels.from_strings(["reserved:world", "cidr:192.0.2.7/32"])


def _enricher(pod_name: str = "cli") -> FlowEnricher:
    rec = SimpleNamespace(id=7, identity=4242, namespace="bench", pod_name=pod_name)
    store = SimpleNamespace(endpoint_by_ip=lambda ip: rec if ip == "10.0.0.7" else None,
                            endpoint_objs={7: SimpleNamespace(labels=POD)})
    engine = SimpleNamespace(identity_of_ip=lambda ip: 16777300)
    allocator = SimpleNamespace(get=lambda n: SimpleNamespace(labels=WORLD) if n == 16777300 else None)
    return FlowEnricher(store, engine, allocator)  # type: ignore[arg-type]


def _flow(src: str = "10.0.0.7", dst: str = "192.0.2.7") -> Flow:
    return Flow(time=1.0, verdict=FlowVerdict.DROPPED, ip_source=src, ip_destination=dst,
                source=FlowEndpoint(), destination=FlowEndpoint(), traffic_direction="EGRESS")


def test_sides_are_filled_in_and_shared() -> None:
    enrich = _enricher()
    a, b = enrich(_flow()), enrich(_flow())
    assert a.source == FlowEndpoint(identity=4242, namespace="bench", pod_name="cli",
                                    labels=tuple(POD.sorted_strings()), id=7)
    assert a.destination == FlowEndpoint(identity=16777300, labels=tuple(WORLD.sorted_strings()))
    assert a.source is b.source and a.destination is b.destination


def test_a_changed_record_gets_a_side_of_its_own() -> None:
    enrich = _enricher("cli")
    first = enrich(_flow()).source
    enrich.store.endpoint_by_ip = lambda ip: SimpleNamespace(  # type: ignore[attr-defined]
        id=7, identity=4242, namespace="bench", pod_name="cli-2")
    second = enrich(_flow()).source
    assert (first.pod_name, second.pod_name) == ("cli", "cli-2")
    assert first.labels is second.labels  # the same labels: one tuple


def test_what_is_shared_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FlowEnricher, "MAX_SHARED", 4)
    enrich = _enricher()
    for i in range(20):
        enrich.engine.identity_of_ip = lambda ip, i=i: 16777300 + i  # type: ignore[attr-defined]
        enrich(_flow())
    assert len(enrich._sides) <= 4 and len(enrich._texts) <= 4
