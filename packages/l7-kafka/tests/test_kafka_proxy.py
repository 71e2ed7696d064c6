"""The proxy against a recording fake broker: ordering, refusals, framing, fuzzing."""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import pytest
from axoneme.core.flow import FlowVerdict
from axoneme.l7.kafka import KafkaRule, match_request, parse_request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kafka_fakes import Harness, read_response
from kafka_frames import TOPIC_VERSIONS, request_frame

PRODUCE_A = [KafkaRule(role="produce", topic="a")]


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_allowed_forwarded_verbatim_refused_answered_locally() -> None:
    async def go() -> None:
        async with Harness(PRODUCE_A) as h:
            r, w = await h.connect()
            ok = request_frame(0, 9, [("a", [0])], correlation_id=1)
            bad = request_frame(0, 9, [("b", [0])], correlation_id=2)
            w.write(ok + bad)
            assert (await read_response(r))[0] == 1
            corr, body = await read_response(r)
            assert corr == 2 and b"upstream" not in body
            assert h.broker.frames == [ok[4:]]
            assert [f.verdict for f in h.flows] == [FlowVerdict.FORWARDED, FlowVerdict.DROPPED]
            dropped = h.flows[1]
            assert dropped.type == "L7" and dropped.l7["type"] == "REQUEST"
            assert dropped.l7["kafka"]["api_key"] == "produce"
            assert dropped.l7["kafka"]["topic"] == "b"
            assert dropped.l7["kafka"]["error_code"] == 29
            assert dropped.l7["kafka"]["correlation_id"] == 2
            assert dropped.l7["kafka"]["client_id"] == "cid"
            # The connection stays usable after a refusal.
            w.write(request_frame(0, 9, [("a", [1])], correlation_id=3))
            assert (await read_response(r))[0] == 3
            w.close()
    run(go())


def test_refusal_waits_behind_in_flight_upstream_response() -> None:
    async def go() -> None:
        async with Harness(PRODUCE_A) as h:
            h.broker.held.add(1)
            r, w = await h.connect()
            w.write(request_frame(0, 9, [("a", [0])], correlation_id=1))
            w.write(request_frame(0, 9, [("b", [0])], correlation_id=2))
            w.write(request_frame(0, 9, [("a", [0])], correlation_id=3))
            await asyncio.sleep(0.2)  # the refusal of 2 is ready; 1 is still upstream
            with pytest.raises(TimeoutError):
                await read_response(r, timeout=0.3)
            h.broker.release.set()
            got = [(await read_response(r))[0] for _ in range(3)]
            assert got == [1, 2, 3]
            w.close()
    run(go())


def test_policy_change_applies_to_next_request() -> None:
    async def go() -> None:
        async with Harness(PRODUCE_A) as h:
            r, w = await h.connect()
            frame = request_frame(0, 9, [("a", [0])], correlation_id=1)
            w.write(frame)
            await read_response(r)
            h.rules = [KafkaRule(role="produce", topic="other")]
            w.write(request_frame(0, 9, [("a", [0])], correlation_id=2))
            _, body = await read_response(r)
            assert b"upstream" not in body and len(h.broker.frames) == 1
            h.lookup = lambda: None  # no policy at all: fail closed
            w.write(request_frame(18, 3, [], correlation_id=3))
            _, body = await read_response(r)
            assert b"upstream" not in body and len(h.broker.frames) == 1
            w.close()
    run(go())


def test_proxy_policy_object_and_async_lookup() -> None:
    async def go() -> None:
        async with Harness(None) as h:
            class Policy:  # shaped like core.l7proxy.ProxyPolicy
                rules = PRODUCE_A
                source = None
                destination = None

            async def lookup() -> Any:
                return Policy()
            h.lookup = lookup
            r, w = await h.connect()
            w.write(request_frame(0, 9, [("a", [0])], correlation_id=1))
            assert b"upstream" in (await read_response(r))[1]
            w.close()
    run(go())


def test_acks_zero_refusal_sends_nothing() -> None:
    async def go() -> None:
        async with Harness(PRODUCE_A) as h:
            r, w = await h.connect()
            w.write(request_frame(0, 9, [("b", [0])], correlation_id=1, acks=0))
            w.write(request_frame(0, 9, [("a", [0])], correlation_id=2, acks=0))
            w.write(request_frame(18, 3, [], correlation_id=3))
            assert (await read_response(r))[0] == 3  # nothing for 1 or 2
            assert len(h.broker.frames) == 2
            w.close()
    run(go())


def test_frames_split_into_single_bytes() -> None:
    async def go() -> None:
        async with Harness(PRODUCE_A) as h:
            r, w = await h.connect()
            data = request_frame(0, 9, [("a", [0])], correlation_id=1) + \
                request_frame(0, 9, [("b", [0])], correlation_id=2)
            for i in range(len(data)):
                w.write(data[i:i + 1])
                await w.drain()
            assert [(await read_response(r))[0] for _ in range(2)] == [1, 2]
            w.close()
    run(go())


