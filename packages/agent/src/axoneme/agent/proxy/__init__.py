"""L7 redirect plumbing: proxy ports, transparent listeners, TPROXY rules.

The agent builds one ``ProxyManager(policy_for, flow_sink)`` (``make_policy_for``
builds ``policy_for`` from its endpoints, ipcache and MapStates); ``acquire``
starts (or shares) the listener of a parser/direction and returns its port
(the ``Entry.proxy_port`` datapaths redirect to); ``stop`` removes
everything. Mark values live in ``axoneme.core.marks``.
"""

from ._manager import PORT_RANGE, ProxyError, ProxyInfo, ProxyManager
from ._policy import flow_endpoint, make_policy_for
from ._rules import CHAIN, ProxyRulesError, RedirectRules
from ._sockets import make_listener, transparent_connector, transparent_udp_connector

__all__ = ["ProxyManager", "ProxyInfo", "ProxyError", "PORT_RANGE", "RedirectRules",
           "ProxyRulesError", "CHAIN", "make_listener", "transparent_connector",
           "transparent_udp_connector", "make_policy_for", "flow_endpoint"]
