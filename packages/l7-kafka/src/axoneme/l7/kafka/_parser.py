"""The ``kafka`` L7 parser plugin: matcher, trace mapping and proxy factory."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from axoneme.core.l7 import L7Parser, L7Request, L7Verdict
from axoneme.l7.kafka._matcher import match_fields, match_request, request_from_trace
from axoneme.l7.kafka._protocol import KafkaRequest


class KafkaParser(L7Parser):
    """Kafka rules (role, apiKey, apiVersion, clientID, topic) as Cilium has them.

    ``match`` accepts an L7Request whose ``fields`` hold either a parsed wire
    request under ``"request"`` (a KafkaRequest, as the proxy sees it) or the
    trace form (``api_keys``, ``topics``, ``api_version``, ``client_id``).
    """

    name = "kafka"

    def match(self, rules: Sequence[Any], request: L7Request) -> L7Verdict:
        wire = request.fields.get("request")
        if isinstance(wire, KafkaRequest):
            return match_request(rules, wire)
        return match_fields(rules, request.fields)

    def request_from_trace(self, options: dict[str, Any]) -> L7Request:
        return request_from_trace(options)

    def proxy_factory(self) -> Any:
        """``KafkaProxy`` (the ``axoneme.core.l7proxy.ProxyFactory`` signature)."""
        from axoneme.l7.kafka._proxy import KafkaProxy

        return KafkaProxy
