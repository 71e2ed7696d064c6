"""L7 redirect plumbing: proxy ports, transparent listeners, TPROXY rules.

The agent builds one ``ProxyManager(policy_for, flow_sink)``; ``acquire``
starts (or shares) the listener of a parser/direction and returns its port
(the ``Entry.proxy_port`` datapaths redirect to); ``stop`` removes
everything. Mark values live in ``axoneme.core.marks``.
"""

from ._manager import PORT_RANGE, ProxyError, ProxyInfo, ProxyManager
from ._rules import CHAIN, ProxyRulesError, RedirectRules
from ._sockets import make_listener, transparent_connector, transparent_udp_connector

__all__ = ["ProxyManager", "ProxyInfo", "ProxyError", "PORT_RANGE", "RedirectRules",
           "ProxyRulesError", "CHAIN", "make_listener", "transparent_connector",
           "transparent_udp_connector"]
