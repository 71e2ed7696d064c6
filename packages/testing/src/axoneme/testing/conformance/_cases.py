"""Shared machinery of the conformance cases: policy files, expectations,
the engine's verdicts (`axoneme policy matrix`) and the flow check."""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable
from pathlib import Path

import yaml
from axoneme.testing.conformance._harness import NAMESPACES, PODS, Probe, Topology, probe_all

Expect = Callable[[str, str, int, str], bool]
L4 = [(80, "tcp"), (81, "tcp"), (80, "udp"), (81, "udp")]
ALL_PODS = [f"{ns}/{p}" for ns in NAMESPACES for p in PODS]


def write_policies(tmp: Path, name: str, docs: list[dict]) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    return path


def pod_probes(l4: list[tuple[int, str]] = L4) -> list[Probe]:
    return [(s, d, port, proto) for s in ALL_PODS for d in ALL_PODS if s != d for port, proto in l4]


def engine_verdicts(topo: Topology, policy: Path | None, l4: list[tuple[int, str]]) -> dict[Probe, bool]:
    """What the offline engine says, through the CLI contract."""
    args = ["policy", "matrix", "--cluster", str(topo.cluster_file)]
    if policy is not None:
        args += ["-f", str(policy)]
    for port, proto in l4:
        args += ["--port", f"{port}/{proto.upper()}"]
    data = json.loads(topo.agent.ax(*args, "-o", "json").stdout)
    return {(p["from"], p["to"], int(p["port"]), p["protocol"].lower()): p["verdict"] == "allowed"
            for p in data["probes"]}


def flows_since(topo: Topology, t0: float) -> list[dict]:
    out = topo.agent.ax("observe", "--last", "4095", "-o", "json").stdout
    flows = []
    for line in out.splitlines():
        if not line.strip():
            continue
        f = json.loads(line)
        f = f.get("flow", f)
        ts = dt.datetime.fromisoformat(f["time"].replace("Z", "+00:00")).timestamp()
        if ts >= t0 - 0.5:
            flows.append(f)
    return flows


def check_flows(topo: Topology, t0: float, results: dict[Probe, bool]) -> None:
    """Every TCP probe left a flow: allowed ones FORWARDED, denied ones DROPPED (POLICY_DENIED/DENY)."""
    deadline = time.monotonic() + 5
    missing: list[str] = []
    while True:
        flows = flows_since(topo, t0)
        seen: dict[tuple[str, str, int], set[str]] = {}
        for f in flows:
            l4 = f.get("l4", {}).get("TCP")
            if not l4 or f.get("is_reply"):
                continue
            key = (f["IP"]["source"], f["IP"]["destination"], int(l4["destination_port"]))
            verdict = f["verdict"]
            if verdict == "DROPPED":
                verdict += ":" + f.get("drop_reason_desc", "")
            seen.setdefault(key, set()).add(verdict)
        missing = []
        for (src, dst, port, proto), ok in results.items():
            if proto != "tcp":
                continue
            key = (topo.ips.get(src, src), topo.ips.get(dst, dst), port)
            verdicts = seen.get(key, set())
            if ok and "FORWARDED" not in verdicts:
                missing.append(f"{src}->{dst}:{port} allowed but no FORWARDED flow ({verdicts})")
            if not ok and not verdicts & {"DROPPED:POLICY_DENIED", "DROPPED:POLICY_DENY"}:
                missing.append(f"{src}->{dst}:{port} denied but no DROPPED policy flow ({verdicts})")
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    total = topo.agent.ax("observe", "--last", "4095", "-o", "json").stdout.count("\n")
    sample = "\n".join(json.dumps(f)[:300] for f in flows[-3:])
    assert not missing, ("\n".join(missing[:20]) + f"\n({len(missing)} in all; {len(flows)} flows since "
                         f"the probes, {total} in the store; last ones:\n{sample})")


def run_case(topo: Topology, tmp: Path, name: str, docs: list[dict], expect: Expect,
             probes: list[Probe] | None = None, l4: list[tuple[int, str]] = L4,
             engine: bool = True, flows: bool = True) -> None:
    """Apply, wait until the kernel holds the MapState, probe, compare."""
    policy = write_policies(tmp, name, docs) if docs else None
    if policy is not None:
        topo.agent.apply(policy)
    probes = probes if probes is not None else pod_probes(l4)
    t0 = time.time()
    results = probe_all(topo, probes)
    wrong = [f"{s}->{d}:{p}/{pr}: kernel says {'allowed' if ok else 'denied'}, semantics say "
             f"{'allowed' if expect(s, d, p, pr) else 'denied'}"
             for (s, d, p, pr), ok in sorted(results.items()) if ok != expect(s, d, p, pr)]
    assert not wrong, f"[{topo.agent.label}] {name}:\n" + "\n".join(wrong[:30]) + f"\n({len(wrong)} wrong)"
    if engine:
        verdicts = engine_verdicts(topo, policy, l4)
        disagree = [f"{k}: engine {v}" for k, v in verdicts.items()
                    if k in results and v != results[k]]
        assert not disagree, "engine disagrees with the kernel:\n" + "\n".join(disagree[:20])
    if flows:
        check_flows(topo, t0, results)


def ns_of(p: str) -> str:
    return p.split("/")[0]


def name_of(p: str) -> str:
    return p.split("/")[1]
