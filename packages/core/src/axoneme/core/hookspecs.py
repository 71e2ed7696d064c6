"""pluggy hook specifications: how components talk to plugins.

Every hook is documented in docs/plugins.md (a test checks it).
"""

from __future__ import annotations

from typing import Any

import pluggy

PROJECT = "axoneme"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def axoneme_endpoint_added(endpoint: Any) -> None:
    """An endpoint became ready (policy in force).

    :param endpoint: the ``axoneme.core.endpoint.Endpoint``.
    :returns: nothing.

    Who implements: exporters, audit/inventory plugins.
    """


@hookspec
def axoneme_endpoint_removed(endpoint: Any) -> None:
    """An endpoint was removed.

    :param endpoint: the ``Endpoint`` that was removed.
    :returns: nothing.

    Who implements: exporters, audit/inventory plugins.
    """


@hookspec
def axoneme_policy_changed(revision: int, added: list[Any], removed: list[Any]) -> None:
    """The policy repository changed.

    :param revision: the new policy revision.
    :param added: ``PolicyRef`` of policies added or replaced.
    :param removed: ``PolicyRef`` of policies removed.
    :returns: nothing.

    Who implements: exporters, GitOps/audit plugins.
    """


@hookspec
def axoneme_flow_observed(flow: Any) -> None:
    """A flow record entered the flow store.

    :param flow: the ``axoneme.core.flow.Flow``.
    :returns: nothing.

    Who implements: flow exporters (files, SIEM, OTLP logs).
    """


@hookspec(firstresult=True)
def axoneme_identity_store(config: dict[str, Any]) -> Any:
    """Request an identity store shared between nodes.

    :param config: the agent configuration.
    :returns: an ``IdentityStore`` or None (first non-None wins).

    Who implements: cluster identity backends (etcd, CRD).
    """


@hookspec
def axoneme_agent_started(status: dict[str, Any]) -> None:
    """The agent finished starting.

    :param status: what ``axoneme status -o json`` would print.
    :returns: nothing.

    Who implements: health reporters, exporters.
    """
