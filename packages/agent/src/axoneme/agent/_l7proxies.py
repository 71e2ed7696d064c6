"""The agent's L7 proxies: one listener per (parser, direction), a fixed
port each, wired from the installed ``axoneme.l7`` parsers.

The engine asks ``proxy_port`` for the port of an L7 rule while it resolves
(so it never blocks); the regenerator starts the listeners handed out
(``start_wanted``) before the datapath is told to redirect, so a listener
that cannot start leaves the traffic redirected to nothing: L7 rules fail
closed. Each parser says what it needs (``default_proxy_port``,
``transport``: ``axoneme.core.l7.L7Parser``); nothing here names one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from axoneme.agent._metrics import AgentMetrics
from axoneme.agent._state import StateStore
from axoneme.agent.proxy import ProxyManager, RedirectRules, chain_for_state_dir, make_policy_for
from axoneme.core.endpoint import Endpoint
from axoneme.core.errors import PluginError
from axoneme.core.flow import Flow
from axoneme.core.l7 import default_proxy_port
from axoneme.core.mapstate import Direction, MapState, Protocol
from axoneme.core.plugins import GROUP_L7, installed, l7_parser

LOG = logging.getLogger(__name__)

EGRESS_PORT_OFFSET = 100  # egress listeners sit 100 above the ingress ones


class L7Proxies:
    """Proxy ports for the engine and the ``ProxyManager`` behind them."""

    def __init__(self, metrics: AgentMetrics) -> None:
        self.metrics = metrics
        self.manager: ProxyManager | None = None  # built by ``setup`` when parsers are installed
        self.http_engine = ""  # the HTTP proxy's engine: native | python ("" before setup)
        self.ports: dict[tuple[str, int], int] = {}
        self._wanted: set[tuple[str, int]] = set()
        # extra ProxyManager.acquire arguments per parser (toFQDNs hooks for a DNS parser)
        self.acquire_kwargs: Callable[[str], Mapping[str, Any]] = lambda parser: {}

    @staticmethod
    def _protocol(parser: str) -> Protocol:
        """The L4 protocol its proxy's policy lookups use (UDP when it serves UDP)."""
        try:
            transport = tuple(l7_parser(parser).transport)
        except PluginError:
            return Protocol.TCP
        return Protocol.UDP if "UDP" in transport else Protocol.TCP

    # -- the engine's callback -----------------------------------------------------
    def proxy_port(self, parser: str, direction: Any) -> int:
        """EngineOptions.proxy_port: a fixed port per parser and direction."""
        d = Direction(int(direction))
        key = (parser, int(d))
        if key not in self.ports:
            offset = EGRESS_PORT_OFFSET if d is Direction.EGRESS else 0
            self.ports[key] = default_proxy_port(parser) + offset
            self._wanted.add(key)
        return self.ports[key]

    @property
    def wanted(self) -> bool:
        return bool(self._wanted)

    # -- lifecycle -----------------------------------------------------------------
    def setup(self, *, enabled: bool, state_dir: str, store: StateStore,
              identity_of_ip: Callable[[str], int],
              policy_of: Callable[[Endpoint], MapState | None],
              flow_sink: Callable[[Flow], Any], identity_marks: bool = False,
              http_engine: str = "auto") -> None:
        """A ProxyManager for the installed parsers (listeners start lazily).
        ``identity_marks``: the datapath puts the source identity in its
        to-proxy marks (capability ``proxy_identity_mark``): the redirect
        rules match that layout and let accepted sockets inherit the mark.
        ``http_engine``: the HTTP proxy's engine (``l7_http_engine``): a
        parser offering ``proxy_factory_for(engine)`` picks its factory by it."""
        parsers = sorted(installed(GROUP_L7))
        if not enabled or not parsers:
            return

        def endpoint_by_ip(ip: str) -> Endpoint | None:
            rec = store.endpoint_by_ip(ip)
            return store.endpoint_objs.get(rec.id) if rec is not None else None

        try:
            policy_for = {
                parser: make_policy_for(parser, endpoint_by_ip=endpoint_by_ip,
                                        identity_of_ip=identity_of_ip, policy_of=policy_of,
                                        protocol=self._protocol(parser))
                for parser in parsers}
            # one redirect chain per agent: agents sharing a host never flush each other's
            rules = RedirectRules(chain=chain_for_state_dir(state_dir),
                                  identity_marks=identity_marks)
            self.manager = ProxyManager(policy_for, flow_sink, rules=rules,
                                        factories=self._factories(parsers, http_engine))
        except Exception as e:
            LOG.warning("L7 proxies disabled: %s", e)
            self.manager = None

    def _factories(self, parsers: list[str], http_engine: str) -> dict[str, Any]:
        """The HTTP parser's factory for ``http_engine`` (native: axoneme-l7-http)."""
        if "http" not in parsers:
            return {}
        factory_for = getattr(l7_parser("http"), "proxy_factory_for", None)
        if factory_for is None:
            self.http_engine = "python"
            return {}
        factory, self.http_engine = factory_for(http_engine)
        LOG.info("the HTTP L7 proxy runs on the %s engine", self.http_engine)
        return {"http": factory}

    def policy_changed(self) -> None:
        """Policies, endpoints or the ipcache changed: proxies that cache
        policy answers (the native HTTP engine) drop them (thread-safe)."""
        if self.manager is not None:
            self.manager.policy_changed()

    def start_wanted(self) -> None:
        """Start the listeners handed out by ``proxy_port`` (worker thread,
        no engine lock held)."""
        while self._wanted:
            parser, d = self._wanted.pop()
            if self.manager is None:
                LOG.error("L7 rules for %s need a proxy, but L7 proxies are disabled or not "
                          "installed: that traffic is dropped", parser)
                continue
            try:
                self.manager.acquire(parser, Direction(d), port=self.ports[(parser, d)],
                                     **self.acquire_kwargs(parser))
            except Exception as e:
                LOG.error("cannot start the %s %s proxy: %s", parser, Direction(d), e)
                self.metrics.errors.labels(op="proxy").inc()

    def revive(self) -> None:
        """A dead proxy loop is restarted (its redirected traffic meets a
        listener nobody reads meanwhile: it fails closed, never bypasses L7)."""
        if self.manager is None:
            return
        try:
            if self.manager.health() is not None:
                self.manager.revive()
        except Exception:
            LOG.warning("restarting the L7 proxies failed", exc_info=True)

    def stop(self) -> None:
        """The listeners stop, the TPROXY rules stay (like the datapath's
        enforcement): redirected traffic meets a closed port while the agent
        is down, so L7 rules fail closed instead of being bypassed. ``agent
        cleanup`` removes the rules."""
        if self.manager is None:
            return
        self.manager.rules = None
        try:
            self.manager.stop()
        except Exception:
            LOG.exception("stopping the L7 proxies failed")

    # -- status ----------------------------------------------------------------------
    def health(self) -> str | None:
        return self.manager.health() if self.manager is not None else None

    def view(self) -> dict[str, Any]:
        m = self.manager
        fault = self.health()
        return {"healthy": fault is None, "fault": fault or "",
                "restarts": m.restarts if m else 0, "last_fault": m.last_fault if m else "",
                "http_engine": self.http_engine,
                **({"engines": m.engines()} if m is not None and m.engines() else {})}

    def listeners(self) -> list[dict[str, Any]]:
        return [{"parser": i.parser, "direction": str(i.direction), "port": i.port}
                for i in (self.manager.proxies() if self.manager else [])]


def cleanup_redirect_rules(state_dir: str) -> None:
    """Remove the TPROXY rules an agent with ``state_dir`` left (agent cleanup)."""
    RedirectRules(chain=chain_for_state_dir(state_dir)).cleanup()
