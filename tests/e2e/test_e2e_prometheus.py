"""A real Prometheus (Debian's package) scrapes `agent run --prometheus-serve-addr`
and a rate over Cilium's drop counter moves when a denied probe runs between two pods."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import _obsproc
import _testnet
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.privileged]

DROPS = 'cilium_drop_count_total{reason="Policy denied",direction="INGRESS"}'


def _kernel_datapath(datapath_probe: Any) -> str:
    """The first datapath that enforces here (noop drops nothing); the environment's
    AXONEME_PROMETHEUS_DATAPATH picks one (iptables: its NFLOG drop events)."""
    reasons = []
    wanted = os.environ.get("AXONEME_PROMETHEUS_DATAPATH")
    for name in [wanted] if wanted else ("ebpf", "iptables"):
        reason = datapath_probe(name)
        if reason is None:
            return name
        reasons.append(f"{name}: {reason}")
    why = "no enforcing datapath: " + "; ".join(reasons)
    print(f"SKIP: {why}")
    pytest.skip(why)


@pytest.fixture
def prometheus_bin() -> str:
    found = shutil.which("prometheus")
    if found is None:
        pytest.fail("prometheus is not installed: scripts/bootstrap installs Debian's package")
    return found


def _query(api: str, expr: str) -> float | None:
    """The value of a PromQL expression with one result (None: no result)."""
    res = _obsproc.get_json(f"{api}/api/v1/query", {"query": expr})
    assert res["status"] == "success", res
    result = res["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def test_prometheus_scrapes_drops_and_a_rate_moves(agent_factory: Any, datapath_probe: Any,
                                                   prometheus_bin: str, tmp_path: Path) -> None:
    metrics_port = _obsproc.free_port()
    ap = agent_factory(_kernel_datapath(datapath_probe),
                       extra_args=["--prometheus-serve-addr", f"127.0.0.1:{metrics_port}"])
    web = ap.pod_run("web", "python3", *_testnet.http_server_argv("0.0.0.0", 80),
                     labels="app=web")
    ap.pod_run("stranger", "sleep", "infinity", labels="app=stranger")
    policy = tmp_path / "deny.yaml"
    policy.write_text(_obsproc.WEB_POLICY)
    ap.cli("policy", "apply", "-f", str(policy), check=True)

    def denied_probe() -> None:
        res = ap.pod_exec("stranger", "curl", "-s", "-m", "1", "-o", "/dev/null",
                          f"http://{web}/")
        assert res.returncode != 0, "the probe was expected to be denied"

    prom_port = _obsproc.free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: axoneme\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{metrics_port}']}}]\n")
    data = tmp_path / "prometheus-data"
    argv = [prometheus_bin, f"--config.file={config}", f"--storage.tsdb.path={data}",
            f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"]
    api = f"http://127.0.0.1:{prom_port}"
    with _obsproc.daemon(argv, tmp_path / "prometheus.log", prom_port):
        # scraped, and the counter exists (a first denied probe makes its series)
        assert _testnet.poll(lambda: _query(api, 'up{job="axoneme"}') == 1.0, 30), \
            (tmp_path / "prometheus.log").read_text()[-3000:]
        denied_probe()
        assert _testnet.poll(lambda: (_query(api, DROPS) or 0) >= 1, 30), ap.log()
        # quiet: the rate falls to 0 once the probe's retransmissions are over
        rate = f"rate({DROPS}[5s])"
        _testnet.poll(lambda: _query(api, rate) == 0.0, 20)
        before = _query(api, DROPS) or 0.0
        denied_probe()
        moved = _testnet.poll(lambda: (_query(api, rate) or 0.0) > 0.0, 20)
        assert moved, f"rate did not move: {_query(api, rate)}\n{ap.log()}"
        assert (_query(api, DROPS) or 0.0) > before
        # Cilium's names are what Prometheus stored
        names = set(_obsproc.get_json(f"{api}/api/v1/label/__name__/values")["data"])
        for name in ("cilium_forward_count_total", "cilium_endpoint_regenerations_total",
                     "cilium_policy_regeneration_time_stats_seconds_bucket", "cilium_identity",
                     "cilium_policy", "cilium_bpf_map_pressure", "cilium_endpoint",
                     "cilium_policy_implementation_delay_bucket"):
            assert name in names, name
        assert _query(api, "cilium_policy") == 1.0
        # the policy apply above, timed until the datapath held it (Cilium 1.20's metric)
        assert _query(api, 'cilium_policy_implementation_delay_count{source="api"}') == 1.0
        assert _query(api, 'sum(cilium_endpoint_regenerations_total{outcome="success"})')


def test_a_port_in_use_is_exit_2_naming_the_flag(agent_factory: Any) -> None:
    """Refused before the agent touches the kernel; no socket left behind."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ap = agent_factory("noop", start=False,
                           extra_args=["--prometheus-serve-addr", f"127.0.0.1:{port}"])
        res = subprocess.run(ap.command(), capture_output=True, text=True, env=ap.env(),
                             timeout=60)
    assert res.returncode == 2, res.stderr
    assert f"--prometheus-serve-addr 127.0.0.1:{port}" in res.stderr
    assert "Traceback" not in res.stderr and not ap.socket.exists()
