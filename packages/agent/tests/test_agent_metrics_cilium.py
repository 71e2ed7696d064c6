"""Every ``cilium_*`` metric the agent exports has Cilium's name and Cilium's labels
(issue 18: dashboards and alerts written for Cilium query them), checked against
the metric table of the Cilium the Hubble API is pinned to (v1.20.2,
Documentation/observability/metrics.rst; scripts/hubble-build fetches that module).
Root-free: the noop datapath, a fake agent for the gauges read at scrape time."""

from __future__ import annotations

import os
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from axoneme.agent._metrics import AgentMetrics
from axoneme.agent._prometheus import CIDR_IDENTITY_BASE, AgentStateCollector
from axoneme.core.flow import DropReason, Flow, FlowEndpoint, FlowVerdict
from axoneme.core.identity import RESERVED_IDENTITIES
from axoneme.core.mapstate import Direction, Entry, Key, MapState, Protocol
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

# Cilium v1.20.2's metrics (Documentation/observability/metrics.rst): name without
# the cilium_ namespace -> its labels. test_table_is_ciliums_own re-reads the file.
CILIUM = {
    "drop_count_total": {"reason", "direction"},
    "forward_count_total": {"direction"},
    "endpoint": set(),
    "endpoint_state": {"endpoint_state"},
    "endpoint_regenerations_total": {"reason", "outcome", "error"},
    "endpoint_regeneration_time_stats_seconds": {"scope", "status"},
    "policy": set(),
    "policy_max_revision": set(),
    "policy_implementation_delay": {"source"},
    "policy_l7_total": {"rule", "proxy_type"},
    "proxy_redirects": {"protocol_l7"},
    "identity": {"type"},
    "bpf_map_pressure": {"map_name"},
}
# ours under Cilium's name where v1.20 differs, and why
OLDER_OR_NARROWER = {
    # Cilium <= 1.15's policy regeneration metrics (1.20 times a change with
    # policy_implementation_delay, which we export too)
    "policy_regeneration_total": set(),
    "policy_regeneration_time_stats_seconds": {"scope"},
    # Cilium's DNS cache is per endpoint (label endpoint); ours is the node's
    "fqdn_active_names": set(),
    "fqdn_active_ips": set(),
}


def _fake_agent() -> SimpleNamespace:
    """What AgentStateCollector reads, with a redirect and DNS names (every gauge has a series)."""
    key = Key(identity=256, direction=Direction.INGRESS, protocol=Protocol.TCP, port=80,
              prefix_len=16)
    states = {1: MapState({key: Entry(proxy_port=10080)})}
    return SimpleNamespace(
        store=SimpleNamespace(endpoints={"c1": SimpleNamespace(status="ready")},
                              endpoint_objs=dict.fromkeys(states), policy_docs={"a": {}}),
        allocator=SimpleNamespace(snapshot=lambda: {256: [], CIDR_IDENTITY_BASE + 1: []}),
        engine=SimpleNamespace(resolve=states.__getitem__), revision=3,
        config=SimpleNamespace(policy_map_max=4),
        proxies=SimpleNamespace(ports={("http", 0): 10080}),
        fqdn=SimpleNamespace(view=lambda: [{"name": "a.example", "ip": "198.51.100.1"}]))


def exported_cilium() -> dict[str, set[str]]:
    """cilium_* metric -> its label names (``_total`` names for counters, as served)."""
    out: dict[str, set[str]] = {}
    m = AgentMetrics()
    for metric in vars(m).values():
        if isinstance(metric, MetricWrapperBase) and metric._name.startswith("cilium_"):
            suffix = "_total" if metric._type == "counter" else ""
            out[metric._name + suffix] = set(metric._labelnames)
    r = CollectorRegistry()
    r.register(AgentStateCollector(_fake_agent()))
    for family in r.collect():
        assert family.samples, f"{family.name}: no series to read the labels of"
        out[family.name] = set().union(*(s.labels for s in family.samples))
    return out


