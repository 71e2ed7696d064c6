"""The XNODE report (xnode_report.py through report.py) from hand-made trials: the
rates are medians of counted trials only, the ratios divide the right cells,
and the N=10k targets get their verdicts. No root, nothing runs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _load(name: str) -> Any:
    key = f"axoneme_bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, HERE / f"{name}.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod
        spec.loader.exec_module(mod)
    return sys.modules[key]


def _results() -> Any:
    S = _load("suite")
    res = S.Results(plan={}, machine={})
    rates = {("none", 0): 20_000, ("ebpf", 10_000): 18_000, ("iptables-plain", 10_000): 1_500,
             ("iptables-ipset", 10_000): 90}
    for (cond, n), rate in rates.items():
        for rep, scale in enumerate((1.0, 0.9, 1.1)):
            res.trials.append(S.Trial("XNODE", f"{cond}/native", n, rep, metrics={
                "udp_rr": rate * scale, "tcp_rr": rate * scale, "flood_pps": 2 * rate * scale,
                "setup_s": 0.5}, enforced=True))
    # not counted: a leak must not move the medians
    res.trials.append(S.Trial("XNODE", "ebpf/native", 10_000, 3, metrics={
        "udp_rr": 1.0, "tcp_rr": 1.0, "flood_pps": 1.0}, enforced=False, proof="rc=0/0/0"))
    # the device condition ran in repetition 1 only: compared with eBPF's repetition 1
    res.trials.append(S.Trial("XNODE", "ebpf-devices/native", 10_000, 1, metrics={
        "udp_rr": 8_100, "tcp_rr": 8_100, "flood_pps": 16_200}, enforced=True))
    res.extra["xnode_plan"] = {"reps": 3, "seconds": 2.0, "sizes": [10_000],
                               "modes": ["native"]}
    return res


def test_xnode_tables_and_ratios() -> None:
    R = _load("report")
    X = _load("xnode_report")
    r = R._R(_results())
    text = "\n".join(X.section(R, r))
    assert "### XNODE native routing" in text and "tunnel routing" not in text
    assert "| eBPF | 10,000 | 18,000 (16,200–19,800) |" in text
    assert "| 500.0 ms | – | 3/4 |" in text  # the leak ran, did not count; no CPU figure
    # eBPF / no policy 0.90; eBPF / plain 12.00; eBPF / ipset 200.00; plain / none 0.07
    assert "| 10,000 | UDP RR (tps) | 0.90 | 12.00 | 200.00 | 0.07 | 0.00 | 0.50 |" in text
    rows = X.targets(R, r)
    assert [(row[1], row[2]) for row in rows] == [("12.00x", "met"), ("12.00x", "met"),
                                                  ("12.00x", "met")]


def test_xnode_section_absent_without_trials() -> None:
    R = _load("report")
    X = _load("xnode_report")
    S = _load("suite")
    r = R._R(S.Results(plan={}, machine={}))
    assert X.section(R, r) == [] and X.targets(R, r) == []
