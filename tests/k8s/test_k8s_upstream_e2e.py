"""Upstream's own NetworkPolicy e2e tests (e2e.test, Ginkgo) on the real cluster.

CI runs `scripts/k8s-e2e --subset ci` (the three ipBlock tests that Cilium
fails and skips, a named port, a namespace selector, default deny) on the eBPF
datapath and on iptables; the full suite is `scripts/k8s-e2e` and its latest
results are checked in under conformance-results/. Both check the differential:
the offline engine's verdict on every attempt the tests made against the kernel's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO, cluster_up

sys.path.insert(0, str(REPO / "scripts"))
from _k8s_e2e import CI_SUBSET  # noqa: E402


@pytest.mark.parametrize("datapath", ["iptables", "ebpf"])
def test_upstream_netpol_subset(cluster_session, datapath: str, tmp_path: Path) -> None:
    cluster_up(datapath)
    res = subprocess.run([str(REPO / "scripts" / "k8s-e2e"), "--datapath", datapath, "--subset", "ci",
                          "--keep-cluster", "--results", str(tmp_path)],
                         capture_output=True, text=True, timeout=3000)
    out = res.stdout + res.stderr
    last = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
    assert res.returncode == 0, f"scripts/k8s-e2e failed ({res.returncode}):\n{out[-6000:]}"
    results = json.loads((tmp_path / "results.json").read_text())
    names = [t["name"] for t in results["tests"]]
    # every test of the subset ran (none filtered away by a renamed test upstream) and passed
    for wanted in CI_SUBSET:
        assert any(wanted.replace("\\", "") in n for n in names), f"{wanted!r} did not run: {names}"
    assert results["failed"] == 0 and results["skipped"] == 0
    assert last == f"{results['passed']} passed, 0 failed, 0 skipped", last
    assert results["passed"] >= len(CI_SUBSET)
    # the differential: the offline engine decided every pod-to-pod attempt the tests made, in
    # the cluster state it was made in, as the kernel did
    diff = results["differential"]
    assert diff["attempts"] >= 50, diff  # ~125 on either datapath here
    assert not diff["disagreements"], json.dumps(diff["disagreements"][:10], indent=1)