def test_every_cilium_metric_has_ciliums_labels() -> None:
    got = exported_cilium()
    known = {**CILIUM, **OLDER_OR_NARROWER}
    problems = [f"{name}: labels {sorted(labels)}, Cilium's {sorted(known[name[7:]])}"
                for name, labels in sorted(got.items())
                if name[7:] in known and labels != known[name[7:]]]
    problems += [f"{name}: not a Cilium metric (name ours axoneme_*)"
                 for name in sorted(got) if name[7:] not in known]
    problems += [f"cilium_{name}: not exported" for name in sorted(known)
                 if f"cilium_{name}" not in got]
    assert not problems, "\n".join(problems)


def _cilium_module() -> Path | None:
    cache = Path(os.environ.get("AXONEME_CACHE") or Path.home() / ".cache" / "axoneme")
    found = sorted((cache / "go" / "mod" / "github.com" / "cilium").glob("cilium@v1.20.*"))
    return found[-1] if found else None


def test_table_is_ciliums_own() -> None:
    """CILIUM is what Cilium documents (the metric tables of metrics.rst)."""
    module = _cilium_module()
    if module is None:
        pytest.skip("Cilium's Go module is not downloaded here (scripts/hubble-build --protos "
                    "fetches it into ~/.cache/axoneme/go)")
    text = (module / "Documentation" / "observability" / "metrics.rst").read_text()
    documented: dict[str, set[str]] = {}
    for line in text.splitlines():
        m = re.match(r"^``(\w+)``\s+((?:``\w+``,?\s*)*)\s*(Enabled|Disabled)\b", line)
        if m:
            documented.setdefault(m.group(1), set(re.findall(r"``(\w+)``", m.group(2))))
    for name, labels in CILIUM.items():
        assert documented.get(name) == labels, (name, documented.get(name))
    for name in ("policy_regeneration_total", "policy_regeneration_time_stats_seconds"):
        assert name not in documented, f"{name} is back in Cilium: move it to CILIUM"
    assert documented["fqdn_active_names"] == {"endpoint"}


def _flow(verdict: FlowVerdict, l7: dict[str, Any] | None = None) -> Flow:
    return Flow(time=0.0, verdict=verdict, ip_source="10.244.0.2", ip_destination="10.244.0.3",
                source=FlowEndpoint(identity=256), destination=FlowEndpoint(identity=257, id=7),
                traffic_direction="INGRESS", drop_reason=DropReason.POLICY_DENIED,
                type="L7" if l7 else "L3_L4", l7=l7)


def test_endpoint_regenerations_carry_reason_outcome_error() -> None:
    m = AgentMetrics()
    m.endpoint_regenerated(0.001, True)
    m.endpoint_regenerated(0.002, False, "RegenerationFailure")
    get = m.registry.get_sample_value
    assert get("cilium_endpoint_regenerations_total",
               {"reason": "PolicyUpdate", "outcome": "success", "error": ""}) == 1
    assert get("cilium_endpoint_regenerations_total", {
        "reason": "RegenerationFailure", "outcome": "fail", "error": "PolicyBPFError"}) == 1
    for status in ("success", "failure"):
        assert get("cilium_endpoint_regeneration_time_stats_seconds_count",
                   {"scope": "total", "status": status}) == 1


def test_dns_proxy_requests_are_ciliums_fqdn_proxy_type() -> None:
    m = AgentMetrics()
    m.observe_flow(_flow(FlowVerdict.FORWARDED, {"type": "REQUEST", "dns": {"query": "a."}}))
    m.observe_flow(_flow(FlowVerdict.DROPPED, {"type": "REQUEST", "http": {"method": "GET"}}))
    get = m.registry.get_sample_value
    assert get("cilium_policy_l7_total", {"rule": "forwarded", "proxy_type": "fqdn"}) == 1
    assert get("cilium_policy_l7_total", {"rule": "denied", "proxy_type": "http"}) == 1


def test_gauges_read_reserved_identities_and_redirects_by_protocol_l7() -> None:
    r = CollectorRegistry()
    r.register(AgentStateCollector(_fake_agent()))
    get = r.get_sample_value
    assert get("cilium_identity", {"type": "reserved"}) == len(RESERVED_IDENTITIES) > 0
    assert get("cilium_identity", {"type": "cluster_local"}) == 1
    assert get("cilium_proxy_redirects", {"protocol_l7": "http"}) == 1
