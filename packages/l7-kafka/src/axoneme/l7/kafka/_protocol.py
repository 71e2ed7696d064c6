"""Kafka request parsing: the header and the bodies that name topics.

Layouts follow Apache Kafka's message definitions
(clients/src/main/resources/common/message/*Request.json). Bodies of the APIs
that carry topic names are parsed completely (every byte accounted for), so
what we decide on is exactly what the broker will read. Versions that name
topics by id instead of by name (Produce v13, Fetch v13+, OffsetCommit v10,
OffsetFetch v10) are not parsed: the proxy clamps the versions the broker
advertises so clients do not pick them, and a request using one anyway is
refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from axoneme.l7.kafka._codec import KafkaDecodeError, Reader

# Kafka API keys (names as Cilium spells them in `apiKey`, lower case).
API_NAMES: dict[int, str] = {
    0: "produce", 1: "fetch", 2: "offsets", 3: "metadata", 4: "leaderandisr",
    5: "stopreplica", 6: "updatemetadata", 7: "controlledshutdown",
    8: "offsetcommit", 9: "offsetfetch", 10: "findcoordinator", 11: "joingroup",
    12: "heartbeat", 13: "leavegroup", 14: "syncgroup", 15: "describegroups",
    16: "listgroups", 17: "saslhandshake", 18: "apiversions", 19: "createtopics",
    20: "deletetopics", 21: "deleterecords", 22: "initproducerid",
    23: "offsetforleaderepoch", 24: "addpartitionstotxn", 25: "addoffsetstotxn",
    26: "endtxn", 27: "writetxnmarkers", 28: "txnoffsetcommit", 29: "describeacls",
    30: "createacls", 31: "deleteacls", 32: "describeconfigs", 33: "alterconfigs",
    36: "saslauthenticate", 42: "deletegroups", 60: "describecluster",
}
API_KEYS: dict[str, int] = {name: key for key, name in API_NAMES.items()}
API_KEYS["listoffsets"] = 2  # Kafka's own name for "offsets"

PRODUCE, FETCH, LIST_OFFSETS, METADATA = 0, 1, 2, 3
OFFSET_COMMIT, OFFSET_FETCH, FIND_COORDINATOR, JOIN_GROUP = 8, 9, 10, 11
HEARTBEAT, LEAVE_GROUP, SYNC_GROUP, API_VERSIONS = 12, 13, 14, 18
CREATE_TOPICS, DELETE_TOPICS, INIT_PRODUCER_ID = 19, 20, 22

# First flexible version (compact encodings, tagged fields, request header v2).
FLEXIBLE_FROM: dict[int, int] = {
    0: 9, 1: 12, 2: 6, 3: 9, 8: 8, 9: 6, 10: 3, 11: 6, 12: 4, 13: 4, 14: 4,
    15: 5, 16: 3, 18: 3, 19: 5, 20: 4, 22: 2, 25: 3, 26: 3, 36: 2, 42: 2, 60: 0,
}
NEVER_FLEXIBLE = frozenset({17})  # SaslHandshake

# APIs whose bodies name topics: highest version whose layout we parse.
TOPIC_APIS_MAX: dict[int, int] = {
    PRODUCE: 12, FETCH: 12, LIST_OFFSETS: 11, METADATA: 13,
    OFFSET_COMMIT: 9, OFFSET_FETCH: 9, CREATE_TOPICS: 7, DELETE_TOPICS: 6,
}
# APIs that name no topic: decided on the header alone.
TOPICLESS_APIS = frozenset({10, 11, 12, 13, 14, 15, 16, 17, 18, 22, 25, 26, 36, 42, 60})
# Consumer-group APIs: refusing the API itself is a group authorization error.
GROUP_APIS = frozenset({OFFSET_COMMIT, OFFSET_FETCH, FIND_COORDINATOR, JOIN_GROUP,
                        HEARTBEAT, LEAVE_GROUP, SYNC_GROUP, 15, 16, 42})

DEFAULT_MAX_FRAME = 100 * 1024 * 1024


def api_name(api_key: int) -> str:
    return API_NAMES.get(api_key, str(api_key))


def is_flexible(api_key: int, api_version: int) -> bool:
    first = FLEXIBLE_FROM.get(api_key)
    return first is not None and api_version >= first


TopicPartitions = tuple[str, tuple[int, ...]]


@dataclass(frozen=True, slots=True)
class KafkaRequest:
    """One parsed request frame (without its 4-byte size prefix).

    ``topics`` lists (topic, partitions) in request order; ``all_topics`` is
    set when the request means "every topic" (Metadata/OffsetFetch null
    array), which we treat like a topic-less request. ``error`` is set when
    the header parsed but the body did not (or is a layout we don't parse):
    such a request is always refused.
    """

    api_key: int
    api_version: int
    correlation_id: int
    client_id: str | None
    topics: tuple[TopicPartitions, ...] = ()
    all_topics: bool = False
    expects_response: bool = True
    groups: tuple[tuple[str, tuple[TopicPartitions, ...] | None], ...] = ()
    keys: tuple[str, ...] = ()  # FindCoordinator v4+ coordinator keys
    allow_auto_create: bool = True  # Metadata v4+ AllowAutoTopicCreation
    body_offset: int = 0
    error: str | None = None

    @property
    def api_name(self) -> str:
        return api_name(self.api_key)

    @property
    def flexible(self) -> bool:
        return is_flexible(self.api_key, self.api_version)

    @property
    def topic_names(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for name, _ in self.topics:
            seen.setdefault(name, None)
        return tuple(seen)

    @property
    def known(self) -> bool:
        return self.api_key in TOPIC_APIS_MAX or self.api_key in TOPICLESS_APIS


def parse_request(frame: bytes | memoryview) -> KafkaRequest:
    """Parse a request frame (size prefix stripped).

    Raises KafkaDecodeError when not even the header can be read; otherwise
    returns a request whose ``error`` says why the body was not understood.
    """
    r = Reader(frame)
    api_key = r.int16()
    api_version = r.int16()
    correlation_id = r.int32()
    if api_version < 0:
        raise KafkaDecodeError(f"negative api version {api_version}")
    client_id = r.string(flexible=False, nullable=True)  # never compact, even in header v2
    flexible = is_flexible(api_key, api_version)
    head = KafkaRequest(api_key, api_version, correlation_id, client_id)
    try:
        r.tagged_fields(flexible)
    except KafkaDecodeError as exc:
        return replace(head, body_offset=r.pos, error=f"bad header: {exc}")
    head = replace(head, body_offset=r.pos)
    if api_key in TOPICLESS_APIS:
        if api_key == FIND_COORDINATOR:
            try:
                return replace(head, keys=_find_coordinator(r, api_version, flexible))
            except KafkaDecodeError as exc:
                return replace(head, error=str(exc))
        return head
    max_version = TOPIC_APIS_MAX.get(api_key)
    if max_version is None:
        return replace(head, error=f"unsupported api key {api_name(api_key)}")
    if api_version > max_version:
        return replace(head, error=f"unsupported {api_name(api_key)} version {api_version}")
    try:
        body = _BODY[api_key](r, api_version, flexible)
        r.expect_end()
    except KafkaDecodeError as exc:
        return replace(head, error=str(exc))
    return replace(head, topics=body.topics, all_topics=body.all_topics,
                   expects_response=body.expects_response, groups=body.groups,
                   allow_auto_create=body.allow_auto_create)


@dataclass(frozen=True, slots=True)
class _Body:
    topics: tuple[TopicPartitions, ...] = ()
    all_topics: bool = False
    expects_response: bool = True
    groups: tuple[tuple[str, tuple[TopicPartitions, ...] | None], ...] = ()
    allow_auto_create: bool = True


# ---------------------------------------------------------------- bodies

def _int32_array(r: Reader, f: bool) -> tuple[int, ...]:
    n = r.array_len(f, min_item=4) or 0
    return tuple(r.int32() for _ in range(n))


def _produce(r: Reader, v: int, f: bool) -> _Body:
    if v >= 3:
        r.string(f, nullable=True)  # transactional id
    acks = r.int16()
    r.int32()  # timeout
    topics = []
    for _ in range(r.array_len(f, min_item=3) or 0):
        name = r.req_string(f)
        parts = []
        for _ in range(r.array_len(f, min_item=5) or 0):
            parts.append(r.int32())
            r.skip_bytes(f, nullable=True)  # records
            r.tagged_fields(f)
        r.tagged_fields(f)
        topics.append((name, tuple(parts)))
    r.tagged_fields(f)
    return _Body(tuple(topics), expects_response=acks != 0)


def _fetch(r: Reader, v: int, f: bool) -> _Body:
    r.int32()  # replica id
    r.int32()  # max wait
    r.int32()  # min bytes
    if v >= 3:
        r.int32()  # max bytes
    if v >= 4:
        r.int8()  # isolation level
    if v >= 7:
        r.int32()  # session id
        r.int32()  # session epoch
    topics = []
    for _ in range(r.array_len(f, min_item=3) or 0):
        name = r.req_string(f)
        parts = []
        for _ in range(r.array_len(f, min_item=16) or 0):
            parts.append(r.int32())
            if v >= 9:
                r.int32()  # current leader epoch
            r.int64()  # fetch offset
            if v >= 12:
                r.int32()  # last fetched epoch
            if v >= 5:
                r.int64()  # log start offset
            r.int32()  # partition max bytes
            r.tagged_fields(f)
        r.tagged_fields(f)
        topics.append((name, tuple(parts)))
    if v >= 7:
        # Forgotten topics only shrink the fetch session: they read nothing,
        # so they are not part of the policy decision.
        for _ in range(r.array_len(f, min_item=3) or 0):
            r.req_string(f)
            _int32_array(r, f)
            r.tagged_fields(f)
    if v >= 11:
        r.string(f)  # rack id
    r.tagged_fields(f)
    return _Body(tuple(topics))


def _list_offsets(r: Reader, v: int, f: bool) -> _Body:
    r.int32()  # replica id
    if v >= 2:
        r.int8()  # isolation level
    topics = []
    for _ in range(r.array_len(f, min_item=3) or 0):
        name = r.req_string(f)
        parts = []
        for _ in range(r.array_len(f, min_item=12) or 0):
            parts.append(r.int32())
            if v >= 4:
                r.int32()  # current leader epoch
            r.int64()  # timestamp
            if v == 0:
                r.int32()  # max num offsets
            r.tagged_fields(f)
        r.tagged_fields(f)
        topics.append((name, tuple(parts)))
    if v >= 10:
        r.int32()  # timeout
    r.tagged_fields(f)
    return _Body(tuple(topics))


def _metadata(r: Reader, v: int, f: bool) -> _Body:
    n = r.array_len(f, nullable=v >= 1)
    topics = []
    for _ in range(n or 0):
        if v >= 10:
            r.uuid()
        name = r.string(f, nullable=v >= 10)
        if name is None:
            raise KafkaDecodeError("metadata topic given by id only")
        r.tagged_fields(f)
        topics.append((name, ()))
    auto_create = r.boolean() if v >= 4 else True
    if 8 <= v <= 10:
        r.boolean()  # include cluster authorized operations
    if v >= 8:
        r.boolean()  # include topic authorized operations
    r.tagged_fields(f)
    # v0: an empty array means every topic; v1+: null means every topic.
    return _Body(tuple(topics), all_topics=n is None or (v == 0 and n == 0),
                 allow_auto_create=auto_create)


def _offset_commit(r: Reader, v: int, f: bool) -> _Body:
    r.req_string(f)  # group id
    if v >= 1:
        r.int32()  # generation id
        r.req_string(f)  # member id
    if v >= 7:
        r.string(f, nullable=True)  # group instance id
    if 2 <= v <= 4:
        r.int64()  # retention time
    topics = []
    for _ in range(r.array_len(f, min_item=3) or 0):
        name = r.req_string(f)
        parts = []
        for _ in range(r.array_len(f, min_item=13) or 0):
            parts.append(r.int32())
            r.int64()  # committed offset
            if v >= 6:
                r.int32()  # leader epoch
            if v == 1:
                r.int64()  # commit timestamp
            r.string(f, nullable=True)  # metadata
            r.tagged_fields(f)
        r.tagged_fields(f)
        topics.append((name, tuple(parts)))
    r.tagged_fields(f)
    return _Body(tuple(topics))


def _offset_fetch_topics(r: Reader, f: bool, nullable: bool) -> tuple[TopicPartitions, ...] | None:
    n = r.array_len(f, nullable=nullable, min_item=3)
    if n is None:
        return None
    topics = []
    for _ in range(n):
        name = r.req_string(f)
        topics.append((name, _int32_array(r, f)))
        r.tagged_fields(f)
    return tuple(topics)


def _offset_fetch(r: Reader, v: int, f: bool) -> _Body:
    groups: list[tuple[str, tuple[TopicPartitions, ...] | None]] = []
    if v <= 7:
        group = r.req_string(f)
        groups.append((group, _offset_fetch_topics(r, f, nullable=v >= 2)))
        if v >= 7:
            r.boolean()  # require stable
    else:
        for _ in range(r.array_len(f, min_item=3) or 0):
            group = r.req_string(f)
            if v >= 9:
                r.string(f, nullable=True)  # member id
                r.int32()  # member epoch
            groups.append((group, _offset_fetch_topics(r, f, nullable=True)))
            r.tagged_fields(f)
        r.boolean()  # require stable
    r.tagged_fields(f)
    topics = tuple(tp for _, ts in groups for tp in (ts or ()))
    return _Body(topics, groups=tuple(groups), all_topics=any(ts is None for _, ts in groups))


def _create_topics(r: Reader, v: int, f: bool) -> _Body:
    topics = []
    for _ in range(r.array_len(f, min_item=9) or 0):
        name = r.req_string(f)
        r.int32()  # num partitions
        r.int16()  # replication factor
        for _ in range(r.array_len(f, min_item=5) or 0):
            r.int32()
            _int32_array(r, f)
            r.tagged_fields(f)
        for _ in range(r.array_len(f, min_item=2) or 0):
            r.req_string(f)
            r.string(f, nullable=True)
            r.tagged_fields(f)
        r.tagged_fields(f)
        topics.append((name, ()))
    r.int32()  # timeout
    if v >= 1:
        r.boolean()  # validate only
    r.tagged_fields(f)
    return _Body(tuple(topics))


def _delete_topics(r: Reader, v: int, f: bool) -> _Body:
    topics = []
    if v >= 6:
        for _ in range(r.array_len(f, min_item=17) or 0):
            name = r.string(f, nullable=True)
            r.uuid()
            r.tagged_fields(f)
            if name is None:
                raise KafkaDecodeError("delete by topic id only")
            topics.append((name, ()))
    else:
        for _ in range(r.array_len(f, min_item=1) or 0):
            topics.append((r.req_string(f), ()))
    r.int32()  # timeout
    r.tagged_fields(f)
    return _Body(tuple(topics))


def _find_coordinator(r: Reader, v: int, f: bool) -> tuple[str, ...]:
    keys: tuple[str, ...]
    if v <= 3:
        keys = (r.req_string(f),)
        if v >= 1:
            r.int8()
    else:
        r.int8()
        keys = tuple(r.req_string(f) for _ in range(r.array_len(f) or 0))
    r.tagged_fields(f)
    r.expect_end()
    return keys


_BODY: dict[int, Callable[[Reader, int, bool], _Body]] = {
    PRODUCE: _produce, FETCH: _fetch, LIST_OFFSETS: _list_offsets, METADATA: _metadata,
    OFFSET_COMMIT: _offset_commit, OFFSET_FETCH: _offset_fetch,
    CREATE_TOPICS: _create_topics, DELETE_TOPICS: _delete_topics,
}
