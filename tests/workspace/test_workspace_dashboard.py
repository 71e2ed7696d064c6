"""deploy/dashboards/axoneme.json uses only metrics the agent exports.

Every PromQL expression of the Grafana dashboard is parsed by Prometheus' own
`promtool` (as recording rules, Grafana's `$__rate_interval` as 5m); every
metric name it uses must be a series the agent's registry exports (read from a
real Agent's registry after flows and regenerations fed it), and every label a
selector matches on must be one of that metric's labels; so must every label a
query groups by and every label its legend prints.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "dashboards" / "axoneme.json"
GRAFANA_MACROS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
# PromQL words that are not metric names
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
            "or", "unless", "offset", "inf", "nan"}
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
SELECTOR = re.compile(r"([a-zA-Z_:][\w:]*)?\s*\{([^}]*)\}")
MATCHER = re.compile(r"([a-zA-Z_]\w*)\s*(=~|!~|!=|=)")
IDENT = re.compile(r"[a-zA-Z_:][\w:]*")


def expressions(legends: bool = False) -> list[Any]:
    """(panel title, expr) of every target, Grafana's macros substituted; with
    ``legends``, (title, expr, legendFormat)."""
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for macro, value in GRAFANA_MACROS.items():
                expr = expr.replace(macro, value)
            out.append((panel["title"], expr, target.get("legendFormat", "")) if legends
                       else (panel["title"], expr))
    return out


def grouping_labels(expr: str) -> set[str]:
    """The labels of an expression's by/without/on/ignoring/group_* clauses."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    return {name for m in GROUPING.finditer(expr)
            for name in re.findall(r"[a-zA-Z_]\w*", m.group(0).split("(", 1)[1])}


def metric_names(expr: str) -> dict[str, set[str]]:
    """Metric name -> the label names its selectors match on, in one expression."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings: nothing in them counts
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range and subquery durations
    expr = GROUPING.sub(" ", expr)  # grouping labels are not metrics
    used: dict[str, set[str]] = {}
    for m in SELECTOR.finditer(expr):
        if m.group(1):
            used.setdefault(m.group(1), set()).update(n for n, _ in MATCHER.findall(m.group(2)))
    bare = SELECTOR.sub(lambda m: f" {m.group(1) or ''} ", expr)
    for m in IDENT.finditer(bare):
        name, rest = m.group(0), bare[m.end():].lstrip()
        if rest.startswith("(") or name.lower() in KEYWORDS:
            continue  # a function or aggregation, or a keyword
        used.setdefault(name, set())
    return used


def test_metric_names_are_found() -> None:
    got = metric_names('histogram_quantile(0.9, sum by (le) (rate(a_bucket{scope="x",b!~"y"}'
                       '[5m]))) / on(job) group_left(c) max without (d) (up) > bool 0')
    assert got == {"a_bucket": {"scope", "b"}, "up": set()}


def exported() -> dict[str, set[str]]:
    """Series names of a real agent's registry -> their label names."""
    from axoneme.agent._agent import Agent
    from axoneme.agent.cli import build_parser
    from axoneme.agent.cli._agentconfig import build_agent_config
    from axoneme.core.flow import DropReason, Flow, FlowEndpoint, FlowVerdict

    parser, _ = build_parser()
    agent = Agent(build_agent_config(parser.parse_args(["agent", "run", "--datapath", "noop"])))
    m = agent.metrics
    for verdict, l7 in ((FlowVerdict.DROPPED, None), (FlowVerdict.FORWARDED, None),
                        (FlowVerdict.DROPPED, {"http": {"code": 403}})):
        m.observe_flow(Flow(time=0, verdict=verdict, ip_source="10.244.0.2",
                            ip_destination="10.244.0.3", source=FlowEndpoint(),
                            destination=FlowEndpoint(), traffic_direction="INGRESS",
                            drop_reason=DropReason.POLICY_DENIED, l7=l7,
                            type="L7" if l7 else "L3_L4"))
    m.regenerated(0.01)
    m.endpoint_regenerated(0.01, True)
    m.errors.labels(op="apply").inc()
    m.endpoint_ready.observe(0.1)
    m.fqdn_allowed.observe(0.01)
    out: dict[str, set[str]] = {}
    for family in m.registry.collect():
        suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_sum", "_count",
                                                                   "_created"]}
        for suffix in suffixes.get(family.type, [""]):
            out.setdefault(family.name + suffix, set())
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
        # a gauge read at scrape time with no series yet still declares its labels
        out.setdefault(family.name, set()).update(getattr(family, "_labelnames", ()))
    for collector in list(m.registry._collector_to_names):  # counters nothing counted yet
        for name in m.registry._collector_to_names[collector]:
            if name in out:
                out[name].update(getattr(collector, "_labelnames", ()))
    return out


@pytest.fixture(scope="module")
def series() -> dict[str, set[str]]:
    return exported()


def test_dashboard_is_grafana_json() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and dash["panels"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        assert panel["datasource"]["type"] == "prometheus" and panel["targets"], panel["title"]


def test_every_expression_parses(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed: scripts/bootstrap installs Debian's prometheus")
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"axoneme:dashboard:{i}", "expr": expr}
        for i, (_, expr) in enumerate(expressions())]}]}
    path = tmp_path / "rules.json"  # JSON is YAML
    path.write_text(json.dumps(rules))
    res = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    path.write_text(json.dumps({"groups": [{"name": "g", "rules": [
        {"record": "r", "expr": "sum(rate(x[5m])"}]}]}))
    bad = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode != 0 and "parse error" in bad.stdout + bad.stderr  # it does check


def test_every_metric_is_exported(series: dict[str, set[str]]) -> None:
    problems = []
    used_names: set[str] = set()
    for title, expr in expressions():
        for name, labels in metric_names(expr).items():
            used_names.add(name)
            if name not in series:
                problems.append(f"{title!r}: {name} is not exported")
            elif labels - series[name]:
                problems.append(f"{title!r}: {name} has no label {sorted(labels - series[name])}")
    assert not problems, "\n".join(problems)
    assert {"cilium_drop_count_total", "cilium_forward_count_total",
            "cilium_policy_regeneration_time_stats_seconds_bucket",
            "cilium_endpoint_regenerations_total", "cilium_identity",
            "cilium_policy", "cilium_policy_l7_total", "cilium_bpf_map_pressure",
            "cilium_fqdn_active_names"} <= used_names


def test_grouping_and_legend_labels_exist(series: dict[str, set[str]]) -> None:
    """`sum by (x)` and a legend's {{x}} name labels the expression's metrics have
    (a renamed label would otherwise leave a panel with one unnamed series)."""
    assert grouping_labels('sum by (a, b) (x) / on(c) group_left(d) max without (e) (y)') == {
        "a", "b", "c", "d", "e"}
    problems = []
    for title, expr, legend in expressions(legends=True):
        have = set().union(*(series.get(n, set()) for n in metric_names(expr)))
        for label in sorted(grouping_labels(expr) - have):
            problems.append(f"{title!r}: groups by {label}, which no metric of it has")
        for label in sorted(set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend)) - have):
            problems.append(f"{title!r}: legend prints {label}, which no metric of it has")
    assert not problems, "\n".join(problems)


def test_an_unknown_metric_would_be_caught(series: dict[str, Any]) -> None:
    assert "cilium_drops_total" not in series
    assert metric_names("rate(cilium_drops_total[5m])") == {"cilium_drops_total": set()}
