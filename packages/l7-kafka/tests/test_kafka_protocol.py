"""Request parsing: frames from kafka-python's codecs, hand-made frames, bad frames."""

from __future__ import annotations

import struct

import pytest
from axoneme.l7.kafka import KafkaDecodeError, parse_request
from axoneme.l7.kafka._codec import Reader, Writer, uvarint
from axoneme.l7.kafka._protocol import is_flexible
from kafka_frames import TOPIC_VERSIONS, TOPICLESS, request_frame

TOPICS = [("orders", [0, 2]), ("pay.ments-1", [1]), ("orders", [5])]


def _parse(frame: bytes):  # type: ignore[no-untyped-def]
    (size,) = struct.unpack(">i", frame[:4])
    assert size == len(frame) - 4
    return parse_request(frame[4:])


@pytest.mark.parametrize(("api_key", "version"),
                         [(k, v) for k, vs in TOPIC_VERSIONS.items() for v in vs])
def test_topic_apis_every_version(api_key: int, version: int) -> None:
    req = _parse(request_frame(api_key, version, TOPICS, correlation_id=4242,
                               client_id="svc-a"))
    assert req.error is None, req.error
    assert (req.api_key, req.api_version, req.correlation_id) == (api_key, version, 4242)
    assert req.client_id == "svc-a"
    assert req.flexible == is_flexible(api_key, version)
    assert req.topic_names == ("orders", "pay.ments-1")
    if api_key in (0, 1, 2, 8, 9):  # partitions are carried through
        assert req.topics == (("orders", (0, 2)), ("pay.ments-1", (1,)), ("orders", (5,)))
    assert not req.all_topics
    assert req.expects_response


@pytest.mark.parametrize("version", range(0, 13))
def test_produce_acks_zero_expects_no_response(version: int) -> None:
    req = _parse(request_frame(0, version, TOPICS, acks=0))
    assert req.error is None
    assert req.expects_response is False


@pytest.mark.parametrize("version", range(1, 14))
def test_metadata_all_topics(version: int) -> None:
    from kafka.protocol.metadata.metadata import MetadataRequest
    from kafka_frames import encode

    req = _parse(encode(MetadataRequest[version](topics=None)))
    assert req.error is None
    assert req.all_topics and req.topics == ()
    empty = _parse(encode(MetadataRequest[version](topics=[])))
    assert not empty.all_topics and empty.topics == ()


@pytest.mark.parametrize("flag", [True, False])
def test_metadata_auto_create_flag(flag: bool) -> None:
    from kafka.protocol.metadata.metadata import MetadataRequest
    from kafka_frames import encode

    req = _parse(encode(MetadataRequest[9](topics=[MetadataRequest.MetadataRequestTopic(
        name="x")], allow_auto_topic_creation=flag)))
    assert req.allow_auto_create is flag


def test_metadata_v0_empty_means_all() -> None:
    from kafka.protocol.metadata.metadata import MetadataRequest
    from kafka_frames import encode

    assert _parse(encode(MetadataRequest[0](topics=[]))).all_topics


@pytest.mark.parametrize("version", [2, 5, 7, 8, 9])
def test_offset_fetch_all_topics(version: int) -> None:
    from kafka.protocol.consumer.group import OffsetFetchRequest
    from kafka_frames import encode

    if version >= 8:
        G = OffsetFetchRequest.OffsetFetchRequestGroup
        msg = OffsetFetchRequest[version](groups=[G(group_id="g", topics=None)])
    else:
        msg = OffsetFetchRequest[version](group_id="g", topics=None)
    req = _parse(encode(msg))
    assert req.error is None and req.all_topics


@pytest.mark.parametrize(("api_key", "version"),
                         [(k, v) for k in TOPICLESS for v in range(0, 6)
                          if not (k == 18 and v > 4) and not (k == 12 and v > 4)
                          and not (k == 14 and v > 5)])
def test_topicless_apis(api_key: int, version: int) -> None:
    req = _parse(request_frame(api_key, version, [], correlation_id=9, client_id=None))
    assert req.error is None, req.error
    assert req.known and req.topics == ()
    assert req.client_id is None and req.correlation_id == 9
    if api_key == 10:
        assert req.keys == ("grp",)


@pytest.mark.parametrize(("api_key", "version"), [(0, 13), (1, 13), (1, 17), (8, 10), (9, 10)])
def test_topic_id_versions_are_refused(api_key: int, version: int) -> None:
    # These versions name topics by id; a header-only frame is enough to see it.
    frame = Writer().int16(api_key).int16(version).int32(1).string("c").getvalue() + b"\x00"
    req = parse_request(frame)
    assert req.error is not None and "unsupported" in req.error


def test_unknown_api_key_is_flagged() -> None:
    frame = Writer().int16(32).int16(0).int32(1).string("c").int32(0).getvalue()
    req = parse_request(frame)
    assert req.error is not None and not req.known


