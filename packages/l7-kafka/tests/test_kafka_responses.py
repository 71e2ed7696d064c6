"""Synthetic refusals and rewritten responses, decoded by kafka-python's codecs."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from axoneme.l7.kafka import parse_request
from axoneme.l7.kafka._protocol import TOPIC_APIS_MAX
from axoneme.l7.kafka._responses import (
    CLUSTER_AUTHORIZATION_FAILED,
    GROUP_AUTHORIZATION_FAILED,
    RESPONSE_MAX,
    TOPIC_AUTHORIZATION_FAILED,
    clamp_api_versions,
    deny_response,
    metadata_request_for,
    metadata_rewrite,
)
from kafka.protocol.admin.topics import CreateTopicsResponse, DeleteTopicsResponse
from kafka.protocol.consumer.fetch import FetchResponse
from kafka.protocol.consumer.group import (
    HeartbeatResponse,
    JoinGroupResponse,
    LeaveGroupResponse,
    OffsetCommitResponse,
    OffsetFetchResponse,
    SyncGroupResponse,
)
from kafka.protocol.consumer.offsets import ListOffsetsResponse
from kafka.protocol.metadata.api_versions import ApiVersionsResponse
from kafka.protocol.metadata.find_coordinator import FindCoordinatorResponse
from kafka.protocol.metadata.metadata import MetadataRequest, MetadataResponse
from kafka.protocol.producer.produce import ProduceResponse
from kafka.protocol.producer.transaction import InitProducerIdRequest, InitProducerIdResponse
from kafka_frames import encode, request_frame

RESPONSES: dict[int, Any] = {
    0: ProduceResponse, 1: FetchResponse, 2: ListOffsetsResponse, 3: MetadataResponse,
    8: OffsetCommitResponse, 9: OffsetFetchResponse, 10: FindCoordinatorResponse,
    11: JoinGroupResponse, 12: HeartbeatResponse, 13: LeaveGroupResponse,
    14: SyncGroupResponse, 18: ApiVersionsResponse, 19: CreateTopicsResponse,
    20: DeleteTopicsResponse, 22: InitProducerIdResponse,
}
TOPICS = [("orders", [0, 2]), ("audit", [1])]


def decode(api_key: int, version: int, framed: bytes) -> tuple[int, Any]:
    """(correlation id, message); asserts every byte of the frame is consumed."""
    (size,) = struct.unpack(">i", framed[:4])
    data = memoryview(framed)[4:]
    assert size == len(data)
    cls = RESPONSES[api_key]
    (corr,) = struct.unpack(">i", data[:4])
    pos = 4
    if api_key == 18 and struct.unpack(">h", data[4:6])[0] != 0:
        version = 0  # ApiVersions error responses are v0 bodies
    flexible = cls.flexible_version_q(version)
    if flexible and api_key != 18:
        assert data[4] == 0  # empty header tag section
        pos = 5
    fast = cls._struct.compiled_decode_from(version, compact=flexible, tagged=flexible,
                                            data_class=cls[None])
    msg, end = fast(data, pos)
    assert end == len(data), f"{len(data) - end} bytes left over"
    return corr, msg


def _req(api_key: int, version: int) -> Any:
    if api_key == 22:
        frame = encode(InitProducerIdRequest[version](transactional_id=None,
                                                      transaction_timeout_ms=1000),
                       correlation_id=31337)
    else:
        frame = request_frame(api_key, version, TOPICS, correlation_id=31337)
    req = parse_request(frame[4:])
    assert req.error is None
    return req


CASES = [(k, v) for k, top in RESPONSE_MAX.items() for v in range(0, top + 1)
         if not (k == 14 and v > 5) and not (k == 12 and v > 4)]


@pytest.mark.parametrize(("api_key", "version"), CASES)
def test_deny_response_decodes(api_key: int, version: int) -> None:
    req = _req(api_key, version)
    topic_err = TOPIC_AUTHORIZATION_FAILED
    api_err = GROUP_AUTHORIZATION_FAILED if api_key in (8, 9, 10, 11, 12, 13, 14) \
        else CLUSTER_AUTHORIZATION_FAILED
    out = deny_response(req, topic_err, api_err)
    assert out is not None
    corr, msg = decode(api_key, version, out)
    assert corr == 31337
    errors: list[int] = []
    if api_key == 0:
        for t in msg.responses:
            errors += [p.error_code for p in t.partition_responses]
        assert [t.name for t in msg.responses] == ["orders", "audit"]
    elif api_key == 1:
        for t in msg.responses:
            errors += [p.error_code for p in t.partitions]
        assert [t.topic for t in msg.responses] == ["orders", "audit"]
    elif api_key == 2:
        for t in msg.topics:
            errors += [p.error_code for p in t.partitions]
    elif api_key == 3:
        errors = [t.error_code for t in msg.topics]
        assert [t.name for t in msg.topics] == ["orders", "audit"]
    elif api_key == 8:
        for t in msg.topics:
            errors += [p.error_code for p in t.partitions]
    elif api_key == 9:
        if version >= 8:
            for g in msg.groups:
                for t in g.topics:
                    errors += [p.error_code for p in t.partitions]
        else:
            for t in msg.topics:
                errors += [p.error_code for p in t.partitions]
            if version >= 2:
                assert msg.error_code == api_err
    elif api_key == 10:
        errors = ([c.error_code for c in msg.coordinators] if version >= 4
                  else [msg.error_code])
    elif api_key in (11, 12, 13, 14, 18, 22):
        errors = [msg.error_code]
    elif api_key in (19, 20):
        seq = msg.topics if api_key == 19 else msg.responses
        errors = [t.error_code for t in seq]
        assert [t.name for t in seq] == ["orders", "audit"]
    if api_key in TOPIC_APIS_MAX:
        expected_partitions = {0: 3, 1: 3, 2: 3, 3: 2, 8: 3, 9: 3, 19: 2, 20: 2}[api_key]
        assert errors == [topic_err] * expected_partitions
    else:
        assert errors == [api_err]


def test_versions_beyond_the_encoder_give_none() -> None:
    from axoneme.l7.kafka import KafkaRequest

    assert deny_response(KafkaRequest(15, 0, 1, "c"), 29, 30) is None  # DescribeGroups
    assert deny_response(KafkaRequest(1, 13, 1, "c"), 29, 30) is None


def _metadata_response(version: int, topics: list[str]) -> bytes:
    R = MetadataResponse
    B = R.MetadataResponseBroker
    T = R.MetadataResponseTopic
    P = T.MetadataResponsePartition
    msg = R[version](
        brokers=[B(node_id=111, host="127.0.0.1", port=9092, rack=None)],
        cluster_id="c1", controller_id=111,
        topics=[T(error_code=0, name=t, is_internal=False,
                  partitions=[P(error_code=0, partition_index=0, leader_id=111, leader_epoch=0,
                                replica_nodes=[111], isr_nodes=[111], offline_replicas=[])])
                for t in topics])
    msg.with_header(correlation_id=5)
    return bytes(msg.encode(header=True))


@pytest.mark.parametrize("version", range(1, 14))
def test_metadata_rewrite_keeps_allowed_and_adds_refused(version: int) -> None:
    req = parse_request(encode(MetadataRequest[version](
        topics=[MetadataRequest.MetadataRequestTopic(name=n) for n in ("ok", "nope")]),
        correlation_id=5)[4:])
    upstream_req = parse_request(metadata_request_for(req, ("ok",))[4:])  # type: ignore[index]
    assert upstream_req.error is None
    assert upstream_req.allow_auto_create == req.allow_auto_create
    assert upstream_req.topic_names == ("ok",) and upstream_req.correlation_id == 5
    # A broker that volunteers more topics than asked (tansu does) is filtered.
    upstream = _metadata_response(version, ["ok", "secret"])
    out = metadata_rewrite(req, upstream, ("ok",), ("nope",), TOPIC_AUTHORIZATION_FAILED)
    corr, msg = decode(3, version, out)
    assert corr == 5
    assert [(t.name, t.error_code) for t in msg.topics] == [("ok", 0), ("nope", 29)]
    assert [b.node_id for b in msg.brokers] == [111]
    assert len(msg.topics[0].partitions) == 1


def test_metadata_v0_cannot_ask_for_no_topic() -> None:
    req = parse_request(encode(MetadataRequest[0](
        topics=[MetadataRequest.MetadataRequestTopic(name="x")]))[4:])
    assert metadata_request_for(req, ()) is None
    assert metadata_request_for(req, ("x",)) is not None


@pytest.mark.parametrize("version", range(0, 5))
def test_api_versions_clamped(version: int) -> None:
    req = parse_request(request_frame(18, version, [], correlation_id=3)[4:])
    R = ApiVersionsResponse
    msg = R[version](error_code=0, api_keys=[
        R.ApiVersion(api_key=1, min_version=4, max_version=17),
        R.ApiVersion(api_key=0, min_version=3, max_version=13),
        R.ApiVersion(api_key=12, min_version=0, max_version=4),
        R.ApiVersion(api_key=8, min_version=2, max_version=10)])
    msg.with_header(correlation_id=3)
    data = bytearray(msg.encode(header=True))
    clamp_api_versions(req, data)
    corr, out = decode(18, version, struct.pack(">i", len(data)) + bytes(data))
    assert corr == 3
    got = {k.api_key: (k.min_version, k.max_version) for k in out.api_keys}
    assert got == {1: (4, 12), 0: (3, 12), 12: (0, 4), 8: (2, 9)}
