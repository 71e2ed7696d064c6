"""Responses the proxy writes itself, and the two upstream responses it edits.

A refused request gets a well-formed response of its API and version with
the same correlation id and an authorization error, so the client reports
an error instead of waiting for a reply that never comes. Layouts follow
Kafka's *Response.json message definitions.
"""

from __future__ import annotations

import struct
from collections.abc import Collection, Sequence

from axoneme.l7.kafka._codec import Reader, Writer, uvarint
from axoneme.l7.kafka._protocol import (
    API_VERSIONS,
    CREATE_TOPICS,
    DELETE_TOPICS,
    FETCH,
    FIND_COORDINATOR,
    HEARTBEAT,
    INIT_PRODUCER_ID,
    JOIN_GROUP,
    LEAVE_GROUP,
    LIST_OFFSETS,
    METADATA,
    OFFSET_COMMIT,
    OFFSET_FETCH,
    PRODUCE,
    SYNC_GROUP,
    TOPIC_APIS_MAX,
    KafkaRequest,
    TopicPartitions,
)

TOPIC_AUTHORIZATION_FAILED = 29
GROUP_AUTHORIZATION_FAILED = 30
CLUSTER_AUTHORIZATION_FAILED = 31

# Highest version for which deny_response() can encode a response.
RESPONSE_MAX: dict[int, int] = {
    PRODUCE: 12, FETCH: 12, LIST_OFFSETS: 11, METADATA: 13, OFFSET_COMMIT: 9,
    OFFSET_FETCH: 9, FIND_COORDINATOR: 6, JOIN_GROUP: 9, HEARTBEAT: 4,
    LEAVE_GROUP: 5, SYNC_GROUP: 5, API_VERSIONS: 4, CREATE_TOPICS: 7,
    DELETE_TOPICS: 6, INIT_PRODUCER_ID: 5,
}

_NO_OPS = -2147483648  # "authorized operations not requested"


def frame(payload: bytes) -> bytes:
    return struct.pack(">i", len(payload)) + payload


def _header(req: KafkaRequest) -> Writer:
    # ApiVersions responses always use header v0 so that a client can read
    # them before it knows which versions the broker speaks.
    flexible = req.flexible
    w = Writer(flexible)
    w.int32(req.correlation_id)
    if flexible and req.api_key != API_VERSIONS:
        w.tags()
    return w


def _partition_topics(w: Writer, topics: tuple[TopicPartitions, ...], each) -> None:  # type: ignore[no-untyped-def]
    w.array(len(topics))
    for name, parts in topics:
        w.string(name)
        w.array(len(parts))
        for p in parts:
            each(w, p)
            w.tags()
        w.tags()


