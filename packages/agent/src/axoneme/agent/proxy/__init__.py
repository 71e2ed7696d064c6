"""L7 redirect plumbing: proxy ports, transparent listeners, TPROXY rules.

How the agent uses it::

    from axoneme.agent.proxy import ProxyManager, make_policy_for

    policy_for = make_policy_for("http", endpoint_by_ip=..., identity_of_ip=...,
                                 policy_of=...)          # one per parser
    pm = ProxyManager(policy_for, flow_sink)             # flow_sink(Flow)
    port = pm.acquire("http", Direction.INGRESS)         # starts the listener
    # -> EngineOptions.proxy_port(parser, direction) returns these ports, so
    #    MapState entries carry them and datapaths mark
    #    to_proxy_mark(port) = 0x200 | port << 16 (axoneme.core.marks).
    pm.release("http", Direction.INGRESS)                # refcounted
    pm.stop()                                            # listeners + rules gone

``policy_for`` is any callable ``(src_ip, src_port, dst_ip, dst_port,
direction) -> ProxyPolicy | None``, or a mapping parser -> such callable
(``{"http": make_policy_for("http", ...), "kafka": ...}``). The
methods are synchronous and thread-safe (call them with
``asyncio.to_thread`` from the agent loop); the proxies run on the manager's
own event loop thread, which is where ``policy_for`` and ``flow_sink`` are
called (hand flows to the agent loop with ``loop.call_soon_threadsafe``).
"""

from axoneme.core.l7proxy import make_listener, transparent_connector, transparent_udp_connector

from ._manager import PORT_RANGE, ProxyError, ProxyInfo, ProxyManager
from ._policy import flow_endpoint, make_policy_for
from ._rules import CHAIN, ProxyRulesError, RedirectRules, chain_for_state_dir

__all__ = ["ProxyManager", "ProxyInfo", "ProxyError", "PORT_RANGE", "RedirectRules",
           "ProxyRulesError", "CHAIN", "chain_for_state_dir", "make_listener",
           "transparent_connector", "transparent_udp_connector", "make_policy_for",
           "flow_endpoint"]
