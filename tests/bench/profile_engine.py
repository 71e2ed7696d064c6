"""The policy engine alone on B5's workload, for profiles (issue 17).

A server endpoint with an N-peer ``fromCIDR`` policy (TCP and UDP), then
rounds of one change: a policy allowing the client endpoint, and its
deletion, each followed by ``pending_changes`` (what the agent pushes to the
datapath). No kernel, no agent: what the flame graphs in
bench-results/flame/ were recorded from::

    nice -n 15 .venv/bin/py-spy record -o bench-results/flame/b5-engine-after.svg \\
        -- .venv/bin/python tests/bench/profile_engine.py 2000
"""

from __future__ import annotations

import ipaddress
import sys
import time
from typing import Any

from axoneme.core.endpoint import Endpoint
from axoneme.core.labels import Labels
from axoneme.core.policy.engine import EngineOptions, PolicyEngine
from axoneme.core.policy.parse import parse_policy_obj

FAKE = ipaddress.ip_network("10.244.128.0/17")


def _cnp(name: str, ingress: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": name, "namespace": "bench"},
            "spec": {"endpointSelector": {"matchLabels": {"app": "srv"}}, "ingress": ingress}}


def _ports(*protos: str) -> list[dict[str, Any]]:
    return [{"ports": [{"port": "5201", "protocol": p} for p in protos]}]


def server_and_client() -> PolicyEngine:
    """An engine with B5's two endpoints (server 1, client 2), their changes handed out."""
    engine = PolicyEngine(options=EngineOptions())
    for ep_id, app in ((1, "srv"), (2, "cli")):
        ident = engine.allocator.allocate(Labels.from_strings(
            [f"k8s:app={app}", "k8s:io.kubernetes.pod.namespace=bench"]))
        engine.upsert_endpoint(Endpoint(ep_id, ident.id, ident.labels, ipv4=f"10.244.0.{ep_id}",
                                        pod_name=app, namespace="bench"))
    engine.pending_changes()
    engine.pending_ipcache_changes()
    return engine


def main(n: int, rounds: int = 5) -> None:
    engine = server_and_client()
    t0 = time.perf_counter()
    base = parse_policy_obj(_cnp("peers", [{
        "fromCIDR": [f"{FAKE.network_address + 1 + i}/32" for i in range(n)],
        "toPorts": _ports("TCP", "UDP")}]), "bench", 0)
    t1 = time.perf_counter()
    engine.upsert_policy(base)
    t2 = time.perf_counter()
    adds = len(engine.pending_changes()[1].adds)
    engine.pending_ipcache_changes()
    t3 = time.perf_counter()
    print(f"N={n:,}: parse {(t1 - t0) * 1e3:.1f} ms, upsert {(t2 - t1) * 1e3:.1f} ms, "
          f"pending changes {(t3 - t2) * 1e3:.1f} ms ({adds:,} entries)")
    change = parse_policy_obj(_cnp("client", [{"fromEndpoints": [{"matchLabels": {"app": "cli"}}],
                                               "toPorts": _ports("UDP")}]), "bench", 0)
    for _ in range(rounds):
        t0 = time.perf_counter()
        engine.upsert_policy(change)
        got = engine.pending_changes()
        engine.pending_ipcache_changes()
        t1 = time.perf_counter()
        engine.delete_policy(change.ref)
        engine.pending_changes()
        engine.pending_ipcache_changes()
        t2 = time.perf_counter()
        print(f"  one change: add {(t1 - t0) * 1e3:.3f} ms ({len(got[1].adds)} entry), "
              f"delete {(t2 - t1) * 1e3:.3f} ms")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10_000)
