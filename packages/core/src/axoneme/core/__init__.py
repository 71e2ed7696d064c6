"""axoneme.core: labels, identities, the policy engine and the plugin contracts.

Pure Python: no root, no kernel, no network.

The names below are imported on first use (PEP 562), not with the package:
``import axoneme.core.names`` (the CNI plugin, the CLI) must not pay for the
policy engine, YAML and the plugin machinery. ``from axoneme.core import Key``
works as before.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

# name -> the module that defines it
_EXPORTS = {
    **dict.fromkeys(("Datapath", "DatapathConfig", "DatapathStatus", "IPCacheChanges",
                     "NoopDatapath"), "datapath"),
    **dict.fromkeys(("Endpoint", "NamedPort"), "endpoint"),
    **dict.fromkeys(("AxonemeError", "ConfigError", "DatapathError", "DatapathProgramError",
                     "DatapathUnavailable", "IdentityError", "InvalidRule", "MapFullError",
                     "PluginError", "PolicyError", "Problem"), "errors"),
    **dict.fromkeys(("DropReason", "Flow", "FlowEndpoint", "FlowVerdict"), "flow"),
    **dict.fromkeys(("Identity", "IdentityAllocator", "ReservedIdentity"), "identity"),
    **dict.fromkeys(("L7Parser", "L7Request", "L7Verdict"), "l7"),
    **dict.fromkeys(("Label", "Labels"), "labels"),
    **dict.fromkeys(("Decision", "Direction", "Entry", "Key", "L7Rules", "MapChanges", "MapState",
                     "Protocol", "Verdict"), "mapstate"),
    **dict.fromkeys(("LabelSelector", "Operator", "Requirement"), "selectors"),
}

__all__ = [
    "AxonemeError", "ConfigError", "Datapath", "DatapathConfig", "DatapathError",
    "DatapathProgramError", "DatapathStatus", "DatapathUnavailable", "Decision", "Direction",
    "DropReason", "Endpoint", "Entry", "Flow", "FlowEndpoint", "FlowVerdict", "IPCacheChanges",
    "Identity", "IdentityAllocator", "IdentityError", "InvalidRule", "Key", "L7Parser",
    "L7Request", "L7Rules", "L7Verdict", "Label", "LabelSelector", "Labels", "MapChanges",
    "MapFullError", "MapState", "NamedPort", "NoopDatapath", "Operator", "PluginError",
    "PolicyError", "Problem", "Protocol", "Requirement", "ReservedIdentity", "Verdict",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
        globals()[name] = value
        return value
    try:  # a submodule the eager imports used to load along (axoneme.core.policy, ...)
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
