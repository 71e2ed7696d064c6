"""The head-to-head benchmark suite in quick mode (CI): every condition must run
and prove enforcement. Speed is reported, never asserted (see suite.py; the
full suite runs via scripts/bench)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.bench, pytest.mark.privileged]
HERE = Path(__file__).resolve().parent


def _suite() -> Any:
    key = "axoneme_bench_suite"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, HERE / "suite.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod
        spec.loader.exec_module(mod)
    return sys.modules[key]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, Path]:
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces, veths, BPF programs, iptables")
    if os.environ.get("AXONEME_BENCH_QUICK") != "1":
        pytest.skip("the full suite runs via scripts/bench; set AXONEME_BENCH_QUICK=1 here")
    S = _suite()
    plan = S.Plan.make(quick=True)
    res = S.run_suite(plan, progress=lambda m: print(m, flush=True))
    out = tmp_path_factory.mktemp("bench-results")
    S.sibling("report").write_report(res, out, "pytest tests/bench (quick)", 0.0)
    return S, res, out


def _describe(trials: list[Any]) -> str:
    return "\n".join(f"{t.bench} {t.condition} N={t.n} rep {t.rep}: {t.error or t.proof}"
                     for t in trials)


def test_every_datapath_available(quick_run: tuple[Any, Any, Path]) -> None:
    _, res, _ = quick_run
    missing = {k: v for k, v in res.not_run.items() if k.startswith(("datapath/", "B1/"))}
    assert not missing, missing


def test_traffic_every_condition_ran_and_enforced(quick_run: tuple[Any, Any, Path]) -> None:
    S, res, _ = quick_run
    plan = S.Plan.make(quick=True)
    traffic = [t for t in res.trials if t.bench == "traffic"]
    for cond, sizes in plan.sizes.items():
        for n in sizes:
            ran = [t for t in traffic if t.condition == cond and t.n == n]
            assert len(ran) == plan.reps, f"{cond} N={n}: ran {len(ran)} of {plan.reps}"
            # a trial may fail to measure on a loaded box, but one per cell must count
            assert res.counted("traffic", cond, n), f"{cond} N={n}: no trial proved enforcement:\n" \
                + _describe(ran)
    # a denied probe that got through is an enforcement failure, never noise
    leaked = [t for t in traffic if t.condition != "none" and not t.error and not t.enforced
              and "rc=3/3/3" not in t.proof]
    assert not leaked, _describe(leaked)


def test_iptables_client_rule_was_last(quick_run: tuple[Any, Any, Path]) -> None:
    _, res, _ = quick_run
    for t in res.trials:
        if t.bench == "traffic" and t.condition.startswith("iptables") and t.enforced:
            assert "client rules at positions" in t.proof, t.proof


def test_b1_program_cost_enforced(quick_run: tuple[Any, Any, Path]) -> None:
    S, res, _ = quick_run
    b1 = [t for t in res.trials if t.bench == "B1"]
    for kind in ("ebpf-established", "ebpf-policy-hot", "ebpf-policy-random"):
        for n in S.Plan.make(quick=True).b1_sizes:
            cell = [t for t in b1 if t.condition == kind and t.n == n]
            assert cell and all(t.enforced for t in cell), _describe(cell)


def test_update_and_resync_enforced(quick_run: tuple[Any, Any, Path]) -> None:
    S, res, _ = quick_run
    for bench in ("B5", "B6"):
        for cond in ("ebpf", "iptables-plain", "iptables-ipset"):
            for n in S.Plan.make(quick=True).b5_sizes:
                cell = [t for t in res.trials if t.bench == bench and t.condition == cond
                        and t.n == n]
                assert cell and all(t.enforced for t in cell), f"{bench} {cond} N={n}:\n" + \
                    _describe(cell)


def test_ebpf_populate_and_report(quick_run: tuple[Any, Any, Path]) -> None:
    _, res, out = quick_run
    b7 = [t for t in res.trials if t.bench == "B7" and t.condition == "ebpf-datapath"]
    assert b7 and b7[0].enforced, _describe(b7)
    text = (out / "README.md").read_text()
    for section in ("## Targets", "## B1", "## B2", "## B3", "## B4", "## B5", "## B6", "## B7",
                    "## B8"):
        assert section in text
    assert (out / "ratio_vs_n.png").stat().st_size > 0
    assert (out / "update_latency.png").stat().st_size > 0
