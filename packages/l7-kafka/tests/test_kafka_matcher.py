"""Rule matching: roles, apiKey, apiVersion, clientID, topics (all must match), trace."""

from __future__ import annotations

import pytest
from axoneme.core.l7 import L7Request
from axoneme.core.plugins import load_class
from axoneme.l7.kafka import KafkaParser, KafkaRequest, KafkaRule, match_request, parse_request
from axoneme.l7.kafka._matcher import ROLE_KEYS, allowed_topics
from kafka_frames import request_frame

P = KafkaParser()


def wire(api_key: int, topics: list[str], version: int | None = None,
         client_id: str | None = "cid") -> KafkaRequest:
    v = version if version is not None else {0: 9, 1: 12, 2: 7, 3: 12, 8: 8, 9: 8,
                                             19: 5, 20: 4}.get(api_key, 3)
    return parse_request(request_frame(api_key, v, [(t, [0]) for t in topics],
                                       client_id=client_id)[4:])


def allowed(rules: list[KafkaRule], req: KafkaRequest) -> bool:
    v1 = match_request(rules, req).allowed
    v2 = P.match(rules, L7Request({"request": req})).allowed
    assert v1 == v2
    return v1


def test_no_rules_allow_everything_known() -> None:
    assert allowed([], wire(0, ["a"]))
    assert allowed([], wire(12, []))


def test_cilium_role_expansion_exact() -> None:
    assert ROLE_KEYS["produce"] == {0, 3, 18}
    assert ROLE_KEYS["consume"] == {1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 18}


@pytest.mark.parametrize(("api_key", "topics"), [
    (0, ["t"]), (3, ["t"]), (18, []),
])
def test_produce_role_allows_its_keys(api_key: int, topics: list[str]) -> None:
    assert allowed([KafkaRule(role="produce", topic="t")], wire(api_key, topics))


@pytest.mark.parametrize(("api_key", "topics"), [
    (1, ["t"]), (2, ["t"]), (8, ["t"]), (9, ["t"]), (10, []), (11, []), (12, []), (13, []),
    (14, []), (19, ["t"]), (20, ["t"]),
])
def test_produce_role_refuses_other_keys(api_key: int, topics: list[str]) -> None:
    assert not allowed([KafkaRule(role="produce", topic="t")], wire(api_key, topics))


@pytest.mark.parametrize(("api_key", "topics"), [
    (1, ["t"]), (2, ["t"]), (3, ["t"]), (8, ["t"]), (9, ["t"]), (10, []), (11, []), (12, []),
    (13, []), (14, []), (18, []),
])
def test_consume_role(api_key: int, topics: list[str]) -> None:
    rules = [KafkaRule(role="consume", topic="t")]
    assert allowed(rules, wire(api_key, topics))
    assert not allowed(rules, wire(0, ["t"]))
    if topics:
        assert not allowed(rules, wire(api_key, ["other"]))


def test_role_is_case_insensitive() -> None:
    assert allowed([KafkaRule(role="PRODUCE")], wire(0, ["x"]))


def test_api_key_case_insensitive_and_aliases() -> None:
    assert allowed([KafkaRule(api_key="Produce")], wire(0, ["x"]))
    assert not allowed([KafkaRule(api_key="produce")], wire(1, ["x"]))
    assert allowed([KafkaRule(api_key="offsets")], wire(2, ["x"]))
    assert allowed([KafkaRule(api_key="ListOffsets")], wire(2, ["x"]))
    assert allowed([KafkaRule(api_key="createtopics", topic="x")], wire(19, ["x"]))
    assert not allowed([KafkaRule(api_key="bogus")], wire(0, ["x"]))


def test_api_version_exact() -> None:
    rules = [KafkaRule(api_key="produce", api_version="9")]
    assert allowed(rules, wire(0, ["x"], version=9))
    assert not allowed(rules, wire(0, ["x"], version=8))
    assert allowed([KafkaRule(api_key="produce", api_version="09")], wire(0, ["x"], version=9))


def test_client_id_exact() -> None:
    rules = [KafkaRule(client_id="svc-a")]
    assert allowed(rules, wire(0, ["x"], client_id="svc-a"))
    assert not allowed(rules, wire(0, ["x"], client_id="svc-ab"))
    assert not allowed(rules, wire(0, ["x"], client_id=None))


