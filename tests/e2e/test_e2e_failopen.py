"""Fail-open paths through a real agent process (issue 13, item 5)."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.privileged]

BAD = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
       "metadata": {"name": "deny-all", "namespace": "default"},
       "spec": {"endpointSelector": {},
                "ingress": [{"toPorts": [{"ports": [{"port": "99999"}]}]}]}}


def test_persisted_policy_that_no_longer_parses_stops_the_start(agent_factory: Any) -> None:
    ap = agent_factory("noop", start=False)
    ap.state_dir.mkdir(parents=True)
    state = ap.state_dir / "state.json"
    state.write_text(json.dumps({"version": 1, "policy_revision": 1, "policies": {
        "CiliumNetworkPolicy/default/deny-all": {
            "doc": {"file": "<api>", "index": 0, "obj": BAD}, "source": "api",
            "revision": 1}}}))
    before = state.read_bytes()
    res = subprocess.run(ap.command(), capture_output=True, text=True, env=ap.env(), timeout=60)
    assert res.returncode == 1, res.stderr
    assert ("persisted policy CiliumNetworkPolicy/default/deny-all no longer parses: "
            "spec.ingress[0].toPorts[0].ports[0].port") in res.stderr
    assert "--drop-unparseable-policies" in res.stderr
    assert "Traceback" not in res.stderr
    assert state.read_bytes() == before  # the policy is still there to be fixed
    assert not ap.socket.exists()

    # the way out: drop it loudly, see it in status, the document kept
    ap.extra_args = ("--drop-unparseable-policies",)
    ap.start()
    status = ap.json("status")
    dropped = status["components"]["policies"]["dropped_at_start"]
    assert [d["policy"] for d in dropped] == ["CiliumNetworkPolicy/default/deny-all"]
    assert "ports[0].port" in dropped[0]["problem"]
    kept = json.loads((ap.state_dir / "dropped-policies.json").read_text())
    assert kept["CiliumNetworkPolicy/default/deny-all"]["record"]["doc"]["obj"] == BAD
    assert "dropped" in ap.log().lower() and "deny-all" in ap.log()