@pytest.mark.parametrize("size", [-1, 0, 3, (1 << 20) + 1, 0x7FFFFFFF])
def test_bad_frame_size_closes(size: int) -> None:
    async def go() -> None:
        async with Harness([]) as h:
            r, w = await h.connect()
            w.write(struct.pack(">i", size) + b"\x00" * 16)
            assert await asyncio.wait_for(r.read(), 5) == b""
            assert h.broker.frames == []
            assert h.flows and h.flows[-1].verdict is FlowVerdict.DROPPED
    run(go())


def test_truncated_frame_closes_both_sides() -> None:
    async def go() -> None:
        async with Harness([]) as h:
            r, w = await h.connect()
            frame = request_frame(0, 9, [("a", [0])])
            w.write(frame[:-5])
            await w.drain()
            w.write_eof()
            assert await asyncio.wait_for(r.read(), 5) == b""
            assert h.broker.frames == []
    run(go())


def test_trickling_frame_times_out() -> None:
    async def go() -> None:
        async with Harness([], frame_timeout=0.3) as h:
            r, w = await h.connect()
            frame = request_frame(18, 3, [], correlation_id=1)
            w.write(frame[:6])  # size and a little of the body, then nothing
            await w.drain()
            assert await asyncio.wait_for(r.read(), 5) == b""
            assert h.broker.frames == []
            assert "not complete" in h.flows[-1].l7["kafka"]["reason"]
    run(go())


def test_unknown_api_refused_by_closing_when_no_response_possible() -> None:
    async def go() -> None:
        async with Harness([]) as h:
            r, w = await h.connect()
            # DescribeConfigs (32): topics we do not read; no refusal encoder -> close.
            body = struct.pack(">hhi", 32, 0, 9) + struct.pack(">h", 1) + b"c" + b"\x00" * 4
            w.write(struct.pack(">i", len(body)) + body)
            assert await asyncio.wait_for(r.read(), 5) == b""
            assert h.broker.frames == []
    run(go())


def test_metadata_partly_refused_keeps_allowed_topics() -> None:
    async def go() -> None:
        from kafka.protocol.metadata.metadata import MetadataResponse

        async with Harness(PRODUCE_A) as h:
            r, w = await h.connect()
            w.write(request_frame(3, 12, [("a", []), ("b", [])], correlation_id=4))
            corr, data = await read_response(r)
            assert corr == 4
            # The broker was only asked about "a".
            assert [parse_request(f).topic_names for f in h.broker.frames] == [("a",)]
            msg = MetadataResponse[12].decode(data[5:])
            assert [(t.name, t.error_code) for t in msg.topics] == [("a", 0), ("b", 29)]
            assert h.flows[-1].verdict is FlowVerdict.DROPPED
            assert h.flows[-1].l7["kafka"]["topic"] == "b"  # the refused one
            assert h.flows[-1].l7["kafka"]["topics"] == ["a", "b"]
            w.close()
    run(go())


def test_metadata_refused_outright_never_goes_upstream() -> None:
    async def go() -> None:
        from kafka.protocol.metadata.metadata import MetadataResponse

        async with Harness([KafkaRule(api_key="fetch")]) as h:
            r, w = await h.connect()
            w.write(request_frame(3, 12, [("a", [])], correlation_id=4))
            corr, data = await read_response(r)
            msg = MetadataResponse[12].decode(data[5:])
            assert corr == 4 and [(t.name, t.error_code) for t in msg.topics] == [("a", 29)]
            assert h.broker.frames == []
            w.close()
    run(go())


def test_upstream_close_closes_client() -> None:
    async def go() -> None:
        async with Harness([]) as h:
            r, w = await h.connect()
            w.write(request_frame(18, 3, [], correlation_id=1))
            await read_response(r)
            await h.broker.stop()
            assert await asyncio.wait_for(r.read(), 5) == b""
    run(go())


def test_upstream_answers_then_closes_all_answers_delivered() -> None:
    async def go() -> None:
        async with Harness([]) as h:
            h.broker.close_after = 12
            r, w = await h.connect()
            for i in range(12):  # pipelined; we read only after the broker closed
                w.write(request_frame(18, 3, [], correlation_id=i))
            await w.drain()
            await asyncio.sleep(0.3)
            got = [(await read_response(r))[0] for _ in range(12)]
            assert got == list(range(12))
            assert await asyncio.wait_for(r.read(), 5) == b""
    run(go())


def test_unsolicited_upstream_frames_end_the_connection() -> None:
    async def go() -> None:
        async with Harness([]) as h:
            h.broker.unsolicited = 10  # more than the read-ahead queue holds
            r, w = await h.connect()
            assert await asyncio.wait_for(r.read(), 5) == b""
    run(go())