def test_every_topic_must_be_allowed() -> None:
    rules = [KafkaRule(role="produce", topic="a"), KafkaRule(role="produce", topic="b")]
    assert allowed(rules, wire(0, ["a", "b"]))
    assert allowed(rules, wire(0, ["b"]))
    assert not allowed(rules, wire(0, ["a", "b", "c"]))
    v = match_request(rules, wire(0, ["a", "c"]))
    assert not v.allowed and "'c'" in v.reason
    assert allowed_topics(rules, wire(3, ["a", "c", "b"])) == ("a", "b")


def test_topics_allowed_by_different_rule_kinds() -> None:
    # Each topic may be allowed by a different rule, as long as each rule matches the key.
    rules = [KafkaRule(api_key="produce", topic="a"), KafkaRule(role="produce", topic="b"),
             KafkaRule(api_key="fetch", topic="c")]
    assert allowed(rules, wire(0, ["a", "b"]))
    assert not allowed(rules, wire(0, ["a", "c"]))


def test_topicless_requests_ignore_topic_constraint() -> None:
    rules = [KafkaRule(role="consume", topic="only")]
    assert allowed(rules, wire(12, []))  # heartbeat
    assert allowed(rules, wire(18, []))  # apiversions
    # Metadata for "all topics" is topic-less, like Cilium.
    from axoneme.l7.kafka._protocol import METADATA
    all_req = KafkaRequest(METADATA, 12, 1, "c", all_topics=True)
    assert allowed(rules, all_req)


def test_unparsable_and_unknown_are_refused_even_with_no_rules() -> None:
    bad = KafkaRequest(0, 9, 1, "c", error="truncated")
    assert not allowed([], bad)
    assert not allowed([KafkaRule()], bad)
    unknown = KafkaRequest(32, 0, 1, "c")  # DescribeConfigs: topics we don't read
    assert not allowed([], unknown)


def test_empty_rule_allows_everything() -> None:
    assert allowed([KafkaRule()], wire(20, ["anything"]))


# --------------------------------------------------------------- policy trace

def trace(rules: list[KafkaRule], **opts: str) -> bool:
    return P.match(rules, P.request_from_trace(opts)).allowed


def test_trace_role_topic() -> None:
    rules = [KafkaRule(role="produce", topic="a")]
    assert trace(rules, kafka_role="produce", kafka_topic="a")
    assert not trace(rules, kafka_role="produce", kafka_topic="b")
    assert not trace(rules, kafka_role="consume", kafka_topic="a")


def test_trace_role_needs_every_key_of_the_role() -> None:
    # Only Produce allowed by key: the produce role also needs Metadata + ApiVersions.
    rules = [KafkaRule(api_key="produce", topic="a")]
    assert not trace(rules, kafka_role="produce", kafka_topic="a")
    assert trace(rules, kafka_api_key="produce", kafka_topic="a")
    assert trace(rules, kafka_api_key="Produce", kafka_topic="a")


def test_trace_api_key_and_topicless_keys() -> None:
    rules = [KafkaRule(role="consume", topic="a")]
    assert trace(rules, kafka_api_key="heartbeat", kafka_topic="zzz")  # topic-less API
    assert trace(rules, kafka_api_key="fetch", kafka_topic="a")
    assert not trace(rules, kafka_api_key="fetch", kafka_topic="b")
    assert not trace(rules, kafka_api_key="createtopics", kafka_topic="a")


def test_trace_without_key_is_refused_with_reason() -> None:
    v = P.match([], P.request_from_trace({"kafka_topic": "a"}))
    assert not v.allowed and "api key" in v.reason
    v = P.match([], P.request_from_trace({"kafka_role": "admin"}))
    assert not v.allowed


def test_trace_reports_matching_rule_index() -> None:
    rules = [KafkaRule(role="consume", topic="x"), KafkaRule(role="produce", topic="a")]
    v = P.match(rules, P.request_from_trace({"kafka_role": "produce", "kafka_topic": "a"}))
    assert v.allowed and v.rule == 1


def test_entry_point_loads_parser() -> None:
    parser = load_class("axoneme.l7", "kafka")()
    assert parser.name == "kafka"
    assert parser.match([KafkaRule(role="produce", topic="a")],
                        parser.request_from_trace({"kafka_role": "produce",
                                                   "kafka_topic": "a"})).allowed
