"""Pod ready latency: ``axoneme pod run`` until the pod answers, and CNI ADD -> ready in the agent.

50 pods (AXONEME_BENCH_QUICK=1: 5). "Reachable" means a TCP connect from the
host to the pod IP is answered (accepted or refused: either way the packet
made it into the pod and back), so the figure is network readiness, not the
start-up time of a server inside the pod. Datapath: AXONEME_E2E_DATAPATHS.
"""

from __future__ import annotations

import errno
import os
import socket
import statistics
import time
from typing import Any

import pytest

pytestmark = [pytest.mark.bench, pytest.mark.privileged]

QUICK = os.environ.get("AXONEME_BENCH_QUICK") == "1"
PODS = 5 if QUICK else 50


def _answers(ip: str, port: int = 9, timeout: float = 0.2) -> bool:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect((ip, port))
        return True
    except ConnectionRefusedError:
        return True
    except OSError as e:
        return e.errno == errno.ECONNREFUSED
    finally:
        s.close()


def _percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1))))
    return ordered[k]


def test_bench_pod_ready_latency(benchmark: Any, agent: Any) -> None:
    counter = iter(range(10_000))
    latencies: list[float] = []

    def one_pod() -> str:
        t0 = time.perf_counter()
        ip = agent.pod_run(f"b{next(counter)}", "sleep", "infinity", labels="bench=yes")
        while not _answers(ip):
            if time.perf_counter() - t0 > 30:
                raise AssertionError(f"pod {ip} not reachable after 30s")
        latencies.append(time.perf_counter() - t0)
        return ip

    benchmark.pedantic(one_pod, rounds=PODS, iterations=1)
    endpoints = agent.json("endpoint", "list")
    assert len(endpoints) == PODS
    assert len({e["ipv4"] for e in endpoints}) == PODS
    ready_ms = [float(e["ready_ms"]) for e in endpoints]
    stats = {
        "pods": PODS,
        "pod_run_until_reachable_p50_ms": round(statistics.median(latencies) * 1000, 1),
        "pod_run_until_reachable_p99_ms": round(_percentile(latencies, 99) * 1000, 1),
        "agent_add_to_ready_p50_ms": round(statistics.median(ready_ms), 1),
        "agent_add_to_ready_p99_ms": round(_percentile(ready_ms, 99), 1),
    }
    benchmark.extra_info.update(stats)
    print("\npod ready latency:", stats)
