"""Agent restart adopting an N-identity state (issue 17), on its own.

What B5 through the agent ends with (``suite._agent_adopt``: SIGTERM, then
``agent run`` on the same state dir and pinned maps until /v1/healthz
answers), without the 20 change rounds at every N before it: one eBPF agent
in a node netns of its own, one pod, the N-peer fromCIDR policy, then
``--restarts`` restarts in a row. Each restart is one ``agent-ebpf-adopt``
trial (ready, the datapath's compile/load from its metrics, RSS, in_sync
after); with ``--merge`` they replace the adopt trials of a results.json::

    .venv/bin/python tests/bench/restart_adopt.py -n 100000 --restarts 3 \
        --merge bench-results/results.json --out bench-results
    .venv/bin/python tests/bench/restart_adopt.py -n 50000 --py-spy flame.svg

``--py-spy OUT.svg`` (``OUT.txt``: collapsed stacks) records the first
restart's agent with py-spy, from its exec until the rebuilt state answers.
``--json FILE`` also writes the trials (a before/after pair: run it once with
PYTHONPATH pointing at an older tree's packages); ``--from-json FILE
--merge ...`` merges such a file instead of running.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import suite  # noqa: E402


def _restart(agent: suite.Agent, n: int, srv_ep: int, spy: str = "") -> suite.Trial:
    """``suite._agent_adopt``, optionally with py-spy attached to the new agent."""
    if not spy:
        return suite._agent_adopt(agent, n, srv_ep)
    real_start = agent.start

    def start(timeout: float = 120) -> float:
        # attach py-spy right after the exec (nsenter execs the agent: same pid)
        orig = subprocess.Popen

        def popen(*a: Any, **kw: Any) -> Any:
            p = orig(*a, **kw)
            popen.spy = orig(["py-spy", "record", "--pid", str(p.pid), "-o", spy,  # type: ignore[attr-defined]
                              "--rate", "250", "--nonblocking",
                              *(["--format", "raw"] if spy.endswith(".txt") else [])], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=agent.env)
            return p

        subprocess.Popen = popen  # type: ignore[misc]
        try:
            return real_start(timeout)
        finally:
            subprocess.Popen = orig  # type: ignore[misc]
            spies.append(getattr(popen, "spy", None))

    # recorded until the rebuilt state answers (the trial's first /v1/status,
    # which waits at the API's gate): the background rebuild included, the
    # trial's own reads of 200k entries not
    spies: list[Any] = []

    def stop_spies() -> None:
        for sp in spies:
            if sp is not None and sp.poll() is None:
                sp.send_signal(signal.SIGINT)
                sp.wait(60)

    real_api = agent.api

    def api(timeout: float = 600) -> Any:
        client = real_api(timeout)
        get = client.get

        def spied_get(path: str, *a: Any, **kw: Any) -> Any:
            out = get(path, *a, **kw)
            if path == "/v1/status":
                stop_spies()
            return out

        client.get = spied_get
        return client

    agent.start = start  # type: ignore[method-assign]
    agent.api = api  # type: ignore[method-assign]
    try:
        return suite._agent_adopt(agent, n, srv_ep)
    finally:
        agent.start = real_start  # type: ignore[method-assign]
        agent.api = real_api  # type: ignore[method-assign]
        stop_spies()


def run(n: int, restarts: int, spy: str = "") -> list[suite.Trial]:
    map_max = str(2 * n + 64)
    agent = suite.Agent(["--datapath", "ebpf", "--policy-map-max", map_max], node=True)
    trials: list[suite.Trial] = []
    seen: set[str] = set()
    try:
        agent.start()
        agent.cli("namespace", "create", "bench")
        agent.cli("pod", "run", "srv", "-n", "bench", "--labels", "app=srv", "--",
                  "sleep", "86400")
        eps = {e["pod"]: e for e in json.loads(agent.cli("endpoint", "list", "-o", "json"))}
        srv_ep = eps["bench/srv"]["id"]
        base = suite._cnp("peers", [{"fromCIDR": [f"{suite.fake_ip(i)}/32" for i in range(n)],
                                     "toPorts": suite._ports("TCP", "UDP")}])
        t0 = time.perf_counter()
        agent.api().post("/v1/policies",
                         {"documents": [{"file": "bench", "index": 0, "obj": base}]})
        print(f"N={n:,} policy applied in {time.perf_counter() - t0:.2f} s", flush=True)
        for i in range(restarts):
            t = _restart(agent, n, srv_ep, spy if i == 0 else "")
            t.rep = i
            t.metrics["loadavg_1m"] = os.getloadavg()[0]
            trials.append(t)
            m = t.metrics
            print(f"restart {i + 1}: ready {m.get('ready_s', float('nan')):.2f} s, datapath "
                  f"load {m.get('datapath_load_s', float('nan')):.2f} s, rebuilt "
                  f"{m.get('rebuilt_s', float('nan')):.2f} s (adopting "
                  f"{bool(m.get('adopting'))}), rss "
                  f"{m.get('rss_mb', 0):.0f} MB, enforced {t.enforced}, load "
                  f"{m['loadavg_1m']:.2f} {t.error}", flush=True)
            for line in agent.log().splitlines():
                if "restart:" in line and line not in seen:
                    seen.add(line)
                    print("  agent:", line.strip()[-220:])
            if t.error:
                print(agent.log()[-2000:])
                break
    finally:
        agent.close()
    return trials


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=100_000)
    ap.add_argument("--restarts", type=int, default=3)
    ap.add_argument("--py-spy", default="", metavar="OUT.svg")
    ap.add_argument("--merge", help="results.json whose agent-ebpf-adopt trials these replace")
    ap.add_argument("--out", help="where the merged results.json and report go")
    ap.add_argument("--json", help="also write the trials here (a before/after pair)")
    ap.add_argument("--note", default="", help="appended to the report's note")
    ap.add_argument("--from-json", metavar="FILE",
                    help="no run: merge the trials --json wrote (with --merge)")
    a = ap.parse_args(argv)
    load0 = " ".join(f"{x:.2f}" for x in os.getloadavg())
    t0 = time.time()
    if a.from_json:
        got = json.loads(Path(a.from_json).read_text())
        trials = [suite.Trial(**t) for t in got["trials"]]
        load0 = f"{got['load_start']} at its start, {got['load_end']} at its end"
        t0 = Path(a.from_json).stat().st_mtime
    else:
        if os.geteuid() != 0:
            raise SystemExit("needs root (netns, veth, BPF)")
        suite.OWNER_PID = os.getpid()
        trials = run(a.n, a.restarts, a.py_spy)
    ready = [t.metrics["ready_s"] for t in trials if "ready_s" in t.metrics]
    if ready:
        print(f"median ready {statistics.median(ready):.2f} s over {len(ready)} restarts")
    if a.json:
        Path(a.json).write_text(json.dumps({"load_start": load0, "load_end": " ".join(
            f"{x:.2f}" for x in os.getloadavg()), "trials": [asdict(t) for t in trials]}, indent=1))
    if not a.merge:
        return 0 if trials and not any(t.error for t in trials) else 1
    old = json.loads(Path(a.merge).read_text())
    old["trials"] = [t for t in old["trials"] if t["condition"] != "agent-ebpf-adopt"]
    old["trials"] += [asdict(t) for t in trials]
    old.setdefault("extra", {})["note_restart_adopt"] = (
        f"restart adopting the N={trials[0].n if trials else a.n:,} state re-measured by tests/bench/restart_adopt.py "
        f"({len(trials)} restarts in a row, the median's trial reported; written "
        f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(t0))} UTC, load average "
        f"{load0 if a.from_json else load0 + ' at its start'})" + (f"; {a.note}" if a.note else ""))
    out = Path(a.out or Path(a.merge).parent)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(old, indent=1))
    res = suite.Results(plan=old["plan"], machine=old["machine"], not_run=old["not_run"],
                        extra=old["extra"], trials=[suite.Trial(**t) for t in old["trials"]])
    suite.sibling("report").write_report(res, out, old["extra"].get("command", ""),
                                         float(old["extra"].get("elapsed_s", 0)))
    print(f"report: {out / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
