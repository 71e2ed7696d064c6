"""The ``kafka`` L7 parser plugin: matcher, trace mapping and proxy factory."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from axoneme.core.l7 import L7Parser, L7Request, L7Verdict
from axoneme.core.policy.walk import Walker, join
from axoneme.core.yamlsafe import excerpt as _q
from axoneme.l7.kafka._matcher import match_fields, match_request, request_from_trace
from axoneme.l7.kafka._protocol import KafkaRequest
from axoneme.l7.kafka._rules import KafkaRule

# Kafka API key names Cilium accepts in ``apiKey`` (case-insensitive).
API_KEY_NAMES = frozenset({
    "produce", "fetch", "offsets", "metadata", "leaderandisr", "stopreplica",
    "updatemetadata", "controlledshutdown", "offsetcommit", "offsetfetch",
    "findcoordinator", "joingroup", "heartbeat", "leavegroup", "syncgroup",
    "describegroups", "listgroups", "saslhandshake", "apiversions",
    "createtopics", "deletetopics", "deleterecords", "initproducerid",
    "offsetforleaderepoch", "addpartitionstotxn", "addoffsetstotxn", "endtxn",
    "writetxnmarkers", "txnoffsetcommit", "describeacls", "createacls",
    "deleteacls", "describeconfigs", "alterconfigs",
})
_KAFKA_TOPIC = re.compile(r"^[a-zA-Z0-9._-]+$")


class KafkaParser(L7Parser):
    """Kafka rules (role, apiKey, apiVersion, clientID, topic) as Cilium has them.

    ``match`` accepts an L7Request whose ``fields`` hold either a parsed wire
    request under ``"request"`` (a KafkaRequest, as the proxy sees it) or the
    trace form (``api_keys``, ``topics``, ``api_version``, ``client_id``).
    """

    name = "kafka"
    rules_field = "kafka"
    default_proxy_port = 15002
    trace_inputs = {
        "role": "produce or consume (--kafka-role)",
        "topic": "topic name (--kafka-topic)",
        "api_key": "API name or number, e.g. fetch (--kafka-api-key)",
        "api_version": "API version (--kafka-api-version)",
        "client_id": "client id (--kafka-client-id)",
    }

    def parse_rule(self, value: object, path: str, w: Walker) -> KafkaRule | None:
        """One ``rules.kafka[]`` item (Cilium ``PortRuleKafka``)."""
        m = w.mapping(value, path, ("role", "apiKey", "apiVersion", "clientID", "topic"))
        if m is None:
            return None
        n = len(w.problems)
        role = w.opt_string(m, "role", path) or None
        api_key = w.opt_string(m, "apiKey", path) or None
        api_version = m.get("apiVersion")
        if isinstance(api_version, int) and not isinstance(api_version, bool):
            api_version = str(api_version)
        elif api_version is not None:
            api_version = w.string(api_version, join(path, "apiVersion")) or None
        client_id = w.opt_string(m, "clientID", path) or None
        topic = w.opt_string(m, "topic", path) or None
        if role is not None:
            role = role.lower()
            if role not in ("produce", "consume"):
                w.problem(join(path, "role"), f"invalid role \"{_q(role)}\" (expected produce or consume)")
            if api_key is not None:
                w.problem(join(path, "apiKey"), "role and apiKey cannot both be set")
        if api_key is not None:
            api_key = api_key.lower()
            if api_key not in API_KEY_NAMES:
                w.problem(join(path, "apiKey"), f"unknown Kafka apiKey \"{_q(api_key)}\"")
        if api_version is not None and not (
                api_version.isascii() and api_version.isdigit() and len(api_version) <= 5
                and int(api_version) <= 32767):
            w.problem(join(path, "apiVersion"), f"invalid apiVersion \"{_q(api_version)}\" (expected a number)")
        if topic is not None and (len(topic) > 255 or not _KAFKA_TOPIC.match(topic)):
            w.problem(join(path, "topic"),
                      f"invalid topic \"{_q(topic)}\" (at most 255 characters of a-z, A-Z, 0-9, '.', '_', '-')")
        if len(w.problems) != n:
            return None
        return KafkaRule(role=role, api_key=api_key, api_version=api_version, client_id=client_id, topic=topic)

    def is_empty_rule(self, rule: Any) -> bool:
        return bool(rule == KafkaRule())

    def match(self, rules: Sequence[Any], request: L7Request) -> L7Verdict:
        wire = request.fields.get("request")
        if isinstance(wire, KafkaRequest):
            return match_request(rules, wire)
        return match_fields(rules, request.fields)

    def request_from_trace(self, options: dict[str, Any]) -> L7Request:
        return request_from_trace(self.with_shorthands(options, "kafka"))

    def proxy_factory(self) -> Any:
        """``KafkaProxy`` (the ``axoneme.core.l7proxy.ProxyFactory`` signature)."""
        from axoneme.l7.kafka._proxy import KafkaProxy

        return KafkaProxy
