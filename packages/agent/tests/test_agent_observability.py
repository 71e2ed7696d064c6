"""Prometheus metrics (Cilium's names), the TCP metrics server and OpenTelemetry
spans, root-free: an in-memory span exporter, the noop datapath, a loopback port."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

import pytest
from axoneme.agent import _tracing as tracing
from axoneme.agent._metrics import AgentMetrics
from axoneme.agent._prometheus import MetricsServer, parse_serve_addr
from axoneme.core.errors import ConfigError
from axoneme.core.flow import DropReason, Flow, FlowEndpoint, FlowVerdict
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

POLICY = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
          "metadata": {"name": "deny-all", "namespace": "default"},
          "spec": {"endpointSelector": {"matchLabels": {"app": "web"}}, "ingress": [{}]}}


def _flow(verdict: FlowVerdict, direction: str = "INGRESS", reason: DropReason | None = None,
          l7: dict | None = None) -> Flow:
    return Flow(time=0.0, verdict=verdict, ip_source="10.244.0.2", ip_destination="10.244.0.3",
                source=FlowEndpoint(identity=256), destination=FlowEndpoint(identity=257, id=7),
                traffic_direction=direction, drop_reason=reason, type="L7" if l7 else "L3_L4",
                l7=l7)


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    tracing.configure(exporter=exporter, l7_sample_ratio=1.0)
    yield exporter
    tracing.shutdown()


def _agent(tmp_path: Path):
    from axoneme.agent._agent import Agent
    from axoneme.agent.cli import build_parser
    from axoneme.agent.cli._agentconfig import build_agent_config

    parser, _ = build_parser()
    cfg = build_agent_config(parser.parse_args([
        "agent", "run", "--datapath", "noop", "--state-dir", str(tmp_path / "state"),
        "--api-socket", str(tmp_path / "s.sock")]))
    (tmp_path / "state").mkdir()
    agent = Agent(cfg)
    agent.datapath = agent.make_datapath()
    return agent


# -- metrics ---------------------------------------------------------------------------------------

def test_flows_feed_ciliums_counters_and_ours() -> None:
    m = AgentMetrics()
    m.observe_flow(_flow(FlowVerdict.DROPPED, reason=DropReason.POLICY_DENIED))
    m.observe_flow(_flow(FlowVerdict.DROPPED, "EGRESS", DropReason.POLICY_DENY))
    m.observe_flow(_flow(FlowVerdict.FORWARDED, "EGRESS"))
    m.observe_flow(_flow(FlowVerdict.AUDIT, "EGRESS"))  # audit mode: forwarded
    m.observe_flow(_flow(FlowVerdict.DROPPED, l7={"type": "REQUEST", "http": {"code": 403}}))
    get = m.registry.get_sample_value
    # Cilium's reason text and direction, literally
    assert get("cilium_drop_count_total", {"reason": "Policy denied", "direction": "INGRESS"}) == 2
    assert get("cilium_drop_count_total",
               {"reason": "Policy denied by denylist", "direction": "EGRESS"}) == 1
    assert get("cilium_forward_count_total", {"direction": "EGRESS"}) == 2
    assert get("cilium_policy_l7_total", {"rule": "received", "proxy_type": "http"}) == 1
    assert get("cilium_policy_l7_total", {"rule": "denied", "proxy_type": "http"}) == 1
    # Hubble's flow metrics
    assert get("hubble_drop_total", {"reason": "POLICY_DENIED", "protocol": "HTTP"}) == 1
    assert get("hubble_flows_processed_total", {"type": "L7", "subtype": "HTTP",
                                                "verdict": "DROPPED", "protocol": "HTTP"}) == 1
    assert get("hubble_policy_verdicts_total", {"direction": "egress", "match": "none",
                                                "action": "audit"}) == 1
    # ours keep their names and enum-named reasons
    assert get("axoneme_drop_count_total", {"reason": "POLICY_DENY", "direction": "EGRESS"}) == 1
    assert get("axoneme_flows_observed_total") == 5


def test_regenerations_are_counted_by_outcome() -> None:
    m = AgentMetrics()
    m.regenerated(0.004)
    m.endpoint_regenerated(0.001, True)
    m.endpoint_regenerated(0.002, False)
    get = m.registry.get_sample_value
    assert get("cilium_policy_regeneration_total") == 1
    assert get("cilium_policy_regeneration_time_stats_seconds_count", {"scope": "total"}) == 1
    assert get("cilium_endpoint_regenerations_total",
               {"reason": "PolicyUpdate", "outcome": "success", "error": ""}) == 1
    assert get("cilium_endpoint_regenerations_total",
               {"reason": "PolicyUpdate", "outcome": "fail", "error": "PolicyBPFError"}) == 1
    assert get("axoneme_policy_regeneration_seconds_count") == 1


def test_counter_registration_is_idempotent_and_checked() -> None:
    m = AgentMetrics()
    c = m.counter("axoneme_policy_audit", "Flows a policy in audit mode would have dropped",
                  ["policy", "direction"])
    assert m.counter("axoneme_policy_audit", "again", ["policy", "direction"]) is c
    c.labels(policy="default/deny-all", direction="INGRESS").inc()
    assert m.registry.get_sample_value(
        "axoneme_policy_audit_total", {"policy": "default/deny-all", "direction": "INGRESS"}) == 1
    with pytest.raises(ValueError, match="labels"):
        m.counter("axoneme_policy_audit", "x", ["policy"])
    for bad in ("cilium_x", "axoneme_x_total"):
        with pytest.raises(ValueError, match="axoneme_"):
            m.counter(bad, "x")


def test_agent_state_gauges_are_read_at_scrape_time(tmp_path: Path) -> None:
    agent = _agent(tmp_path)
    asyncio.run(agent.policies.apply([{"obj": POLICY}]))
    text = agent.metrics.render().decode()
    for line in ("cilium_policy 1.0", "cilium_endpoint 0.0",
                 'cilium_identity{type="cluster_local"} 0.0', "cilium_fqdn_active_names 0.0",
                 "cilium_policy_regeneration_total 1.0"):
        assert line in text, line
    assert f"cilium_policy_max_revision {float(agent.revision)}" in text


# -- the TCP server --------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "want"), [
    ("127.0.0.1:9962", ("127.0.0.1", 9962)), (":9962", ("0.0.0.0", 9962)),
    ("[::1]:9962", ("::1", 9962)), ("localhost:0", ("localhost", 0))])
def test_serve_addr(value: str, want: tuple[str, int]) -> None:
    assert parse_serve_addr(value) == want


@pytest.mark.parametrize("value", ["9962", "127.0.0.1:", "127.0.0.1:http", ":70000", "::1:9962"])
def test_bad_serve_addr_names_the_flag(value: str) -> None:
    with pytest.raises(ConfigError, match="--prometheus-serve-addr"):
        parse_serve_addr(value)


def test_metrics_server_serves_the_registry_and_stops() -> None:
    m = AgentMetrics()
    m.observe_flow(_flow(FlowVerdict.DROPPED, reason=DropReason.POLICY_DENIED))
    server = MetricsServer("127.0.0.1:0", m.registry)
    server.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as r:
            body = r.read().decode()
            assert r.headers["Content-Type"].startswith("text/plain")
        assert 'cilium_drop_count_total{direction="INGRESS",reason="Policy denied"} 1.0' in body
        taken = MetricsServer(f"127.0.0.1:{server.port}", m.registry)
        with pytest.raises(ConfigError, match="--prometheus-serve-addr"):
            taken.start()
    finally:
        server.stop()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=2)


def test_flags_are_checked_with_exit_2(tmp_path: Path) -> None:
    from axoneme.agent.cli import UsageError, build_parser
    from axoneme.agent.cli._agentconfig import build_agent_config

    parser, _ = build_parser()
    for flags, what in ((["--prometheus-serve-addr", "nope"], "--prometheus-serve-addr"),
                        (["--otlp-endpoint", "127.0.0.1:4318"], "--otlp-endpoint")):
        with pytest.raises(UsageError, match=what):
            build_agent_config(parser.parse_args(["agent", "run", *flags]))
    conf = tmp_path / "agent.yaml"
    conf.write_text("prometheus-serve-addr: 127.0.0.1:9962\n"
                    "otlp_endpoint: http://127.0.0.1:4318\notlp_l7_sample_ratio: 0.5\n")
    cfg = build_agent_config(parser.parse_args(["agent", "run", "--config", str(conf)]))
    assert (cfg.prometheus_serve_addr, cfg.otlp_endpoint, cfg.otlp_l7_sample_ratio) == (
        "127.0.0.1:9962", "http://127.0.0.1:4318", 0.5)
    conf.write_text("otlp_l7_sample_ratio: 2\n")
    with pytest.raises(UsageError, match="otlp_l7_sample_ratio"):
        build_agent_config(parser.parse_args(["agent", "run", "--config", str(conf)]))


# -- traces ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("endpoint", "url"), [
    ("http://127.0.0.1:4318", "http://127.0.0.1:4318/v1/traces"),
    ("https://otel.example:4318/", "https://otel.example:4318/v1/traces"),
    ("http://c:4318/v1/traces", "http://c:4318/v1/traces")])
def test_traces_url(endpoint: str, url: str) -> None:
    assert tracing.traces_url(endpoint) == url


def test_off_by_default_spans_are_no_ops() -> None:
    assert not tracing.enabled()
    with tracing.span("x", policy="p") as s:
        assert s is None
    assert not tracing.l7_sampled()


def test_policy_apply_traces_its_regeneration(tmp_path: Path, spans: InMemorySpanExporter) -> None:
    agent = _agent(tmp_path)
    asyncio.run(agent.policies.apply([{"obj": POLICY}]))
    got = {s.name: s for s in spans.get_finished_spans()}
    apply, regen = got["policy.apply"], got["policy.regeneration"]
    assert regen.parent is not None and regen.parent.span_id == apply.context.span_id
    key = "CiliumNetworkPolicy/default/deny-all"
    assert apply.attributes["axoneme.policy"] == key
    assert regen.attributes["axoneme.policy"] == key  # inherited from the change it serves
    assert apply.attributes["axoneme.revision"] == agent.revision
    assert apply.resource.attributes["service.name"] == "axoneme-agent"


def test_a_failing_call_ends_its_span_with_an_error(spans: InMemorySpanExporter) -> None:
    @tracing.traced("cni.add", lambda req: {"pod": req["pod"]})
    async def cni_add(req: dict) -> dict:
        raise RuntimeError("no netns")

    with pytest.raises(RuntimeError):
        asyncio.run(cni_add({"pod": "default/a"}))
    (s,) = spans.get_finished_spans()
    assert s.name == "cni.add" and s.attributes["axoneme.pod"] == "default/a"
    assert s.status.status_code is StatusCode.ERROR


def test_annotate_adds_to_the_current_span(spans: InMemorySpanExporter) -> None:
    tracing.annotate(endpoint=1)  # no span: nothing to add to, no error
    with tracing.span("cni.del", container="c1"):
        tracing.annotate(endpoint=7, identity=256)
    (s,) = spans.get_finished_spans()
    assert (s.attributes["axoneme.container"], s.attributes["axoneme.endpoint"],
            s.attributes["axoneme.identity"]) == ("c1", 7, 256)


def test_l7_decisions_are_sampled(spans: InMemorySpanExporter) -> None:
    import dataclasses

    from axoneme.core.flow import FlowPolicy

    flow = dataclasses.replace(
        _flow(FlowVerdict.DROPPED, l7={"type": "REQUEST", "http": {"method": "GET"}}),
        ingress_denied_by=(FlowPolicy("web", "default", "CiliumNetworkPolicy"),))
    tracing.l7_decision(flow)
    (s,) = spans.get_finished_spans()
    assert s.name == "l7.decision"
    assert s.attributes["axoneme.policy"] == "CiliumNetworkPolicy/default/web"
    assert (s.attributes["axoneme.endpoint"], s.attributes["axoneme.identity"],
            s.attributes["axoneme.verdict"]) == (7, 257, "DROPPED")
    tracing.configure(exporter=spans, l7_sample_ratio=0.0)
    tracing.l7_decision(flow)
    assert len(spans.get_finished_spans()) == 1


def test_state_collector_reads_identities_states_pressure_redirects_and_dns() -> None:
    from types import SimpleNamespace

    from axoneme.agent._prometheus import CIDR_IDENTITY_BASE, AgentStateCollector
    from axoneme.core.mapstate import Direction, Entry, Key, MapState, Protocol
    from prometheus_client import CollectorRegistry

    def key(port: int) -> Key:
        return Key(identity=256, direction=Direction.INGRESS, protocol=Protocol.TCP, port=port,
                   prefix_len=16)

    states = {1: MapState({key(80): Entry(proxy_port=10080), key(81): Entry()}),
              2: MapState({key(80): Entry()})}
    agent = SimpleNamespace(
        store=SimpleNamespace(endpoints={"c1": SimpleNamespace(status="ready"),
                                         "c2": SimpleNamespace(status="not-ready: map full")},
                              endpoint_objs=dict.fromkeys(states), policy_docs={"a": {}}),
        allocator=SimpleNamespace(snapshot=lambda: {256: [], 257: [],
                                                    CIDR_IDENTITY_BASE + 1: []}),
        engine=SimpleNamespace(resolve=states.__getitem__), revision=3,
        config=SimpleNamespace(policy_map_max=4),
        proxies=SimpleNamespace(ports={("http", 0): 10080}),
        fqdn=SimpleNamespace(view=lambda: [{"name": "a.example", "ip": "198.51.100.1"},
                                           {"name": "a.example", "ip": "198.51.100.2"}]))
    r = CollectorRegistry()
    r.register(AgentStateCollector(agent))
    get = r.get_sample_value
    assert get("cilium_identity", {"type": "cluster_local"}) == 2
    assert get("cilium_identity", {"type": "node_local"}) == 1
    assert get("cilium_endpoint_state", {"endpoint_state": "not-ready"}) == 1
    assert get("cilium_endpoint") == 2 and get("cilium_policy_max_revision") == 3
    assert get("cilium_bpf_map_pressure", {"map_name": "axoneme_policy_v1"}) == 0.5
    assert get("cilium_proxy_redirects", {"protocol_l7": "http"}) == 1
    assert (get("cilium_fqdn_active_names"), get("cilium_fqdn_active_ips")) == (1, 2)


def test_kubernetes_event_batches_are_spans(spans: InMemorySpanExporter) -> None:
    """The watcher's deliver (informer thread -> the agent's loop) runs each batch in a
    k8s.event span; a policy applied by it is that span's child."""
    import threading
    from types import SimpleNamespace

    from axoneme.agent._k8s import KubernetesSource

    async def handler(name: str, events: list, initial: bool) -> None:
        with tracing.span("policy.apply", policy="CiliumNetworkPolicy/n/p"):
            pass

    async def go() -> None:
        fake = SimpleNamespace(_loop=asyncio.get_running_loop(), _stop=threading.Event(),
                               listeners={})
        deliver = KubernetesSource._deliverer(fake, "cnps", handler)  # type: ignore[arg-type]
        await asyncio.to_thread(deliver, [("ADDED", {}), ("MODIFIED", {})], True)

    asyncio.run(go())
    got = {s.name: s for s in spans.get_finished_spans()}
    event = got["k8s.event"]
    assert (event.attributes["axoneme.resource"], event.attributes["axoneme.events"],
            event.attributes["axoneme.initial"]) == ("cnps", 2, True)
    assert got["policy.apply"].parent.span_id == event.context.span_id


