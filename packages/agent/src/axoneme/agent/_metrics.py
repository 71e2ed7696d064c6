"""Prometheus metrics of one agent (own registry: several agents per process in tests)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from axoneme.core.flow import Flow, FlowVerdict
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


class _DatapathCollector(Collector):
    def __init__(self, source: Callable[[], Mapping[str, float]]) -> None:
        self._source = source

    def collect(self):  # type: ignore[no-untyped-def]
        try:
            values = dict(self._source())
        except Exception:
            values = {}
        for name, value in sorted(values.items()):
            metric = "axoneme_datapath_" + "".join(c if c.isalnum() else "_" for c in name)
            g = GaugeMetricFamily(metric, f"datapath counter {name}")
            g.add_metric([], float(value))
            yield g


class AgentMetrics:
    def __init__(self, datapath_metrics: Callable[[], Mapping[str, float]] | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.drops = Counter("axoneme_drop_count", "Dropped packets/requests",
                             ["reason", "direction"], registry=r)
        self.forwards = Counter("axoneme_forward_count", "Forwarded packets/requests", registry=r)
        self.regeneration = Histogram(
            "axoneme_policy_regeneration_seconds", "Time to recompute and apply policy",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r)
        self.endpoint_ready = Histogram(
            "axoneme_endpoint_ready_seconds", "Time from CNI ADD to endpoint ready",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5), registry=r)
        self.fqdn_allowed = Histogram(
            "axoneme_fqdn_answer_to_allowed_seconds",
            "Time from a DNS answer changing the node's FQDN cache to its IPs allowed in the datapath "
            "(the DNS proxy holds the answer until then)",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r)
        self.endpoints = Gauge("axoneme_endpoints", "Local endpoints", registry=r)
        self.identities = Gauge("axoneme_identities", "Allocated identities", registry=r)
        self.policy_revision = Gauge("axoneme_policy_revision", "Policy revision", registry=r)
        self.flows = Counter("axoneme_flows_observed", "Flows entering the flow store", registry=r)
        self.errors = Counter("axoneme_errors", "Errors by operation", ["op"], registry=r)
        if datapath_metrics is not None:
            r.register(_DatapathCollector(datapath_metrics))

    def observe_flow(self, flow: Flow) -> None:
        self.flows.inc()
        if flow.verdict is FlowVerdict.DROPPED:
            reason = flow.drop_reason.name if flow.drop_reason is not None else "UNKNOWN"
            self.drops.labels(reason=reason, direction=flow.traffic_direction or "UNKNOWN").inc()
        elif flow.verdict in (FlowVerdict.FORWARDED, FlowVerdict.REDIRECTED):
            self.forwards.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