def test_hand_encoded_flexible_produce() -> None:
    # Produce v9, header v2 with a tagged field, compact strings/arrays.
    w = Writer(flexible=True)
    head = Writer().int16(0).int16(9).int32(77).string("hand").getvalue()
    w.raw(uvarint(1) + uvarint(5) + uvarint(2) + b"xy")  # one header tag (tag 5, 2 bytes)
    w.string(None).int16(-1).int32(500)
    w.array(1).string("t1").array(1).int32(3).bytes_(b"\x00\x01").tags().tags()
    w.tags()
    req = parse_request(head + w.getvalue())
    assert req.error is None, req.error
    assert req.topics == (("t1", (3,)),) and req.client_id == "hand"


@pytest.mark.parametrize("cut", [1, 5, 9, 12])
def test_truncated_bodies_are_errors_not_crashes(cut: int) -> None:
    frame = request_frame(0, 9, TOPICS)[4:]
    req = parse_request(frame[:-cut])
    assert isinstance(req.error, str) and ("truncated" in req.error or "does not fit" in req.error), req.error


def test_trailing_bytes_are_refused() -> None:
    frame = request_frame(1, 11, TOPICS)[4:]
    assert parse_request(frame + b"\x00").error == "1 trailing bytes"


def test_short_header_raises() -> None:
    with pytest.raises(KafkaDecodeError):
        parse_request(b"\x00\x01\x00")
    with pytest.raises(KafkaDecodeError):
        parse_request(Writer().int16(0).int16(-3).int32(1).string("x").getvalue())


def test_huge_array_count_is_rejected_quickly() -> None:
    # 2^31-1 topics announced in a few bytes: must not loop or allocate.
    body = Writer().string(None).int16(1).int32(1000).int32(0x7FFFFFFF).getvalue()
    head = Writer().int16(0).int16(3).int32(1).string("c").getvalue()
    req = parse_request(head + body)
    assert req.error is not None and "does not fit" in req.error


def test_varint_and_tags_codec() -> None:
    for n in (0, 1, 127, 128, 300, 2**31 - 1):
        assert Reader(uvarint(n)).uvarint() == n
    with pytest.raises(KafkaDecodeError):
        Reader(b"\xff\xff\xff\xff\xff\x01").uvarint()
    with pytest.raises(KafkaDecodeError):  # tags out of order
        Reader(uvarint(2) + b"\x05\x00\x01\x00").tagged_fields(True)


# ------------------------------------------------------------------ fuzzing

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def _header(api_key: int, version: int) -> bytes:
    return Writer().int16(api_key).int16(version).int32(1).string("fz").getvalue() + (
        b"\x00" if is_flexible(api_key, version) else b"")


@settings(max_examples=400, deadline=None)
@given(st.sampled_from([0, 1, 2, 3, 8, 9, 10, 19, 20]), st.integers(0, 14),
       st.binary(max_size=300))
def test_fuzz_bodies_never_crash(api_key: int, version: int, body: bytes) -> None:
    from axoneme.l7.kafka import deny_response, match_request
    from axoneme.l7.kafka._responses import metadata_request_for

    req = parse_request(_header(api_key, version) + body)
    assert req.error is not None or req.api_key == api_key
    match_request([], req)
    out = deny_response(req, 29, 31)
    assert out is None or struct.unpack(">i", out[:4])[0] == len(out) - 4
    if req.error is None and api_key == 3:
        again = metadata_request_for(req, req.topic_names)
        if again is not None:
            assert parse_request(again[4:]).topic_names == req.topic_names


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=200))
def test_fuzz_random_frames_never_crash(data: bytes) -> None:
    # only KafkaDecodeError (no header) or a request whose body error is a message
    try:
        req = parse_request(data)
    except KafkaDecodeError as e:
        assert str(e), "a decode error says what is wrong"
        return
    assert req.error is None or (isinstance(req.error, str) and req.error), req.error
    assert struct.unpack(">h", data[:2])[0] == req.api_key


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(TOPIC_VERSIONS)), st.integers(0, 20), st.integers(1, 40),
       st.integers(0, 255))
def test_fuzz_mutated_real_frames(api_key: int, vi: int, pos: int, byte: int) -> None:
    versions = list(TOPIC_VERSIONS[api_key])
    frame = bytearray(request_frame(api_key, versions[vi % len(versions)], TOPICS)[4:])
    frame[pos % len(frame)] = byte
    # Only KafkaDecodeError (header) or an ``error`` (body) may come out.
    try:
        req = parse_request(bytes(frame))
    except KafkaDecodeError:
        return
    if req.error is None and req.api_key == api_key:
        # What parsed is self-consistent: every partition list belongs to a name.
        assert len(req.topic_names) <= len(req.topics) or api_key in (3, 19, 20)
