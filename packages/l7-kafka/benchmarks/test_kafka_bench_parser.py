"""Parser + matcher cost per request (no network): Produce v9 and Fetch v12 frames."""

from __future__ import annotations

from typing import Any

import pytest
from axoneme.l7.kafka import KafkaRule, match_request, parse_request
from kafka.protocol.consumer.fetch import FetchRequest
from kafka.protocol.producer.produce import ProduceRequest

pytestmark = pytest.mark.bench

RULES = [KafkaRule(role="produce", topic=f"topic-{i}") for i in range(8)] + \
    [KafkaRule(role="consume", topic=f"topic-{i}") for i in range(8)]


def _frame(msg: Any) -> bytes:
    msg.with_header(correlation_id=1, client_id="bench")
    return bytes(msg.encode(header=True, framed=True))[4:]


def _produce() -> bytes:
    P = ProduceRequest.TopicProduceData
    return _frame(ProduceRequest[9](transactional_id=None, acks=1, timeout_ms=1000, topic_data=[
        P(name=f"topic-{t}", partition_data=[P.PartitionProduceData(index=p, records=b"r" * 16384)
                                             for p in range(4)]) for t in range(4)]))


def _fetch() -> bytes:
    T = FetchRequest.FetchTopic
    return _frame(FetchRequest[12](max_wait_ms=500, min_bytes=1, topics=[
        T(topic=f"topic-{t}", partitions=[T.FetchPartition(partition=p, fetch_offset=1,
                                                          partition_max_bytes=1 << 20)
                                          for p in range(8)]) for t in range(8)]))


@pytest.mark.parametrize("kind", ["produce", "fetch"])
def test_bench_parse_and_match(benchmark: Any, kind: str) -> None:
    frame = _produce() if kind == "produce" else _fetch()

    def decide() -> bool:
        return match_request(RULES, parse_request(frame)).allowed

    assert benchmark(decide) is True
    benchmark.extra_info["frame_bytes"] = len(frame)
