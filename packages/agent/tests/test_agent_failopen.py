"""Fail-open paths of the agent (issue 13, item 5), proved without a kernel:
the agent runs in-process on a NoopDatapath (or a subclass that fails on
purpose) and the test checks what the datapath was told."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from axoneme.agent._agent import (
    DROPPED_POLICIES_FILE,
    Agent,
    AgentConfig,
    PersistedPolicyError,
)

GOOD = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "good", "namespace": "default"},
        "spec": {"endpointSelector": {"matchLabels": {"app": "web"}},
                 "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "client"}}]}]}}
# a default-deny whose port no longer validates (say, after an upgrade)
BAD = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
       "metadata": {"name": "deny-all", "namespace": "default"},
       "spec": {"endpointSelector": {},
                "ingress": [{"toPorts": [{"ports": [{"port": "99999"}]}]}]}}


def _record(obj: dict[str, Any], rev: int) -> dict[str, Any]:
    return {"doc": {"file": "<api>", "index": 0, "obj": obj}, "source": "api", "revision": rev}


def _state(tmp_path: Path) -> Path:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / "state.json").write_text(json.dumps({
        "version": 1, "policy_revision": 2,
        "policies": {"CiliumNetworkPolicy/default/good": _record(GOOD, 1),
                     "CiliumNetworkPolicy/default/deny-all": _record(BAD, 2),
                     "CiliumNetworkPolicy/default/junk": "not a record"}}))
    return state_dir


def test_unparseable_persisted_policy_refuses_start_naming_it(tmp_path: Path) -> None:
    state_dir = _state(tmp_path)
    agent = Agent(AgentConfig(datapath="noop", state_dir=str(state_dir), guard=False))
    agent.load_state()
    with pytest.raises(PersistedPolicyError) as info:
        agent._restore_policies()
    msg = str(info.value)
    assert "persisted policy CiliumNetworkPolicy/default/deny-all no longer parses: " \
           "spec.ingress[0].toPorts[0].ports[0].port" in msg
    assert "persisted policy CiliumNetworkPolicy/default/junk no longer parses" in msg
    assert "--drop-unparseable-policies" in msg
    assert str(state_dir / "state.json") in msg
    # nothing was dropped: the state still holds both
    assert "CiliumNetworkPolicy/default/deny-all" in agent.policy_docs
    assert "deny-all" in (state_dir / "state.json").read_text()


def test_drop_unparseable_policies_drops_loudly_and_keeps_a_copy(tmp_path: Path) -> None:
    state_dir = _state(tmp_path)
    agent = Agent(AgentConfig(datapath="noop", state_dir=str(state_dir), guard=False,
                              drop_unparseable_policies=True))
    agent.load_state()
    agent._restore_policies()
    assert [p.ref.name for p in agent.engine.policies()] == ["good"]
    assert set(agent.policy_docs) == {"CiliumNetworkPolicy/default/good"}
    dropped = {d["policy"]: d for d in agent.dropped_policies}
    assert set(dropped) == {"CiliumNetworkPolicy/default/deny-all",
                            "CiliumNetworkPolicy/default/junk"}
    assert "spec.ingress[0].toPorts[0].ports[0].port" in \
        dropped["CiliumNetworkPolicy/default/deny-all"]["problem"]
    kept = json.loads((state_dir / DROPPED_POLICIES_FILE).read_text())
    assert kept["CiliumNetworkPolicy/default/deny-all"]["record"]["doc"]["obj"] == BAD
    status = agent.status()["components"]["policies"]
    assert {d["policy"] for d in status["dropped_at_start"]} == set(dropped)
