"""scripts/_k8s_differential.py: states, windows and the engine's decisions on flows.

The recording itself runs against the real cluster (scripts/k8s-e2e, and the
CI subset in tests/k8s/test_k8s_upstream_e2e.py); here the windows and the
deciding are checked on recorded-looking input, where each answer is known.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
import _k8s_differential as d  # noqa: E402

AXONEME = str(Path(sys.executable).parent / "axoneme")
IPS = {"x/a": "10.244.0.10", "y/b": "10.244.0.11"}


def _items(policies: list[dict]) -> list[dict]:
    items: list[dict] = [{"kind": "Namespace", "metadata": {"name": n, "labels": {"ns": n}}}
                         for n in ("x", "y", "kube-system")]
    for key, ip in IPS.items():
        ns, name = key.split("/")
        items.append({"kind": "Pod", "metadata": {"name": name, "namespace": ns,
                                                  "labels": {"pod": name}},
                      "spec": {"containers": [{"name": "c", "ports": [
                          {"name": "serve-80-tcp", "containerPort": 80, "protocol": "TCP"}]}]},
                      "status": {"phase": "Running", "podIP": ip}})
    items.append({"kind": "Pod", "metadata": {"name": "agent", "namespace": "kube-system"},
                  "spec": {"hostNetwork": True}, "status": {"podIP": "10.255.254.1"}})
    items.append({"kind": "Pod", "metadata": {"name": "pending", "namespace": "x"},
                  "spec": {}, "status": {"phase": "Pending"}})
    return items + policies


DENY_X = {"kind": "NetworkPolicy", "metadata": {"name": "deny", "namespace": "x"},
          "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}


def _flow(t: float, src: str, dst: str, verdict: str, direction: str = "INGRESS",
          **extra: object) -> dict:
    def side(key: str) -> dict:
        ns, name = key.split("/")
        return {"namespace": ns, "pod_name": name}

    return {"time": dt.datetime.fromtimestamp(t, dt.UTC).isoformat().replace("+00:00", "Z"),
            "verdict": verdict, "traffic_direction": direction,
            "IP": {"source": IPS[src], "destination": IPS[dst]},
            "l4": {"TCP": {"source_port": 40000, "destination_port": 80, "flags": {"SYN": True}}},
            "source": side(src), "destination": side(dst), **extra}


def test_state_keeps_only_what_decides_policy() -> None:
    state = d.state_of(_items([DENY_X]))
    assert [n["metadata"]["name"] for n in state["namespaces"]] == ["x", "y"]
    assert [p["metadata"]["name"] for p in state["pods"]] == ["a", "b"]  # no host, no pending pod
    assert [p["metadata"]["name"] for p in state["policies"]] == ["deny"]
    # equal states compare equal whatever the order of the list
    assert d.digest(d.state_of(list(reversed(_items([DENY_X]))))) == d.digest(state)


def test_windows_and_decisions(tmp_path: Path) -> None:
    open_state, deny_state = d.state_of(_items([])), d.state_of(_items([DENY_X]))
    polls = [(100.0, 100.2, open_state), (101.0, 101.2, open_state), (110.0, 110.2, open_state),
             (111.0, 111.2, deny_state), (120.0, 120.2, deny_state)]
    windows = d.windows_of(polls)
    assert [(w.first_poll_end, w.last_poll_start) for w in windows] == [(100.2, 110.0), (111.2, 120.0)]
    flows = [
        _flow(105.0, "y/b", "x/a", "FORWARDED"),  # open: admitted, agreed
        _flow(105.1, "y/b", "x/a", "FORWARDED", "EGRESS"),  # the egress half: not an attempt
        _flow(105.2, "x/a", "y/b", "FORWARDED", is_reply=True),
        _flow(111.5, "y/b", "x/a", "DROPPED", drop_reason_desc="POLICY_DENIED"),  # settling
        _flow(115.0, "y/b", "x/a", "DROPPED", drop_reason_desc="POLICY_DENIED"),  # agreed
        _flow(116.0, "y/b", "x/a", "FORWARDED"),  # deny in force, the kernel admitted: a bug
        _flow(117.0, "x/a", "y/b", "FORWARDED"),  # y is open: agreed
        _flow(118.0, "x/a", "y/b", "DROPPED", drop_reason_desc="CT_MAP_INSERTION_FAILED"),
    ]
    result = d.decide(polls, flows, tmp_path)
    assert (result.states, result.attempts, result.connections) == (2, 4, 3)
    assert [(x.window, x.attempt.source, x.attempt.admitted, x.engine)
            for x in result.disagreements] == [(1, "y/b", True, "DENIED")]
    assert result.skipped == {
        "around a change of the cluster's state (no settled state)": 1,
        "dropped, not by policy": 1,
        "egress verdict of an admitted attempt (its ingress one decides)": 1,
        "reply": 1,
    }
    # the listed command reproduces the engine's side from the files written
    cmd = result.disagreements[0].reproduce.split()
    assert cmd[:3] == ["axoneme", "policy", "trace"]
    res = subprocess.run([AXONEME, *cmd[1:]], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "DENIED" in res.stdout


def test_attempt_outside_the_recorded_pods_is_counted_not_decided(tmp_path: Path) -> None:
    state = d.state_of(_items([]))
    polls = [(0.0, 0.1, state), (50.0, 50.1, state)]
    moved = _flow(10.0, "y/b", "x/a", "FORWARDED")
    moved["IP"]["destination"] = "10.244.0.99"  # x/a's address is not this one any more
    result = d.decide(polls, [moved], tmp_path)
    assert result.attempts == 0
    assert result.skipped == {"a pod (or its address) not in the recorded state": 1}


def test_a_change_elsewhere_leaves_an_attempt_decidable(tmp_path: Path) -> None:
    """Another test's namespace going away (its pods deleted one by one) changes
    nothing y/b -> x/a depends on: the attempt is decided."""
    other = {"kind": "Pod", "metadata": {"name": "c", "namespace": "z", "labels": {"pod": "c"}},
             "spec": {}, "status": {"phase": "Running", "podIP": "10.244.0.12"}}
    with_z, without_z = d.state_of(_items([DENY_X]) + [other]), d.state_of(_items([DENY_X]))
    polls = [(100.0, 100.0, with_z), (104.8, 104.8, without_z), (106.0, 106.0, without_z)]
    result = d.decide(polls, [_flow(105.0, "y/b", "x/a", "FORWARDED")], tmp_path, settle=1.0)
    assert result.attempts == 1 and len(result.disagreements) == 1  # decided (denied): counted
    # a change of what it depends on (x's policies) within the settle time: not decided
    polls = [(100.0, 100.0, d.state_of(_items([]))), (104.8, 104.8, without_z)]
    result = d.decide(polls, [_flow(105.0, "y/b", "x/a", "DROPPED",
                                    drop_reason_desc="POLICY_DENIED")], tmp_path, settle=1.0)
    assert result.attempts == 0