# ------------------------------------------------------------------ fuzzing

FUZZ_RULES = [KafkaRule(role="produce", topic="a"), KafkaRule(role="consume", topic="b"),
              KafkaRule(api_key="heartbeat", client_id="cid")]

topic_names = st.sampled_from(["a", "b", "c", "a.b", ""])
valid_frames = st.builds(
    lambda key, vi, topics, corr: request_frame(
        key, list(TOPIC_VERSIONS[key])[vi % len(TOPIC_VERSIONS[key])],
        [(t, [0]) for t in topics], correlation_id=corr),
    st.sampled_from(sorted(TOPIC_VERSIONS)), st.integers(0, 20),
    st.lists(topic_names, min_size=0, max_size=3), st.integers(0, 2**31 - 1))


def _mutate(frame: bytes, how: int, pos: int, byte: int) -> bytes:
    if how == 0:
        return frame
    if how == 1:  # flip one byte of the body (size prefix kept)
        p = 4 + pos % max(1, len(frame) - 4)
        return frame[:p] + bytes([byte]) + frame[p + 1:]
    if how == 2:  # truncate the body, fix the size prefix: a short but framed request
        body = frame[4:4 + pos % max(1, len(frame) - 4)]
        return struct.pack(">i", len(body)) + body
    if how == 3:  # oversized (beyond max_frame) or negative size
        return struct.pack(">i", (64 * 1024 + 1 + pos) * (-1 if byte & 1 else 1)) + frame[4:]
    return struct.pack(">i", 8 + byte) + bytes([byte]) * (8 + byte)  # random junk


frames = st.builds(_mutate, valid_frames, st.integers(0, 4), st.integers(0, 10_000),
                   st.integers(0, 255))


FUZZ_RULE_SETS = [FUZZ_RULES, [KafkaRule(api_key="fetch", topic="a"),
                                KafkaRule(api_key="offsetcommit")]]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(frames, min_size=1, max_size=6), st.booleans(), st.sampled_from([0, 1]))
def test_fuzz_nothing_refused_reaches_upstream(batch: list[bytes], cut_last: bool,
                                               which: int) -> None:
    rules = FUZZ_RULE_SETS[which]

    async def go() -> None:
        async with Harness(rules, max_frame=64 * 1024) as h:
            r, w = await h.connect()
            data = b"".join(batch)
            if cut_last:
                data = data[:-3]
            w.write(data)
            await w.drain()
            w.write_eof()
            # Whatever happens, the proxy answers and/or closes: no hang.
            await asyncio.wait_for(r.read(), 10)
            w.close()
            # Every frame the broker saw is one the policy allows (a partly
            # refused Metadata goes up rewritten to its allowed topics only).
            for f in h.broker.frames:
                req = parse_request(f)
                assert match_request(rules, req).allowed, req
    run(go())


def test_kafka_proxy_factory_listener() -> None:
    """The agent-facing listener: (sock, *, direction, policy_for, flow_sink, config)."""
    import socket
    from types import SimpleNamespace

    from axoneme.core.mapstate import Direction
    from axoneme.l7.kafka import KafkaParser
    from kafka_fakes import FakeBroker

    async def go() -> None:
        broker = FakeBroker()
        up = await broker.start()
        calls: list[tuple[Any, ...]] = []
        flows: list[Any] = []

        def policy_for(*args: Any) -> Any:
            calls.append(args)
            return SimpleNamespace(rules=PRODUCE_A, source=None, destination=None)

        factory = KafkaParser().proxy_factory()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        proxy = factory(sock, direction=Direction.INGRESS, policy_for=policy_for,
                        flow_sink=flows.append, config=SimpleNamespace(upstream=up))
        await proxy.start()
        try:
            r, w = await asyncio.open_connection(*sock.getsockname()[:2])
            w.write(request_frame(0, 9, [("a", [0])], correlation_id=1))
            w.write(request_frame(0, 9, [("z", [0])], correlation_id=2))
            assert b"upstream" in (await read_response(r))[1]
            assert b"upstream" not in (await read_response(r))[1]
            w.close()
        finally:
            await proxy.stop()
            await broker.stop()
            sock.close()
        assert len(calls) == 2  # asked per request
        src_ip, _, dst_ip, dst_port, direction = calls[0]
        assert (src_ip, dst_ip, dst_port, direction) == ("127.0.0.1", up[0], up[1],
                                                         Direction.INGRESS)
        assert [f.traffic_direction for f in flows] == ["INGRESS", "INGRESS"]
        assert [f.verdict for f in flows] == [FlowVerdict.FORWARDED, FlowVerdict.DROPPED]
        assert flows[0].l4["TCP"]["destination_port"] == up[1]
    run(go())
