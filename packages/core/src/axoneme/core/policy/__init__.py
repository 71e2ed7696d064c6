"""The policy engine: models, parsing/validation, repository, resolution."""

from axoneme.core.policy.api import (
    CIDRPeer,
    DNSRule,
    EndpointPeer,
    EntityPeer,
    FQDNPeer,
    HTTPRule,
    ICMPField,
    KafkaRule,
    L7Spec,
    PeerRule,
    Policy,
    PolicyKind,
    PolicyRef,
    PortProtocol,
    PortRule,
    Rule,
)

__all__ = [
    "CIDRPeer", "DNSRule", "EndpointPeer", "EntityPeer", "FQDNPeer", "HTTPRule", "ICMPField",
    "KafkaRule", "L7Spec", "PeerRule", "Policy", "PolicyKind", "PolicyRef", "PortProtocol",
    "PortRule", "Rule",
]
