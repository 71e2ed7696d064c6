"""Policy engine benchmarks (pytest-benchmark; AXONEME_BENCH_QUICK=1 shrinks N).

- resolve one endpoint with 1,000 policies and 1,000 identities (aim <= 10 ms)
- add one policy to an engine holding 10,000 (aim <= 5 ms, incremental)
- ``axoneme policy matrix`` for 100 pods x 100 policies (aim <= 5 s)
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
import yaml
from axoneme.core.endpoint import Endpoint
from axoneme.core.labels import Labels
from axoneme.core.mapstate import Direction
from axoneme.core.policy.api import (
    EndpointPeer,
    PeerRule,
    Policy,
    PolicyKind,
    PolicyRef,
    PortProtocol,
    PortRule,
    Rule,
)
from axoneme.core.policy.engine import PolicyEngine
from axoneme.core.selectors import LabelSelector

pytestmark = pytest.mark.bench
QUICK = os.environ.get("AXONEME_BENCH_QUICK") == "1"


def scale(n: int) -> int:
    return max(10, n // 10) if QUICK else n


def measure(benchmark, fn, *args):  # type: ignore[no-untyped-def]
    """Quick mode: a few rounds only (CI); otherwise pytest-benchmark's calibration."""
    if QUICK:
        return benchmark.pedantic(fn, args, rounds=5, iterations=1, warmup_rounds=1)
    return benchmark(fn, *args)


def sel(**labels: str) -> LabelSelector:
    return LabelSelector.build({f"k8s:{k}": v for k, v in labels.items()})


def policy(name: str, subject: LabelSelector, peer: LabelSelector, port: int) -> Policy:
    ref = PolicyRef(PolicyKind.CILIUM_NETWORK_POLICY, "default", name)
    rules = (PeerRule(Direction.INGRESS, peers=(EndpointPeer(peer),),
                      ports=(PortRule((PortProtocol(port, protocol="TCP"),)),), path="spec.ingress[0]"),
             PeerRule(Direction.EGRESS, peers=(EndpointPeer(peer),), path="spec.egress[0]"))
    return Policy(ref, (Rule(ref, subject, rules, enforce_ingress=True, enforce_egress=True),))


def engine_with(n_identities: int, n_apps: int) -> PolicyEngine:
    engine = PolicyEngine()
    with engine.batch():
        for i in range(n_identities):
            labels = Labels.from_strings([f"k8s:app=app{i % n_apps}", f"k8s:tier=t{i % 10}",
                                          f"k8s:instance=i{i}", "k8s:io.kubernetes.pod.namespace=default"])
            ident = engine.allocator.allocate(labels)
            engine.upsert_endpoint(Endpoint(i + 1, ident.id, labels, ipv4=f"10.244.{i // 250}.{i % 250 + 1}"))
    return engine


def test_bench_resolve_one_endpoint(benchmark) -> None:
    """1,000 identities, 1,000 policies; the endpoint is selected by 10 of them, whose peers
    (a tier: 100 identities each) give ~1,000 keys."""
    n = scale(1000)
    engine = engine_with(n, 100)
    with engine.batch():
        for j in range(n):
            engine.upsert_policy(policy(f"p{j}", sel(app=f"app{j % 100}"), sel(tier=f"t{j % 10}"), 80 + j % 5))
    state = measure(benchmark, engine.regenerate, 1)
    assert len(state) >= 10


def test_bench_incremental_policy_add(benchmark) -> None:
    """10,000 policies over 1,000 endpoints (one app each); adding one recomputes one endpoint."""
    n_eps, n_pols = scale(1000), scale(10000)
    engine = engine_with(n_eps, n_eps)
    with engine.batch():
        for j in range(n_pols):
            engine.upsert_policy(policy(f"p{j}", sel(app=f"app{j % n_eps}"),
                                        sel(app=f"app{(j * 7 + 1) % n_eps}"), 80 + j % 10))
    engine.pending_changes()
    counter = itertools.count()

    def add() -> dict:
        k = next(counter)
        engine.upsert_policy(policy(f"new{k}", sel(app=f"app{k % n_eps}"), sel(tier="t3"), 1024 + k % 60000))
        return engine.pending_changes()

    changes = measure(benchmark, add)
    assert len(changes) == 1


def test_bench_policy_matrix(benchmark, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`axoneme policy matrix` (YAML parse + engine + probes) for 100 pods x 100 policies, one port."""
    cli = pytest.importorskip("axoneme.agent.cli")
    n_pods, n_pols = (30, 30) if QUICK else (100, 100)
    namespaces = [f"ns{i}" for i in range(5)]
    objs: list[dict] = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n, "labels": {"team": n}}}
                        for n in namespaces]
    for i in range(n_pods):
        objs.append({"apiVersion": "v1", "kind": "Pod", "metadata": {
            "name": f"p{i}", "namespace": namespaces[i % 5], "labels": {"app": f"app{i % 20}", "tier": f"t{i % 4}"}}})
    pols = []
    for j in range(n_pols):
        pols.append({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                     "metadata": {"name": f"np{j}", "namespace": namespaces[j % 5]},
                     "spec": {"podSelector": {"matchLabels": {"app": f"app{j % 20}"}},
                              "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": namespaces[(j + 1) % 5]}},
                                                     "podSelector": {"matchLabels": {"tier": f"t{j % 4}"}}}],
                                           "ports": [{"port": 80}]}]}})
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump_all(objs))
    (tmp_path / "policies.yaml").write_text(yaml.safe_dump_all(pols))
    args = ["policy", "matrix", "--cluster", str(tmp_path / "cluster.yaml"), "-f", str(tmp_path / "policies.yaml"),
            "--port", "80", "-o", "json"]

    def run() -> int:
        code = cli.main(args)
        capsys.readouterr()
        return code

    assert measure(benchmark, run) == 0
