"""The policy engine: models, parsing/validation, repository, resolution.

L7 rule objects belong to the ``axoneme.l7`` parser that parses them
(``axoneme.core.l7``): nothing here names one."""

from axoneme.core.policy.api import (
    CIDRPeer,
    EndpointPeer,
    EntityPeer,
    FQDNPeer,
    ICMPField,
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
    "CIDRPeer", "EndpointPeer", "EntityPeer", "FQDNPeer", "ICMPField", "L7Spec", "PeerRule",
    "Policy", "PolicyKind", "PolicyRef", "PortProtocol", "PortRule", "Rule",
]
