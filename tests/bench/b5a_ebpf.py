"""B5 through the agent on eBPF alone, merged into a results.json.

What ``suite.py --only B5A`` with ``AXONEME_B5A_CONDITIONS=ebpf`` measures (the
same ``bench_b5_agent``: N = 100 .. 100k, 20 change rounds per N, then the
restart adopting the 100k state), without the suite's datapath setup: that
starts and cleans up iptables datapaths in the host's namespace, which needs the
cluster lock (/tmp/axon-cluster.lock); an eBPF agent needs none::

    .venv/bin/python tests/bench/b5a_ebpf.py --merge bench-results/results.json --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import suite  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--merge", help="results.json to merge into (its other trials are kept)")
    ap.add_argument("--note", help="a note for the report's header (kept by later merges)")
    ap.add_argument("--drop-note", action="append", default=[], metavar="KEY",
                    help="an earlier note this run makes stale (its key in results.json extra)")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("needs root (netns, veth, BPF)")
    os.environ["AXONEME_B5A_CONDITIONS"] = "ebpf"  # merge() keeps the other conditions' trials
    suite.OWNER_PID = os.getpid()
    plan = suite.Plan.make(False)
    res = suite.Results(plan=asdict(plan), machine=suite.machine_info())
    tmp = tempfile.mkdtemp(prefix="axb5a-")
    guard = suite.Guard()
    old_fwd = Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()
    t0 = time.time()
    load_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    try:
        guard.install()  # before anything that could forward
        suite.sh("sysctl", "-qw", "net.ipv4.ip_forward=1")
        lg = suite.build_loadgen(tmp)
        suite.bench_b5_agent(plan, res, lg, ["ebpf"])
        res.machine["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    finally:
        suite.not_owner()
        if old_fwd == "0":
            suite.sh("sysctl", "-qw", "net.ipv4.ip_forward=0", check=False)
        guard.remove()
        shutil.rmtree(tmp, ignore_errors=True)
    command = " ".join(sys.argv)
    if a.merge:
        load_end = res.machine.get("loadavg_end", "?")
        suite.merge(res, json.loads(Path(a.merge).read_text()), ["B5A"])
        res.machine["loadavg_end_b5a"] = load_end
        command = f"{res.extra.get('command', '')} + {command}"
    res.extra["command"] = command
    for key in a.drop_note:
        res.extra.pop(key, None)
    if a.note:
        # merge() keeps the earlier run's machine section: this run's load goes in its note
        res.extra[f"note_{time.strftime('%Y_%m_%d_%H%M', time.gmtime(t0))}"] = (
            f"{a.note} ({time.strftime('%Y-%m-%d %H:%M', time.gmtime(t0))} UTC, load average "
            f"(1/5/15 min) {load_start} at its start, "
            f"{res.machine.get('loadavg_end_b5a', res.machine.get('loadavg_end', '?'))} "
            f"at its end)")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    elapsed = time.time() - t0 + float(res.extra.get("merged_elapsed_s", 0))
    res.extra["elapsed_s"] = elapsed
    (out / "results.json").write_text(json.dumps(
        {"plan": res.plan, "machine": res.machine, "not_run": res.not_run, "extra": res.extra,
         "trials": [asdict(t) for t in res.trials]}, indent=1))
    suite.sibling("report").write_report(res, out, command, elapsed)
    for t in res.trials:
        if t.condition.startswith("agent-ebpf"):
            print(t.condition, t.n, {k: round(v, 6) for k, v in t.metrics.items()}, t.error or "")
    print(f"report: {out / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
