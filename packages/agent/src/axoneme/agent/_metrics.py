"""Prometheus metrics of one agent (own registry: several agents per process in tests).

Two families, both in one registry (served on the API socket's ``/metrics`` and,
with ``--prometheus-serve-addr``, over TCP by ``_prometheus``):

- Cilium's names and labels, literally, where Cilium has the metric (users'
  dashboards and alerts query them): ``cilium_drop_count_total{reason,direction}``
  with Cilium's reason text ("Policy denied"), ``cilium_forward_count_total``,
  ``cilium_policy_regeneration_*`` (older Cilium's), ``cilium_policy_implementation_delay{source}``,
  ``cilium_endpoint_regenerations_total{reason,outcome,error}``,
  ``cilium_policy_l7_total{rule,proxy_type}``; the gauges read from the agent's
  state at scrape time (``cilium_identity``, ``cilium_policy``, map pressure...)
  come from ``_prometheus.AgentStateCollector``.
- ``axoneme_*`` for ours (kept as they were: enum-named drop reasons, the
  latency histograms, the datapath's own counters).

Other parts of the agent (and plugins) add counters with ``AgentMetrics.counter``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from axoneme.core.flow import DROP_REASON_TEXT, Flow, FlowVerdict
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# Cilium's regeneration histograms (pkg/metrics: 1 ms .. ~2 min)
REGENERATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
                        30, 60, 120)
# Cilium's policy_implementation_delay buckets (prometheus.ExponentialBuckets(10e-6, 10, 8))
IMPLEMENTATION_BUCKETS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
# verdicts whose packet went on: an AUDIT flow is one a policy in audit mode
# would have dropped, forwarded (as Cilium's datapath counts it)
FORWARDED = (FlowVerdict.FORWARDED, FlowVerdict.REDIRECTED, FlowVerdict.AUDIT)
# what cilium_policy_l7_total{proxy_type} says for each parser's flows: Cilium's
# "fqdn" for the DNS proxy; Cilium says "envoy" for HTTP and Kafka, which here go
# through our own proxies, named by their protocol
PROXY_TYPE = {"http": "http", "kafka": "kafka", "dns": "fqdn"}


# Hubble's metric labels (hubble/metrics: flow, drop, policy handlers)
HUBBLE_TYPE = {"policy-verdict": "PolicyVerdict", "drop": "Drop", "trace": "Trace", "l7": "L7"}
L7_SUBTYPE = {"http": "HTTP", "dns": "DNS", "kafka": "Kafka"}


def _hubble_protocol(flow: Flow) -> str:
    """Hubble's ``protocol`` label: the L7 protocol's or the L4 one's name."""
    if flow.type == "L7":
        return L7_SUBTYPE.get(flow.protocol, flow.protocol.upper())
    return next(iter(flow.l4), "")


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


def drop_reason_text(flow: Flow) -> str:
    """Cilium's ``reason`` label of ``cilium_drop_count_total`` for a dropped flow."""
    if flow.drop_reason is None:
        return "Policy denied" if flow.type == "L7" else "Unknown"
    return DROP_REASON_TEXT.get(flow.drop_reason, flow.drop_reason.name)


