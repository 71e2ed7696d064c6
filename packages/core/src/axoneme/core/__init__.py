"""axoneme.core: labels, identities, the policy engine and the plugin contracts.

Pure Python: no root, no kernel, no network.
"""

from axoneme.core.datapath import (
    Datapath,
    DatapathConfig,
    DatapathStatus,
    IPCacheChanges,
    NoopDatapath,
)
from axoneme.core.endpoint import Endpoint, NamedPort
from axoneme.core.errors import (
    AxonemeError,
    ConfigError,
    DatapathError,
    DatapathProgramError,
    DatapathUnavailable,
    IdentityError,
    InvalidRule,
    MapFullError,
    PluginError,
    PolicyError,
    Problem,
)
from axoneme.core.flow import DropReason, Flow, FlowEndpoint, FlowVerdict
from axoneme.core.identity import Identity, IdentityAllocator, ReservedIdentity
from axoneme.core.l7 import L7Parser, L7Request, L7Verdict
from axoneme.core.labels import Label, Labels
from axoneme.core.mapstate import (
    Decision,
    Direction,
    Entry,
    Key,
    L7Rules,
    MapChanges,
    MapState,
    Protocol,
    Verdict,
)
from axoneme.core.selectors import LabelSelector, Operator, Requirement

__all__ = [
    "AxonemeError", "ConfigError", "Datapath", "DatapathConfig", "DatapathError",
    "DatapathProgramError", "DatapathStatus", "DatapathUnavailable", "Decision", "Direction",
    "DropReason", "Endpoint", "Entry", "Flow", "FlowEndpoint", "FlowVerdict", "IPCacheChanges",
    "Identity", "IdentityAllocator", "IdentityError", "InvalidRule", "Key", "L7Parser",
    "L7Request", "L7Rules", "L7Verdict", "Label", "LabelSelector", "Labels", "MapChanges",
    "MapFullError", "MapState", "NamedPort", "NoopDatapath", "Operator", "PluginError",
    "PolicyError", "Problem", "Protocol", "Requirement", "ReservedIdentity", "Verdict",
]
