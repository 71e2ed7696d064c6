"""axoneme kafka L7: wire-protocol parser, rule matcher and proxy."""

from axoneme.l7.kafka._codec import KafkaDecodeError
from axoneme.l7.kafka._matcher import ROLE_KEYS, match_fields, match_request, request_from_trace
from axoneme.l7.kafka._parser import KafkaParser
from axoneme.l7.kafka._protocol import API_KEYS, API_NAMES, KafkaRequest, parse_request
from axoneme.l7.kafka._proxy import (
    ConnInfo,
    FrameError,
    KafkaProxy,
    StandaloneKafkaProxy,
    handle,
    kafka_flow,
    read_frame,
)
from axoneme.l7.kafka._responses import (
    CLUSTER_AUTHORIZATION_FAILED,
    GROUP_AUTHORIZATION_FAILED,
    TOPIC_AUTHORIZATION_FAILED,
    deny_response,
)
from axoneme.l7.kafka._rules import KafkaRule

__all__ = ["KafkaRule",
    "API_KEYS", "API_NAMES", "CLUSTER_AUTHORIZATION_FAILED", "GROUP_AUTHORIZATION_FAILED",
    "ROLE_KEYS", "TOPIC_AUTHORIZATION_FAILED", "ConnInfo", "FrameError", "KafkaDecodeError",
    "KafkaParser", "KafkaProxy", "KafkaRequest", "StandaloneKafkaProxy", "deny_response",
    "handle", "kafka_flow", "match_fields", "match_request", "parse_request", "read_frame",
    "request_from_trace",
]
