"""``--prometheus-serve-addr HOST:PORT``: the agent's metrics over TCP for
Prometheus to scrape (Cilium's flag; off by default), and the gauges read
from the agent's state at scrape time under Cilium's names.

The server is prometheus_client's (text exposition format, any path; scrape
``/metrics``), in a daemon thread: a scrape never waits for the agent's loop.
"""

from __future__ import annotations

import logging
from collections import Counter as Tally
from collections.abc import Iterator
from typing import Any

from axoneme.core.errors import ConfigError
from axoneme.core.identity import RESERVED_IDENTITIES
from prometheus_client import start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

LOG = logging.getLogger(__name__)

CIDR_IDENTITY_BASE = 1 << 24  # node-local (CIDR) identities from here (DESIGN.md)


def parse_serve_addr(value: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` (every address, as Cilium's
    ``:9962``) -> (host, port). ConfigError naming the flag otherwise."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"--prometheus-serve-addr: expected HOST:PORT (or :PORT), got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if ":" in host and not value.startswith("["):
        raise ConfigError(f"--prometheus-serve-addr: write an IPv6 address as [ADDR]:PORT, "
                          f"got {value!r}")
    return host or "0.0.0.0", int(port)


class MetricsServer:
    """The TCP listener serving one registry."""

    def __init__(self, addr: str, registry: CollectorRegistry) -> None:
        self.host, self.port = parse_serve_addr(addr)
        self.registry = registry
        self._httpd: Any = None

    def start(self) -> None:
        try:
            self._httpd, _ = start_http_server(self.port, addr=self.host, registry=self.registry)
        except OSError as e:
            raise ConfigError(f"--prometheus-serve-addr {self.host}:{self.port}: "
                              f"{e.strerror or e}") from None
        self.port = self._httpd.server_address[1]
        LOG.info("metrics on http://%s:%d/metrics", self.host, self.port)

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()


def _gauge(name: str, doc: str, values: dict[tuple[str, ...], float],
           labels: tuple[str, ...] = ()) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=list(labels))
    for key, value in sorted(values.items()):
        g.add_metric(list(key), float(value))
    return g


class AgentStateCollector(Collector):
    """Cilium's gauges, read from the agent's state when Prometheus scrapes.

    ``agent`` is the composition root (duck-typed: this module never imports
    it). The agent's loop changes these dicts while a scrape reads them: each
    read takes a copy, and a gauge that cannot be read this time is left out."""

    def __init__(self, agent: Any) -> None:
        self.agent = agent

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for fn in (self._endpoints, self._identities, self._policies, self._map_pressure,
                   self._redirects, self._fqdn):
            try:
                yield from fn()
            except Exception:
                LOG.debug("metric %s not read this scrape", fn.__name__, exc_info=True)

    def _endpoints(self) -> Iterator[GaugeMetricFamily]:
        records = list(self.agent.store.endpoints.values())
        yield _gauge("cilium_endpoint", "Number of endpoints managed by this agent",
                     {(): len(records)})
        states = Tally("ready" if r.status == "ready" else "not-ready" for r in records)
        yield _gauge("cilium_endpoint_state", "Count of all endpoints, tagged by different "
                     "endpoint states", {(s,): n for s, n in states.items()},
                     ("endpoint_state",))

    def _identities(self) -> Iterator[GaugeMetricFamily]:
        ids = list(self.agent.allocator.snapshot())  # allocated: not the reserved ones
        kinds = Tally("node_local" if i >= CIDR_IDENTITY_BASE else "cluster_local" for i in ids)
        # Cilium counts its reserved identities (host, world, ...) as type="reserved"
        kinds["reserved"] = len(RESERVED_IDENTITIES)
        yield _gauge("cilium_identity", "Number of identities currently allocated",
                     {(k,): kinds.get(k, 0) for k in ("cluster_local", "node_local", "reserved")},
                     ("type",))

    def _policies(self) -> Iterator[GaugeMetricFamily]:
        yield _gauge("cilium_policy", "Number of policies currently loaded",
                     {(): len(self.agent.store.policy_docs)})
        yield _gauge("cilium_policy_max_revision", "Highest policy revision number in the agent",
                     {(): self.agent.revision})

    def _states(self) -> Iterator[tuple[int, Any]]:
        for ep_id in list(self.agent.store.endpoint_objs):
            try:
                yield ep_id, self.agent.engine.resolve(ep_id)
            except Exception:
                continue

    def _map_pressure(self) -> Iterator[GaugeMetricFamily]:
        """The fullest endpoint's policy entries over ``--policy-map-max`` (the
        limit the datapath enforces): one series for every endpoint's policy
        map, the maximum, as Cilium reports its policy maps (no per-endpoint
        series: their number grows with the pods)."""
        limit = max(1, int(self.agent.config.policy_map_max))
        fullest = max((len(state) for _, state in self._states()), default=0)
        yield _gauge("cilium_bpf_map_pressure", "Fill percentage of map, tagged by map name",
                     {("axoneme_policy_v1",): fullest / limit}, ("map_name",))

    def _redirects(self) -> Iterator[GaugeMetricFamily]:
        by_port = {port: parser for (parser, _), port in dict(self.agent.proxies.ports).items()}
        counts: Tally[str] = Tally()
        for _, state in self._states():
            for entry in state.values():
                if entry.is_redirect:
                    counts[by_port.get(entry.proxy_port, "unknown")] += 1
        yield _gauge("cilium_proxy_redirects", "Number of redirects installed for endpoints, "
                     "labeled by protocol", {(p,): n for p, n in counts.items()}, ("protocol_l7",))

    def _fqdn(self) -> Iterator[GaugeMetricFamily]:
        entries = self.agent.fqdn.view()
        yield _gauge("cilium_fqdn_active_names", "Number of domains inside the DNS cache that "
                     "have not expired (by TTL)", {(): len({e["name"] for e in entries})})
        yield _gauge("cilium_fqdn_active_ips", "Number of IPs inside the DNS cache associated "
                     "with a domain that has not expired (by TTL)",
                     {(): len({e["ip"] for e in entries})})