NETPOL = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
          "metadata": {"name": "db", "namespace": "default"},
          "spec": {"podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Ingress"]}}


def test_policy_implementation_delay_by_ciliums_source(tmp_path: Path) -> None:
    agent = _agent(tmp_path)
    svc = agent.policies

    def count(source: str) -> float:
        v = agent.metrics.registry.get_sample_value("cilium_policy_implementation_delay_count",
                                                    {"source": source})
        return v or 0.0

    async def go() -> None:
        from axoneme.core.policy.parse import parse_policy_obj

        await svc.apply([{"obj": POLICY}])  # the API
        assert count("api") == 1
        cnp, netpol = (parse_policy_obj(o, "k8s", 0) for o in (POLICY, NETPOL))
        await svc.upsert([(cnp, {"obj": POLICY}), (netpol, {"obj": NETPOL})], source="k8s")
        assert (count("k8s"), count("custom-resource")) == (1, 1)
        await svc.upsert([(netpol, {"obj": NETPOL})], str(tmp_path / "dir" / "p.yaml"))
        assert count("directory") == 1
        await svc.delete([netpol.ref])
        assert count("api") == 2

    asyncio.run(go())
    assert agent.metrics.registry.get_sample_value(
        "cilium_policy_implementation_delay_sum", {"source": "api"}) > 0