def deny_response(req: KafkaRequest, topic_error: int, api_error: int) -> bytes | None:
    """The framed response refusing ``req``, or None when we cannot encode one.

    ``topic_error`` goes on every topic/partition entry, ``api_error`` on
    request-level error fields (group/cluster authorization).
    """
    v = req.api_version
    k = req.api_key
    if v > RESPONSE_MAX.get(k, -1):
        return None
    w = _header(req)
    if k == PRODUCE:
        def produce_part(w: Writer, p: int) -> None:
            w.int32(p).int16(topic_error).int64(-1)
            if v >= 2:
                w.int64(-1)  # log append time
            if v >= 5:
                w.int64(-1)  # log start offset
            if v >= 8:
                w.array(0).string(None)  # record errors, error message
        _partition_topics(w, req.topics, produce_part)
        if v >= 1:
            w.int32(0)
    elif k == FETCH:
        if v >= 1:
            w.int32(0)
        if v >= 7:
            w.int16(0).int32(0)  # error code, session id (no session)

        def fetch_part(w: Writer, p: int) -> None:
            w.int32(p).int16(topic_error).int64(-1)
            if v >= 4:
                w.int64(-1)  # last stable offset
            if v >= 5:
                w.int64(-1)  # log start offset
            if v >= 4:
                w.array(0)  # aborted transactions
            if v >= 11:
                w.int32(-1)  # preferred read replica
            w.bytes_(b"")  # records
        _partition_topics(w, req.topics, fetch_part)
    elif k == LIST_OFFSETS:
        if v >= 2:
            w.int32(0)

        def offsets_part(w: Writer, p: int) -> None:
            w.int32(p).int16(topic_error)
            if v == 0:
                w.array(0)
            else:
                w.int64(-1).int64(-1)
            if v >= 4:
                w.int32(-1)
        _partition_topics(w, req.topics, offsets_part)
    elif k == METADATA:
        if v >= 3:
            w.int32(0)
        w.array(0)  # no brokers known
        if v >= 2:
            w.string(None)  # cluster id
        if v >= 1:
            w.int32(-1)  # controller id
        _metadata_topics(w, v, req.topic_names, topic_error)
        if 8 <= v <= 10:
            w.int32(_NO_OPS)
        if v >= 13:
            w.int16(0 if req.topics else api_error)
    elif k == OFFSET_COMMIT:
        if v >= 3:
            w.int32(0)
        _partition_topics(w, req.topics, lambda w, p: w.int32(p).int16(topic_error))
    elif k == OFFSET_FETCH:
        if v >= 3:
            w.int32(0)

        def fetch_offset_part(w: Writer, p: int) -> None:
            w.int32(p).int64(-1)
            if v >= 5:
                w.int32(-1)
            w.string("").int16(topic_error)
        if v <= 7:
            group_topics = req.groups[0][1] if req.groups else ()
            _partition_topics(w, group_topics or (), fetch_offset_part)
            if v >= 2:
                w.int16(api_error)
        else:
            w.array(len(req.groups))
            for group, topics in req.groups:
                w.string(group)
                _partition_topics(w, topics or (), fetch_offset_part)
                w.int16(api_error)
                w.tags()
    elif k == FIND_COORDINATOR:
        if v >= 1:
            w.int32(0)
        if v <= 3:
            w.int16(api_error)
            if v >= 1:
                w.string("authorization failed")
            w.int32(-1).string("").int32(-1)
        else:
            w.array(len(req.keys))
            for key in req.keys:
                w.string(key).int32(-1).string("").int32(-1)
                w.int16(api_error).string("authorization failed")
                w.tags()
    elif k == JOIN_GROUP:
        if v >= 2:
            w.int32(0)
        w.int16(api_error).int32(-1)
        if v >= 7:
            w.string(None)  # protocol type
        w.string(None if v >= 7 else "")  # protocol name
        w.string("")  # leader
        if v >= 9:
            w.boolean(False)
        w.string("")  # member id
        w.array(0)
    elif k == SYNC_GROUP:
        if v >= 1:
            w.int32(0)
        w.int16(api_error)
        if v >= 5:
            w.string(None).string(None)
        w.bytes_(b"")
    elif k == HEARTBEAT:
        if v >= 1:
            w.int32(0)
        w.int16(api_error)
    elif k == LEAVE_GROUP:
        if v >= 1:
            w.int32(0)
        w.int16(api_error)
        if v >= 3:
            w.array(0)
    elif k == API_VERSIONS:
        # Clients read an ApiVersions error response as version 0 whatever
        # version they asked for (and it has no header tags).
        return frame(Writer(False).int32(req.correlation_id).int16(api_error).int32(0)
                     .getvalue())
    elif k == CREATE_TOPICS:
        if v >= 2:
            w.int32(0)
        names = req.topic_names
        w.array(len(names))
        for name in names:
            w.string(name)
            if v >= 7:
                w.uuid()
            w.int16(topic_error)
            if v >= 1:
                w.string("authorization failed")
            if v >= 5:
                w.int32(-1).int16(-1).array(None)
            w.tags()
    elif k == DELETE_TOPICS:
        if v >= 1:
            w.int32(0)
        names = req.topic_names
        w.array(len(names))
        for name in names:
            w.string(name)
            if v >= 6:
                w.uuid()
            w.int16(topic_error)
            if v >= 5:
                w.string("authorization failed")
            w.tags()
    elif k == INIT_PRODUCER_ID:
        w.int32(0).int16(api_error).int64(-1).int16(-1)
    else:  # pragma: no cover - RESPONSE_MAX guards this
        return None
    w.tags()
    return frame(w.getvalue())


def _metadata_topics(w: Writer, v: int, names: Sequence[str], error: int) -> None:
    w.array(len(names))
    _metadata_entries(w, v, names, error)


def _metadata_entries(w: Writer, v: int, names: Sequence[str], error: int) -> None:
    for name in names:
        w.int16(error).string(name)
        if v >= 10:
            w.uuid()
        if v >= 1:
            w.boolean(False)  # is internal
        w.array(0)  # partitions
        if v >= 8:
            w.int32(_NO_OPS)
        w.tags()


# ------------------------------------------------------- upstream rewrites

