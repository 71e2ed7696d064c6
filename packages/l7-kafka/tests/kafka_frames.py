"""Request/response frames built with kafka-python's own message classes.

kafka-python 3 generates its codecs from Apache Kafka's message JSON, so it
is an independent encoder for every API version: our parser must read what
it writes, and it must read what our proxy answers.
"""

from __future__ import annotations

from typing import Any

from kafka.protocol.admin.topics import CreateTopicsRequest, DeleteTopicsRequest
from kafka.protocol.consumer.fetch import FetchRequest
from kafka.protocol.consumer.group import (
    HeartbeatRequest,
    JoinGroupRequest,
    LeaveGroupRequest,
    OffsetCommitRequest,
    OffsetFetchRequest,
    SyncGroupRequest,
)
from kafka.protocol.consumer.offsets import ListOffsetsRequest
from kafka.protocol.metadata.api_versions import ApiVersionsRequest
from kafka.protocol.metadata.find_coordinator import FindCoordinatorRequest
from kafka.protocol.metadata.metadata import MetadataRequest
from kafka.protocol.producer.produce import ProduceRequest

TopicSpec = list[tuple[str, list[int]]]

# (api key, versions we parse) for the topic-bearing APIs.
TOPIC_VERSIONS: dict[int, range] = {
    0: range(0, 13), 1: range(0, 13), 2: range(0, 12), 3: range(0, 14),
    8: range(0, 10), 9: range(0, 10), 19: range(0, 8), 20: range(0, 7),
}


def _produce(v: int, topics: TopicSpec, acks: int = 1) -> Any:
    P = ProduceRequest.TopicProduceData
    return ProduceRequest[v](
        transactional_id=None, acks=acks, timeout_ms=1000,
        topic_data=[P(name=t, partition_data=[P.PartitionProduceData(index=p, records=b"rec")
                                               for p in ps]) for t, ps in topics])


def _fetch(v: int, topics: TopicSpec) -> Any:
    T = FetchRequest.FetchTopic
    return FetchRequest[v](
        max_wait_ms=100, min_bytes=1,
        topics=[T(topic=t, partitions=[T.FetchPartition(partition=p, fetch_offset=5,
                                                        partition_max_bytes=1024) for p in ps])
                for t, ps in topics],
        forgotten_topics_data=([FetchRequest.ForgottenTopic(topic="gone", partitions=[1])]
                               if v >= 7 else []),
        rack_id="r1")


def _list_offsets(v: int, topics: TopicSpec) -> Any:
    T = ListOffsetsRequest.ListOffsetsTopic
    return ListOffsetsRequest[v](
        replica_id=-1,
        topics=[T(name=t, partitions=[T.ListOffsetsPartition(partition_index=p, timestamp=-1,
                                                             max_num_offsets=1) for p in ps])
                for t, ps in topics])


def _metadata(v: int, topics: TopicSpec) -> Any:
    T = MetadataRequest.MetadataRequestTopic
    return MetadataRequest[v](topics=[T(name=t) for t, _ in topics])


def _offset_commit(v: int, topics: TopicSpec) -> Any:
    T = OffsetCommitRequest.OffsetCommitRequestTopic
    return OffsetCommitRequest[v](
        group_id="grp", member_id="m1",
        topics=[T(name=t, partitions=[T.OffsetCommitRequestPartition(
            partition_index=p, committed_offset=10, committed_metadata="md") for p in ps])
            for t, ps in topics])


def _offset_fetch(v: int, topics: TopicSpec) -> Any:
    if v >= 8:
        G = OffsetFetchRequest.OffsetFetchRequestGroup
        return OffsetFetchRequest[v](groups=[G(
            group_id="grp", member_id=None,
            topics=[G.OffsetFetchRequestTopics(name=t, partition_indexes=ps)
                    for t, ps in topics])])
    T = OffsetFetchRequest.OffsetFetchRequestTopic
    return OffsetFetchRequest[v](group_id="grp",
                                 topics=[T(name=t, partition_indexes=ps) for t, ps in topics])


def _create_topics(v: int, topics: TopicSpec) -> Any:
    T = CreateTopicsRequest.CreatableTopic
    return CreateTopicsRequest[v](topics=[
        T(name=t, num_partitions=len(ps) or 1, replication_factor=1,
          assignments=[T.CreatableReplicaAssignment(partition_index=p, broker_ids=[1])
                       for p in ps],
          configs=[T.CreatableTopicConfig(name="retention.ms", value="1000")])
        for t, ps in topics])


def _delete_topics(v: int, topics: TopicSpec) -> Any:
    if v >= 6:
        return DeleteTopicsRequest[v](topics=[DeleteTopicsRequest.DeleteTopicState(name=t)
                                              for t, _ in topics])
    return DeleteTopicsRequest[v](topic_names=[t for t, _ in topics])


BUILDERS = {0: _produce, 1: _fetch, 2: _list_offsets, 3: _metadata, 8: _offset_commit,
            9: _offset_fetch, 19: _create_topics, 20: _delete_topics}

TOPICLESS = {
    10: lambda v: FindCoordinatorRequest[v](key="grp", key_type=0, coordinator_keys=["grp"]),
    11: lambda v: JoinGroupRequest[v](group_id="grp", session_timeout_ms=6000,
                                      member_id="", protocol_type="consumer"),
    12: lambda v: HeartbeatRequest[v](group_id="grp", generation_id=1, member_id="m1"),
    13: lambda v: LeaveGroupRequest[v](group_id="grp", member_id="m1"),
    14: lambda v: SyncGroupRequest[v](group_id="grp", generation_id=1, member_id="m1"),
    18: lambda v: ApiVersionsRequest[v](client_software_name="t", client_software_version="1"),
}


def encode(msg: Any, correlation_id: int = 7, client_id: str | None = "cid") -> bytes:
    """The framed request (size prefix included)."""
    msg.with_header(correlation_id=correlation_id, client_id=client_id)
    return bytes(msg.encode(header=True, framed=True))


def request_frame(api_key: int, version: int, topics: TopicSpec, correlation_id: int = 7,
                  client_id: str | None = "cid", **kw: Any) -> bytes:
    if api_key in BUILDERS:
        msg = BUILDERS[api_key](version, topics, **kw)
    else:
        msg = TOPICLESS[api_key](version)
    return encode(msg, correlation_id, client_id)
