"""The agent's API client: one definition, in ``axoneme.core.apiclient``.

Kept under this name for compatibility: ``from axoneme.agent.client import AgentClient`` works as before.
"""

from __future__ import annotations

from axoneme.core.apiclient import (
    DEFAULT_SOCKET,
    SOCKET_ENV,
    AgentBadRequest,
    AgentClient,
    AgentError,
    AgentUnreachable,
    q,
    resolve_socket,
)

__all__ = ["AgentBadRequest", "AgentClient", "AgentError", "AgentUnreachable", "DEFAULT_SOCKET",
           "SOCKET_ENV", "q", "resolve_socket"]
