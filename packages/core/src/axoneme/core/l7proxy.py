"""The contract between the agent's proxy plumbing and an L7 proxy.

An ``axoneme.l7`` parser's ``proxy_factory()`` returns a ``ProxyFactory``.
The agent (``axoneme.agent.proxy.ProxyManager``) owns the kernel side: it
creates the listening socket (IP_TRANSPARENT, bound to the proxy port), the
TPROXY rules, and ``connect_upstream`` (binds the original client address,
sets the from-proxy mark). The proxy owns the protocol: it accepts on the
socket, asks ``policy_for`` per request, forwards or refuses, and reports
every request/response to ``flow_sink``.

With TPROXY the accepted socket's local address is the original destination;
``ProxyConfig.upstream`` overrides that for tests without TPROXY.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from axoneme.core.flow import Flow, FlowEndpoint
from axoneme.core.mapstate import Direction


@dataclass(frozen=True, slots=True)
class ProxyPolicy:
    """What ``policy_for`` answers for one connection at one moment.

    ``rules`` are the parser's rules of the redirecting entry (empty = allow
    all, visibility only); ``source``/``destination`` describe the peers for
    flow records.
    """

    rules: Sequence[Any] = ()
    source: FlowEndpoint = field(default_factory=FlowEndpoint)
    destination: FlowEndpoint = field(default_factory=FlowEndpoint)


# policy_for(src_ip, src_port, dst_ip, dst_port, direction) -> ProxyPolicy | None
# (or an awaitable of it). None = the agent knows no redirect for this
# connection: the proxy refuses the request (fail closed). Called for every
# request, so a policy change applies to the next request of a connection.
PolicyFor = Callable[[str, int, str, int, Direction], "ProxyPolicy | None | Awaitable[ProxyPolicy | None]"]
FlowSink = Callable[[Flow], None]
# connect_upstream(src=(ip, port), dst=(ip, port)) -> a connected non-blocking socket.
ConnectUpstream = Callable[[tuple[str, int], tuple[str, int]], Awaitable[socket.socket]]


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """Limits and timeouts (seconds) of one proxy listener."""

    max_connections: int = 1024
    header_timeout: float = 10.0  # first byte -> end of the request head
    idle_timeout: float = 60.0  # keep-alive wait for the next request
    body_timeout: float = 30.0  # max wait for the next body bytes
    upstream_connect_timeout: float = 5.0
    upstream_timeout: float = 60.0  # max wait for the next response bytes
    upstream: tuple[str, int] | None = None  # tests: fixed upstream instead of the original dst


class L7ProxyServer(Protocol):
    """A running proxy on one listening socket."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class ProxyFactory(Protocol):
    def __call__(self, sock: socket.socket, *, direction: Direction, policy_for: PolicyFor,
                 flow_sink: FlowSink, connect_upstream: ConnectUpstream | None = None,
                 config: ProxyConfig | None = None) -> L7ProxyServer: ...


__all__ = ["ProxyPolicy", "PolicyFor", "FlowSink", "ConnectUpstream", "ProxyConfig",
           "L7ProxyServer", "ProxyFactory"]
