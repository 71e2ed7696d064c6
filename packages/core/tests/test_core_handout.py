"""pending_changes without a copy of what it handed out (issue 17: RSS).

Between two hand-outs an endpoint may change incrementally and then be
rebuilt (its labels or ports changed): the rebuild's diff is against what
was handed out, recovered from the touched keys' earlier entries."""

from __future__ import annotations

from axoneme.core.endpoint import Endpoint, NamedPort
from axoneme.core.labels import Labels
from axoneme.core.mapstate import MapState
from axoneme.core.policy.engine import EngineOptions, PolicyEngine
from axoneme.core.policy.parse import parse_policy_obj


def _cnp(name: str, cidrs: list[str], port: str) -> object:
    return parse_policy_obj({
        "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
        "metadata": {"name": name, "namespace": "x"},
        "spec": {"endpointSelector": {"matchLabels": {"app": "srv"}}, "ingress": [
            {"fromCIDR": cidrs, "toPorts": [{"ports": [{"port": port, "protocol": "TCP"}]}]}]}},
        "f", 0)


def _endpoint(engine: PolicyEngine, port: int) -> Endpoint:
    ident = engine.allocator.allocate(Labels.from_strings(
        ["k8s:app=srv", "k8s:io.kubernetes.pod.namespace=x"]))
    return Endpoint(1, ident.id, ident.labels, ipv4="10.244.0.1",
                    named_ports=(NamedPort("web", port),))


def _take(engine: PolicyEngine, held: dict[int, MapState]) -> None:
    for eid, changes in engine.pending_changes().items():
        held[eid] = held.get(eid, MapState()).apply(changes)


def test_changes_then_a_rebuild_between_two_hand_outs() -> None:
    engine = PolicyEngine(options=EngineOptions())
    held: dict[int, MapState] = {}
    engine.upsert_endpoint(_endpoint(engine, 8080))
    engine.upsert_policy(_cnp("a", ["198.51.100.1/32", "198.51.100.2/32"], "80"))  # type: ignore[arg-type]
    _take(engine, held)
    assert len(held[1]) == len(engine.resolve(1)) >= 3
    # incremental: one key added, two withdrawn; then a rebuild (ports changed)
    engine.upsert_policy(_cnp("b", ["198.51.100.3/32"], "81"))  # type: ignore[arg-type]
    engine.upsert_policy(_cnp("a", ["198.51.100.9/32"], "80"))  # type: ignore[arg-type]
    engine.upsert_endpoint(_endpoint(engine, 9090))
    _take(engine, held)
    assert held[1] == engine.resolve(1)
    # and once more the other way: keys gone before the rebuild come back after it
    engine.delete_policy(_cnp("b", [], "81").ref)  # type: ignore[attr-defined]
    engine.upsert_endpoint(_endpoint(engine, 8080))
    engine.upsert_policy(_cnp("b", ["198.51.100.3/32"], "81"))  # type: ignore[arg-type]
    _take(engine, held)
    assert held[1] == engine.resolve(1)
    assert engine.pending_changes() == {}