def metadata_request_for(req: KafkaRequest, topics: Sequence[str]) -> bytes | None:
    """The framed Metadata request of the same version asking only ``topics``.

    Used when a Metadata request names refused topics: the broker is asked
    about the allowed ones only (clients ignore a metadata response without
    brokers and would retry until timeout instead of surfacing the
    authorization error), and the refused topics are added to the response
    with their error by :func:`metadata_rewrite`.
    """
    v = req.api_version
    if req.api_key != METADATA or (v == 0 and not topics):
        return None  # v0 cannot ask for no topic (empty = all)
    hdr = Writer(False)
    hdr.int16(req.api_key).int16(v).int32(req.correlation_id).string(req.client_id)
    w = Writer(req.flexible)
    if req.flexible:
        w.tags()  # request header v2 tagged fields
    w.array(len(topics))
    for name in topics:
        if v >= 10:
            w.uuid()
        w.string(name)
        w.tags()
    if v >= 4:
        w.boolean(req.allow_auto_create)
    if 8 <= v <= 10:
        w.boolean(False)
    if v >= 8:
        w.boolean(False)
    w.tags()
    return frame(hdr.getvalue() + w.getvalue())


def metadata_rewrite(req: KafkaRequest, response: bytes, keep: Collection[str],
                     denied: Sequence[str], error: int) -> bytes:
    """Keep only ``keep`` topics of a Metadata response and add ``denied`` ones.

    ``response`` is the unframed upstream response to
    :func:`metadata_request_for`; topics the broker volunteers beyond those
    asked for are dropped. Returns the framed response. Raises
    KafkaDecodeError if the response does not parse.
    """
    v = req.api_version
    f = req.flexible
    r = Reader(response)
    r.int32()  # correlation id
    r.tagged_fields(f)
    if v >= 3:
        r.int32()
    for _ in range(r.array_len(f, min_item=3) or 0):
        r.int32()
        r.req_string(f)
        r.int32()
        if v >= 1:
            r.string(f, nullable=True)
        r.tagged_fields(f)
    if v >= 2:
        r.string(f, nullable=True)
    if v >= 1:
        r.int32()
    start = r.pos
    kept: list[bytes] = []
    for _ in range(r.array_len(f, min_item=3) or 0):
        entry = r.pos
        r.int16()
        name = r.string(f, nullable=v >= 12)
        if v >= 10:
            r.uuid()
        if v >= 1:
            r.boolean()
        for _ in range(r.array_len(f, min_item=10) or 0):
            r.int16()
            r.int32()
            r.int32()
            if v >= 7:
                r.int32()
            for _ in range(r.array_len(f, min_item=4) or 0):
                r.int32()
            for _ in range(r.array_len(f, min_item=4) or 0):
                r.int32()
            if v >= 5:
                for _ in range(r.array_len(f, min_item=4) or 0):
                    r.int32()
            r.tagged_fields(f)
        if v >= 8:
            r.int32()
        r.tagged_fields(f)
        if name is not None and name in keep:
            kept.append(bytes(response[entry:r.pos]))
    end = r.pos
    w = Writer(f)
    w.array(len(kept) + len(denied))
    for entry_bytes in kept:
        w.raw(entry_bytes)
    _metadata_entries(w, v, denied, error)
    return frame(bytes(response[:start]) + w.getvalue() + bytes(response[end:]))


def clamp_api_versions(req: KafkaRequest, response: bytearray) -> None:
    """Lower advertised max versions, in place, to those we can parse.

    Without this a client would pick e.g. Fetch v13+, which names topics by
    id, and every such request would be refused. Same byte layout, so the
    frame is patched in place. ``response`` is unframed.
    """
    f = req.flexible
    r = Reader(response)
    r.int32()  # correlation id (header v0 always)
    if r.int16() != 0:
        return  # error responses (e.g. UNSUPPORTED_VERSION) use the v0 body
    n = r.array_len(f, min_item=6) or 0
    for _ in range(n):
        key = r.int16()
        min_v = r.int16()
        max_pos = r.pos
        max_v = r.int16()
        cap = TOPIC_APIS_MAX.get(key)
        if cap is not None and max_v > cap:
            struct.pack_into(">h", response, max_pos, max(cap, min_v))
        r.tagged_fields(f)


__all__ = [
    "CLUSTER_AUTHORIZATION_FAILED", "GROUP_AUTHORIZATION_FAILED", "TOPIC_AUTHORIZATION_FAILED",
    "clamp_api_versions", "deny_response", "frame", "metadata_request_for",
    "metadata_rewrite", "uvarint",
]
