"""Kafka rule matching, shared by the proxy and ``axoneme policy trace``.

Semantics (Cilium pkg/policy/api/kafka): a rule's ``role`` expands to a set
of API keys (exclusive with ``apiKey``, a case-insensitive API name);
``apiVersion`` is an exact version, ``clientID`` an exact client id,
``topic`` an exact topic name. Empty fields match anything; no rules at all
allow everything. A request naming topics is allowed only if EVERY topic is
allowed by some rule whose other fields match; a topic-less request (or one
asking for "all topics") is allowed if some rule matches it ignoring topic.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from axoneme.core.l7 import L7Request, L7Verdict
from axoneme.l7.kafka._protocol import (
    API_KEYS,
    API_NAMES,
    API_VERSIONS,
    FETCH,
    FIND_COORDINATOR,
    HEARTBEAT,
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
)
from axoneme.l7.kafka._rules import KafkaRule

# Cilium's role expansion (PortRule.GetAPIKeys), verbatim sets.
ROLE_KEYS: dict[str, frozenset[int]] = {
    "produce": frozenset({PRODUCE, METADATA, API_VERSIONS}),
    "consume": frozenset({FETCH, LIST_OFFSETS, METADATA, OFFSET_COMMIT, OFFSET_FETCH,
                          FIND_COORDINATOR, JOIN_GROUP, HEARTBEAT, LEAVE_GROUP,
                          SYNC_GROUP, API_VERSIONS}),
}


def rule_api_keys(rule: KafkaRule) -> frozenset[int] | None:
    """The API keys a rule allows, or None for any."""
    if rule.role:
        keys = ROLE_KEYS.get(rule.role.lower())
        return keys if keys is not None else frozenset()
    if rule.api_key:
        key = API_KEYS.get(rule.api_key.lower())
        if key is None and rule.api_key.isdigit():
            key = int(rule.api_key)
        return frozenset() if key is None else frozenset({key})
    return None


@dataclass(frozen=True, slots=True)
class _Req:
    api_key: int
    api_version: int | None
    client_id: str | None
    topics: tuple[str, ...]  # empty = topic-less


def _rule_matches_header(rule: KafkaRule, req: _Req) -> bool:
    keys = rule_api_keys(rule)
    if keys is not None and req.api_key not in keys:
        return False
    if rule.api_version:
        try:
            wanted = int(rule.api_version)
        except ValueError:
            return False  # the parser rejects such rules; never match them
        if req.api_version != wanted:
            return False
    if rule.client_id and rule.client_id != req.client_id:
        return False
    return True


def _decide(rules: Sequence[KafkaRule], req: _Req) -> L7Verdict:
    if not rules:
        return L7Verdict(True, None, "no kafka rules: everything allowed")
    name = API_NAMES.get(req.api_key, str(req.api_key))
    if not req.topics:
        for i, rule in enumerate(rules):
            if _rule_matches_header(rule, req):
                return L7Verdict(True, i, f"{name} allowed by rule {i}")
        return L7Verdict(False, None, f"no rule allows {name}")
    first: int | None = None
    for topic in req.topics:
        for i, rule in enumerate(rules):
            if _rule_matches_header(rule, req) and (not rule.topic or rule.topic == topic):
                if first is None:
                    first = i
                break
        else:
            return L7Verdict(False, None, f"no rule allows {name} on topic {topic!r}")
    return L7Verdict(True, first, f"{name} allowed on every topic")


def match_request(rules: Sequence[KafkaRule], req: KafkaRequest) -> L7Verdict:
    """Decide one parsed wire request."""
    if req.error is not None:
        return L7Verdict(False, None, f"unparsable {req.api_name} request: {req.error}")
    if not req.known:
        return L7Verdict(False, None, f"unsupported api key {req.api_name}")
    topics = () if req.all_topics else req.topic_names
    return _decide(rules, _Req(req.api_key, req.api_version, req.client_id, topics))


def allowed_topics(rules: Sequence[KafkaRule], req: KafkaRequest) -> tuple[str, ...]:
    """The topics of ``req`` that some rule allows (in request order)."""
    out = []
    for topic in req.topic_names:
        probe = _Req(req.api_key, req.api_version, req.client_id, (topic,))
        if _decide(rules, probe).allowed:
            out.append(topic)
    return tuple(out)


def _as_key(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        s = value.strip().lower()
        if s.isdigit():
            return int(s)
        return API_KEYS.get(s)
    return None


def _as_tuple(value: Any) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Iterable):
        return tuple(str(v) for v in value)
    return (str(value),)


def match_fields(rules: Sequence[KafkaRule], fields: dict[str, Any]) -> L7Verdict:
    """Decide an L7Request built by ``request_from_trace`` (or by hand).

    Fields: ``api_keys`` (names or numbers; several = all must be allowed),
    ``api_version``, ``client_id``, ``topics``. A topic applies only to the
    API keys that carry topics (a role's ApiVersions or Heartbeat is checked
    topic-less, as on the wire).
    """
    raw_keys = fields.get("api_keys")
    if raw_keys is None:
        raw_keys = (fields["api_key"],) if fields.get("api_key") is not None else ()
    keys: list[int] = []
    if isinstance(raw_keys, (str, int)):
        raw_keys = (raw_keys,)
    for k in tuple(raw_keys):
        key = _as_key(k)
        if key is None:
            return L7Verdict(False, None, f"unknown kafka api key {k!r}")
        keys.append(key)
    if not keys:
        return L7Verdict(False, None, "no kafka api key given (--kafka-role or --kafka-api-key)")
    version = fields.get("api_version")
    version = int(version) if version not in (None, "") else None
    client_id = fields.get("client_id")
    topics = _as_tuple(fields.get("topics", fields.get("topic")))
    first: int | None = None
    for key in keys:
        verdict = _decide(rules, _Req(key, version, client_id,
                                      topics if key in TOPIC_APIS_MAX else ()))
        if not verdict.allowed:
            return verdict
        if first is None:
            first = verdict.rule
    names = ", ".join(API_NAMES.get(k, str(k)) for k in keys)
    return L7Verdict(True, first, f"allowed: {names}")


def request_from_trace(options: dict[str, Any]) -> L7Request:
    """Map ``policy trace`` flags (kafka_role, kafka_topic, kafka_api_key, ...)."""
    role = options.get("kafka_role")
    api_key = options.get("kafka_api_key")
    keys: tuple[Any, ...] = ()
    if role:
        role_keys = ROLE_KEYS.get(str(role).lower())
        if role_keys is None:
            keys = (str(role),)  # unknown: match_fields refuses it with a reason
        else:
            keys = tuple(sorted(role_keys))
    if api_key not in (None, ""):
        keys = keys + (api_key,)
    fields: dict[str, Any] = {"api_keys": keys,
                              "topics": _as_tuple(options.get("kafka_topic"))}
    if options.get("kafka_api_version") not in (None, ""):
        fields["api_version"] = options["kafka_api_version"]
    if options.get("kafka_client_id") not in (None, ""):
        fields["client_id"] = options["kafka_client_id"]
    return L7Request(fields)