class AgentMetrics:
    def __init__(self, datapath_metrics: Callable[[], Mapping[str, float]] | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._counters: dict[str, tuple[Counter, tuple[str, ...]]] = {}
        # -- Cilium's names (docs/cli.md "Metrics") ------------------------------------
        self.cilium_drops = Counter(
            "cilium_drop_count", "Total dropped packets, tagged by drop reason and ingress/egress "
            "direction", ["reason", "direction"], registry=r)
        self.cilium_forwards = Counter(
            "cilium_forward_count", "Total forwarded packets, tagged by ingress/egress direction",
            ["direction"], registry=r)
        self.policy_regenerations = Counter(
            "cilium_policy_regeneration", "Total number of successful policy regenerations",
            registry=r)
        self.policy_regeneration_time = Histogram(
            "cilium_policy_regeneration_time_stats_seconds",
            "Policy regeneration time stats labeled by the scope", ["scope"],
            buckets=REGENERATION_BUCKETS, registry=r)
        self.policy_implementation_delay = Histogram(
            "cilium_policy_implementation_delay", "Time between a policy change and it being "
            "fully deployed into the datapath", ["source"],
            buckets=IMPLEMENTATION_BUCKETS, registry=r)
        self.endpoint_regenerations = Counter(
            "cilium_endpoint_regenerations", "Count of all endpoint regenerations that have "
            "completed, tagged by reason, outcome and error", ["reason", "outcome", "error"],
            registry=r)
        self.endpoint_regeneration_time = Histogram(
            "cilium_endpoint_regeneration_time_stats_seconds",
            "Endpoint regeneration time stats labeled by the scope", ["scope", "status"],
            buckets=REGENERATION_BUCKETS, registry=r)
        self.policy_l7 = Counter(
            "cilium_policy_l7", "Number of total proxy requests handled",
            ["rule", "proxy_type"], registry=r)
        # -- Hubble's flow metrics (Cilium serves them on --hubble-metrics-server) -------
        self.hubble_flows = Counter(
            "hubble_flows_processed", "Total number of flows processed",
            ["type", "subtype", "verdict", "protocol"], registry=r)
        self.hubble_drops = Counter(
            "hubble_drop", "Number of drops", ["reason", "protocol"], registry=r)
        self.hubble_policy_verdicts = Counter(
            "hubble_policy_verdicts", "Number of policy verdict events",
            ["direction", "match", "action"], registry=r)
        # -- ours ------------------------------------------------------------------------
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

    # -- for other parts of the agent and plugins ----------------------------------------
    def counter(self, name: str, documentation: str, labels: Sequence[str] = ()) -> Counter:
        """A counter in this agent's registry, made on the first call and the same
        one on later calls with the same name (an ``axoneme_`` name, without
        ``_total``: Prometheus' client adds it). ValueError if ``name`` was made
        with other labels or is not ours."""
        if not name.startswith("axoneme_") or name.endswith("_total"):
            raise ValueError(f"metric {name!r}: axoneme_<what>, without _total")
        labels = tuple(labels)
        if name in self._counters:
            made, made_labels = self._counters[name]
            if made_labels != labels:
                raise ValueError(f"metric {name!r} exists with labels {list(made_labels)}")
            return made
        made = Counter(name, documentation, list(labels), registry=self.registry)
        self._counters[name] = (made, labels)
        return made

    def register(self, collector: Collector) -> None:
        """Add a collector whose metrics are read at scrape time."""
        self.registry.register(collector)

    # -- what feeds the counters ---------------------------------------------------------
    def observe_flow(self, flow: Flow) -> None:
        self.flows.inc()
        direction = flow.traffic_direction or "UNKNOWN"
        if flow.verdict is FlowVerdict.DROPPED:
            reason = flow.drop_reason.name if flow.drop_reason is not None else "UNKNOWN"
            self.drops.labels(reason=reason, direction=direction).inc()
            self.cilium_drops.labels(reason=drop_reason_text(flow), direction=direction).inc()
        elif flow.verdict in FORWARDED:
            self.forwards.inc()
            self.cilium_forwards.labels(direction=direction).inc()
        self._observe_hubble(flow)
        if flow.type == "L7" and flow.verdict is not FlowVerdict.REDIRECTED:
            proxy_type = PROXY_TYPE.get(flow.protocol, flow.protocol or "unknown")
            self.policy_l7.labels(rule="received", proxy_type=proxy_type).inc()
            rule = "denied" if flow.verdict is FlowVerdict.DROPPED else "forwarded"
            self.policy_l7.labels(rule=rule, proxy_type=proxy_type).inc()

    def _observe_hubble(self, flow: Flow) -> None:
        kind = "l7" if flow.type == "L7" else flow.event_type
        protocol = _hubble_protocol(flow)
        subtype = L7_SUBTYPE.get(flow.protocol, "") if kind == "l7" else ""
        self.hubble_flows.labels(type=HUBBLE_TYPE.get(kind, kind), subtype=subtype,
                                 verdict=flow.verdict.value, protocol=protocol).inc()
        if flow.verdict is FlowVerdict.DROPPED:
            reason = flow.drop_reason.name if flow.drop_reason is not None else "POLICY_DENIED"
            self.hubble_drops.labels(reason=reason, protocol=protocol).inc()
        if kind == "policy-verdict":
            match = (flow.match_type or "none").lower().replace("_", "-")
            self.hubble_policy_verdicts.labels(direction=flow.traffic_direction.lower(),
                                               match=match,
                                               action=flow.verdict.value.lower()).inc()

    def regenerated(self, seconds: float) -> None:
        """One regeneration (every pending endpoint written) took ``seconds``."""
        self.regeneration.observe(seconds)
        self.policy_regenerations.inc()
        self.policy_regeneration_time.labels(scope="total").observe(seconds)

    def endpoint_regenerated(self, seconds: float, ok: bool, reason: str = "PolicyUpdate") -> None:
        """One endpoint's policy written (``ok``) or not, in ``seconds``. Labels as
        Cilium's (pkg/endpoint/metrics.go): ``reason`` a regeneration.Reason
        (PolicyUpdate, RegenerationFailure for a retry), ``error`` "" or, when the
        datapath refused the policy, PolicyBPFError (Cilium's name for a policy map
        write that failed; the iptables datapath's failures count there too)."""
        self.endpoint_regenerations.labels(reason=reason, outcome="success" if ok else "fail",
                                           error="" if ok else "PolicyBPFError").inc()
        self.endpoint_regeneration_time.labels(
            scope="total", status="success" if ok else "failure").observe(seconds)

    def policy_implemented(self, seconds: float, source: str) -> None:
        """A policy change of ``source`` (Cilium's: api, directory, k8s,
        custom-resource) in force in the datapath ``seconds`` after it was given."""
        self.policy_implementation_delay.labels(source=source).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
