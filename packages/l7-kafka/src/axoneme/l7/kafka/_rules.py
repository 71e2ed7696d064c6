"""``rules.kafka[]`` items (Cilium ``PortRuleKafka``), as the parser builds them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class KafkaRule:
    role: str | None = None  # produce | consume
    api_key: str | None = None
    api_version: str | None = None
    client_id: str | None = None
    topic: str | None = None


__all__ = ["KafkaRule"]
