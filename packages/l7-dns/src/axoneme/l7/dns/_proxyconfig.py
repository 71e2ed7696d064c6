"""The DNS proxy's settings, counters and the callbacks it is given.

``DnsProxyConfig`` says how one proxy listens and forwards, ``DnsProxyStats``
what it counted; ``PolicyFor``, ``OnAnswer``, ``FlowSink`` and
``EndpointFor`` are the shapes of the agent's hooks (see ``_proxy``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from axoneme.core.flow import Flow, FlowEndpoint
from axoneme.core.l7proxy import Addr, ProxyPolicy

PolicyFor = Callable[[str, str, int], "Sequence[Any] | ProxyPolicy | None | Awaitable[Any]"]
OnAnswer = Callable[[str, frozenset[str], int], "Awaitable[None] | None"]
FlowSink = Callable[[Flow], None]
EndpointFor = Callable[[str], "FlowEndpoint | None"]


@dataclass(frozen=True, slots=True)
class DnsProxyConfig:
    """How one DNS proxy listens and forwards.

    ``listen_port`` 0 picks a free port (UDP and TCP share it). With
    ``transparent`` the listeners get IP_TRANSPARENT (needs CAP_NET_ADMIN)
    and each query goes to its original destination; ``upstream`` is then
    only used for queries that were not redirected (no original address).
    """

    listen_host: str = "127.0.0.1"
    listen_port: int = 0
    transparent: bool = False
    upstream: Addr | None = None
    reject_rcode: int | str = "REFUSED"  # or "NXDOMAIN" / "nameError"
    upstream_timeout: float = 2.0
    max_inflight: int = 512
    response_max_delay: float = 0.5
    upstream_mark: int | None = None  # SO_MARK on upstream sockets (MARK_MAGIC_FROM_PROXY)
    reply_mark: int | None = None  # SO_MARK on transparent UDP replies
    udp: bool = True
    tcp: bool = True
    tcp_idle_timeout: float = 10.0
    max_tcp_connections: int = 256  # open client connections; more are closed at once


@dataclass(slots=True)
class DnsProxyStats:
    """Counters (the agent exports them as metrics)."""

    queries: int = 0
    allowed: int = 0
    refused: int = 0
    malformed: int = 0
    upstream_errors: int = 0
    overloaded: int = 0
    learned_names: int = 0
    latency_ns: list[int] = field(default_factory=list)  # proxy upstream round trips, last 1024
