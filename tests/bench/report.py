"""Markdown report and PNG charts of a benchmark suite run (see suite.py)."""

from __future__ import annotations

import statistics
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

TRAFFIC = (("udp_rr", "UDP RR (tps)"), ("tcp_rr", "TCP RR (tps)"),
           ("flood_pps", "64-byte UDP flood (pps received)"), ("tcp_crr", "TCP CRR (tps)"))
DP_CONDS = ("ebpf", "iptables-plain", "iptables-ipset", "iptables-stateful")
LABEL = {
    "none": "no policy",
    "ebpf": "eBPF",
    "iptables-plain": "iptables plain",
    "iptables-ipset": "iptables ipset",
    "iptables-stateful": "iptables stateful",
    "ebpf-devices": "eBPF, uplink a device",  # XNODE: from-netdev decides (Kubernetes mode's)
}


def _vals(trials: Iterable[Any], metric: str) -> list[float]:
    return [t.metrics[metric] for t in trials if metric in t.metrics]


def med(xs: Sequence[float]) -> float | None:
    return statistics.median(xs) if xs else None


def fmt(x: float | None, unit: str = "") -> str:
    if x is None:
        return "–"
    if unit == "s":
        if x < 1e-3:
            return f"{x * 1e6:.0f} µs"
        if x < 1:
            return f"{x * 1e3:.1f} ms"
        return f"{x:.2f} s"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.2f}"


def mmm(xs: Sequence[float], unit: str = "") -> str:
    if not xs:
        return "–"
    return f"{fmt(med(xs), unit)} ({fmt(min(xs), unit)}–{fmt(max(xs), unit)})"


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


class _R:
    """Lookups over a Results object."""

    def __init__(self, res: Any) -> None:
        self.res = res

    def counted(self, bench: str, cond: str, n: int) -> list[Any]:
        return self.res.counted(bench, cond, n)

    def all(self, bench: str, cond: str, n: int) -> list[Any]:
        return [t for t in self.res.trials if t.bench == bench and t.condition == cond and t.n == n]

    def sizes(self, bench: str, cond: str) -> list[int]:
        return sorted({t.n for t in self.res.trials if t.bench == bench and t.condition == cond})

    def traffic_median(self, cond: str, n: int, metric: str) -> float | None:
        return med(_vals(self.counted("traffic", cond, n), metric))

    def baseline(self, metric: str) -> float | None:
        return self.traffic_median("none", 0, metric)


def _counted_cell(r: _R, bench: str, cond: str, n: int) -> str:
    return f"{len(r.counted(bench, cond, n))}/{len(r.all(bench, cond, n))}"


def targets(r: _R) -> list[tuple[str, str, str, str]]:
    """(target, measured, verdict, basis) rows."""
    rows: list[tuple[str, str, str, str]] = []
    # 1. eBPF ratio to no policy >= 0.80 at every N
    worst: tuple[float, str] | None = None
    for n in r.sizes("traffic", "ebpf"):
        for metric, name in TRAFFIC:
            x = ratio(r.traffic_median("ebpf", n, metric), r.baseline(metric))
            if x is not None and (worst is None or x < worst[0]):
                worst = (x, f"{name.split(' (')[0]} at N={n:,}")
    if worst is None:
        rows.append(("eBPF / no policy >= 0.80 at every N", "–", "not measured", ""))
    else:
        rows.append(("eBPF / no policy >= 0.80 at every N (RR, flood, CRR)", f"worst {worst[0]:.2f}",
                     "met" if worst[0] >= 0.8 else "MISSED", worst[1]))
    # 2. eBPF / iptables-plain at 10k
    for metric, want, name in (("udp_rr", 3, "UDP RR"), ("tcp_rr", 3, "TCP RR"),
                               ("flood_pps", 10, "flood")):
        x = ratio(r.traffic_median("ebpf", 10_000, metric),
                  r.traffic_median("iptables-plain", 10_000, metric))
        rows.append((f"eBPF / iptables-plain at N=10k >= {want}x ({name})",
                     "–" if x is None else f"{x:.2f}x",
                     "not measured" if x is None else ("met" if x >= want else "MISSED"),
                     "medians of counted trials"))
    # 3. CRR eBPF / stateful at 10k
    x = ratio(r.traffic_median("ebpf", 10_000, "tcp_crr"),
              r.traffic_median("iptables-stateful", 10_000, "tcp_crr"))
    rows.append(("eBPF / stateful iptables CRR at N=10k >= 1.5x", "–" if x is None else f"{x:.2f}x",
                 "not measured" if x is None else ("met" if x >= 1.5 else "MISSED"),
                 "medians of counted trials"))
    # 4. one-change latency
    p50 = {n: med(_vals(r.counted("B5", "ebpf", n), "p50_s")) for n in r.sizes("B5", "ebpf")}
    p50 = {n: v for n, v in p50.items() if v is not None}
    if len(p50) >= 2:
        spread = max(p50.values()) / min(p50.values())
        rows.append(("eBPF one-change latency flat across N (max/min p50 <= 2)", f"{spread:.2f}",
                     "met" if spread <= 2 else "MISSED",
                     ", ".join(f"N={n:,}: {fmt(v, 's')}" for n, v in sorted(p50.items()))))
    else:
        rows.append(("eBPF one-change latency flat across N", "–", "not measured", ""))
    big = max(p50) if p50 else None
    ipt = med(_vals(r.counted("B5", "iptables-plain", big), "p50_s")) if big else None
    x = ratio(ipt, p50.get(big)) if big else None
    rows.append((f"eBPF one change >= 1000x faster than iptables-plain at N={big or 50_000:,}",
                 "–" if x is None else f"{x:,.0f}x",
                 "not measured" if x is None else ("met" if x >= 1000 else "MISSED"), "p50"))
    rows += _b1_targets(r)
    rows += _agent_targets(r)
    rows += _agent_report().targets(r)
    rows += _agent_report("xnode_report").targets(sys.modules[__name__], r)
    return rows


def _agent_report(name: str = "report_agent") -> Any:
    """report_agent.py (or ``name``.py), next to this file (tests/bench is not a package)."""
    import importlib.util

    key = f"axoneme_bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, Path(__file__).with_name(
            f"{name}.py"))
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        sys.modules[key] = mod
    return sys.modules[key]


def _b1_targets(r: Any) -> list[tuple[str, str, str, str]]:
    """Issue 17: a new flow's full policy lookup <= 300 ns, flat in N (B1)."""
    cells = {(kind, n): med(_vals(r.counted("B1", f"ebpf-{kind}", n), "ns_per_packet"))
             for kind in ("policy-hot", "policy-random")
             for n in r.sizes("B1", f"ebpf-{kind}")}
    cells = {k: v for k, v in cells.items() if v is not None}
    if not cells:
        return [("B1 new flow's full policy lookup <= 300 ns, flat in N", "–", "not measured", "")]
    worst, best = max(cells.values()), min(cells.values())
    basis = "hot / random keys: " + ", ".join(
        f"N={n:,}: {cells.get(('policy-hot', n), 0):,.0f} / {cells.get(('policy-random', n), 0):,.0f} ns"
        for n in sorted({n for _, n in cells}))
    return [("B1 new flow's full policy lookup <= 300 ns at every N", f"worst {worst:,.0f} ns",
             "met" if worst <= 300 else "MISSED", basis),
            ("B1 full policy lookup flat across N (max/min median <= 1.3)", f"{worst / best:.2f}",
             "met" if worst / best <= 1.3 else "MISSED", "medians of both key patterns")]


def _agent_targets(r: Any) -> list[tuple[str, str, str, str]]:
    """Issue 17's targets: B5 end to end through the agent, the 50k load."""
    rows = []
    e2e = {n: med(_vals(r.counted("B5", "agent-ebpf", n), "p50_s"))
           for n in r.sizes("B5", "agent-ebpf")}
    e2e = {n: v for n, v in e2e.items() if v is not None}
    basis = ", ".join(f"N={n:,}: {fmt(v, 's')}" for n, v in sorted(e2e.items()))
    if e2e:
        worst = max(e2e.values())
        rows.append(("B5 end to end (API -> kernel) eBPF p50 <= 1 ms at every N", fmt(worst, "s"),
                     "met" if worst <= 1e-3 else "MISSED", basis))
    else:
        rows.append(("B5 end to end (API -> kernel) eBPF p50 <= 1 ms", "–", "not measured", ""))
    if len(e2e) >= 2:
        spread = max(e2e.values()) / min(e2e.values())
        rows.append(("B5 end to end eBPF flat across N (max/min p50 <= 1.5)", f"{spread:.2f}",
                     "met" if spread <= 1.5 else "MISSED", basis))
    for n in (50_000, 100_000):
        plain = med(_vals(r.counted("B5", "agent-iptables-plain", n), "p50_s"))
        x = ratio(plain, e2e.get(n))
        rows.append((f"B5 end to end eBPF >= 10,000x iptables-plain at N={n:,}",
                     "–" if x is None else f"{x:,.0f}x",
                     "not measured" if x is None else ("met" if x >= 10_000 else "MISSED"),
                     "p50 through the agent" if x is not None else
                     "; ".join(v for k, v in r.res.not_run.items()
                               if k.startswith("B5/agent-iptables-plain")) or "no counted run"))
    load = med(_vals(r.counted("B5", "agent-ebpf", 50_000), "base_apply_s"))
    rows.append(("Load a 50k-peer fromCIDR policy through the agent <= 5 s (eBPF)",
                 "–" if load is None else fmt(load, "s"),
                 "not measured" if load is None else ("met" if load <= 5 else "MISSED"),
                 "POST /v1/policies until it returns (the kernel holds it: verified by "
                 "`endpoint get`)"))
    return rows


def write_report(res: Any, out: Path, command: str, elapsed: float) -> None:
    r = _R(res)
    out.mkdir(parents=True, exist_ok=True)
    charts = _charts(r, out)
    m = res.machine
    p = res.plan
    L: list[str] = []
    w = L.append
    w("# axoneme benchmark suite: eBPF vs iptables\n")
    w(f"- date: {m['date']}; duration {elapsed / 60:.1f} min; mode: "
      f"{'QUICK (CI smoke, not for numbers)' if p['quick'] else 'full'}")
    w(f"- machine: {m['nproc']} CPUs, {m['cpu']}, kernel {m['kernel']}, Python {m['python']}")
    w(f"- load average (1/5/15 min) at start: {m.get('loadavg_start', '?')}, at end: "
      f"{m.get('loadavg_end', '?')} (the machine is shared: other test runs add noise)")
    w(f"- plan: {p['reps']} repetitions, {p['seconds']} s per traffic measurement, shuffle seed "
      f"{p['seed']}; traffic N: " + "; ".join(f"{LABEL[c]} {list(v)}" for c, v in p['sizes'].items()))
    w(f"- command: `{command}` (full suite: `scripts/bench`; quick: "
      "`AXONEME_BENCH_QUICK=1 .venv/bin/python -m pytest tests/bench -m bench -q`)")
    for key, note in sorted(res.extra.items()):
        if key.startswith("note"):
            w(f"- note: {note}")
    w("")
    w("## Method\n")
    w("One session; every repetition runs all (condition, N) pairs in a freshly shuffled order; "
      "every traffic trial gets fresh network namespaces (server, client, intruder pods on veths "
      "in 10.244.0.0/16, behind our own guard chain that drops 10.244.0.0/16 towards the "
      "default route's interface). Each datapath is driven through the `Datapath` ABC "
      "(`endpoint_added`, `ipcache_apply`, `sync`/`apply`, `dump`, `cleanup`) with generated "
      "MapStates: N peer identities with /32 ipcache entries in 10.244.128.0/17 (addresses "
      "nothing uses), each allowed on the service port (TCP/UDP alternating), and the real "
      "client's identity allowed LAST: it has the largest identity, which the iptables "
      "renderer orders last; every iptables trial verifies from `iptables-save` that the "
      "client's rules come after the N peer rules. Only the server enforces (ingress); "
      "egress holds the allow-all entry of an unenforced direction.\n")
    w("- **Conditions**: *no policy* (same topology, no datapath); *eBPF* "
      "(`EbpfDatapath`, tc programs on the server's host veth); *iptables plain* "
      "(`IptablesDatapath(mode=plain)`: one `-s <ip>/32` rule per peer; its chains start with "
      "the datapath's own `--ctstate RELATED,ESTABLISHED --ctdir REPLY -j RETURN` rule, so "
      "replies skip the rules but every request packet walks them); *iptables ipset* "
      "(`mode=ipset`: one `-m set` rule per peer identity); *iptables stateful* (plain mode "
      "plus a classic stateful firewall rule in a chain of ours, first in FORWARD: "
      "`-m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT`, so only a connection's first "
      "packet walks the rules).")
    w("- **Traffic** (`tests/bench/loadgen.c`, built with gcc at run time): UDP RR and TCP RR "
      "(1-byte request/response, one flow), TCP CRR (connect/request/response/close), client "
      "and server pinned to the same CPU with `taskset -c 0`; 64-byte UDP flood: sender on "
      "CPU 1, sink on CPU 0, packets received per second.")
    w("- **A trial counts only if it proved enforcement**: every allowed measurement "
      "succeeded (exit 0, rate > 0) — for eBPF also the client's allow counters in the "
      "policy map moved — AND the denied probes were dropped (intruder identity UDP and TCP "
      "to the allowed port, and the client to a port nobody is allowed on: all timed out). "
      "The no-policy baseline instead checks that the same probes are answered. "
      "Tables give median (min–max) over counted trials and the count counted/run.")
    w("")
    if res.not_run:
        w("## Not run\n")
        for k, v in sorted(res.not_run.items()):
            w(f"- {k}: not run: {v}")
        w("")
    w("## Targets\n")
    w("| target | measured | verdict | basis |")
    w("|---|---|---|---|")
    for row in targets(r):
        w("| " + " | ".join(row) + " |")
    analysis = out / "ANALYSIS.md"
    if analysis.exists():
        w("\n" + analysis.read_text().strip() + "\n")
    w("")

    # B1
    w("## B1 per-packet program cost (BPF_PROG_TEST_RUN, from-container program)\n")
    w("Kernel-measured ns/packet (median over repetitions). *established*: the same allowed "
      "packet repeated, so the verdict cached in the CT entry decides (a connection's steady "
      "state); *policy, hot key*: packets with the proxy-upstream mark, which the program "
      "never answers from the CT cache, so each runs the full policy lookup; *policy, random "
      "keys*: the same with peers drawn uniformly from the N (100 repetitions per draw).\n")
    kinds = ("ebpf-established", "ebpf-policy-hot", "ebpf-policy-random")
    w("| N | established | policy, hot key | policy, random keys | counted |")
    w("|---|---|---|---|---|")
    for n in sorted({t.n for t in res.trials if t.bench == "B1"}):
        cells = [mmm(_vals(r.counted("B1", k, n), "ns_per_packet")) for k in kinds]
        cnt = sum(len(r.counted("B1", k, n)) for k in kinds)
        tot = sum(len(r.all("B1", k, n)) for k in kinds)
        w(f"| {n:,} | " + " | ".join(cells) + f" | {cnt}/{tot} |")
    w("")

    # B2/B3/B4
    for metric, title, bench in (("udp_rr", "UDP request/response", "B2"),
                                 ("tcp_rr", "TCP request/response", "B2"),
                                 ("flood_pps", "64-byte UDP flood (pps received)", "B3")):
        w(f"## {bench} {title}\n")
        base = r.baseline(metric)
        w(f"No policy: {mmm(_vals(r.counted('traffic', 'none', 0), metric))} "
          f"({_counted_cell(r, 'traffic', 'none', 0)} counted)\n")
        w("| condition | N | rate | ratio to no policy | counted |")
        w("|---|---|---|---|---|")
        for cond in DP_CONDS:
            for n in r.sizes("traffic", cond):
                xs = _vals(r.counted("traffic", cond, n), metric)
                x = ratio(med(xs), base)
                w(f"| {LABEL[cond]} | {n:,} | {mmm(xs)} | {fmt(x)} | "
                  f"{_counted_cell(r, 'traffic', cond, n)} |")
        w("")
    w("## B4 connect/request/response/close (tcp_crr), TCP RR beside it as the control\n")
    w("| condition | N | CRR tps | CRR ratio | RR tps | RR ratio | counted |")
    w("|---|---|---|---|---|---|---|")
    w(f"| {LABEL['none']} | – | {mmm(_vals(r.counted('traffic', 'none', 0), 'tcp_crr'))} | 1.00 | "
      f"{mmm(_vals(r.counted('traffic', 'none', 0), 'tcp_rr'))} | 1.00 | "
      f"{_counted_cell(r, 'traffic', 'none', 0)} |")
    for cond in ("ebpf", "iptables-stateful", "iptables-plain"):
        for n in r.sizes("traffic", cond):
            tr = r.counted("traffic", cond, n)
            crr, rr = _vals(tr, "tcp_crr"), _vals(tr, "tcp_rr")
            w(f"| {LABEL[cond]} | {n:,} | {mmm(crr)} | {fmt(ratio(med(crr), r.baseline('tcp_crr')))}"
              f" | {mmm(rr)} | {fmt(ratio(med(rr), r.baseline('tcp_rr')))} | "
              f"{_counted_cell(r, 'traffic', cond, n)} |")
    w("")

    # B5/B6
    w("## B5 one policy change with N entries present\n")
    w("`Datapath.apply` of a one-entry `MapChanges` (an allow for an identity that has an "
      "ipcache entry, then its removal; both timed) on an endpoint whose N-entry policy is "
      "loaded; after the first add `dump()` must hold the key and after the last delete not.\n")
    w("| condition | N | p50 | p99 | samples | enforced |")
    w("|---|---|---|---|---|---|")
    for cond in ("ebpf", "iptables-plain", "iptables-ipset"):
        for n in r.sizes("B5", cond):
            for t in r.all("B5", cond, n):
                w(f"| {LABEL[cond]} | {n:,} | {fmt(t.metrics.get('p50_s'), 's')} | "
                  f"{fmt(t.metrics.get('p99_s'), 's')} | {int(t.metrics.get('samples', 0))} | "
                  f"{'yes' if t.enforced else 'NO ' + (t.error or t.proof)} |")
    w("\n**Through the agent** (`axoneme agent run`, pods made with `axoneme pod run`; each "
      "agent, eBPF and iptables alike, runs in a network namespace of its own that plays the "
      "node, entered with `nsenter --net`: its chains, tc filters, routes and pods live there, "
      "so the iptables agents need no host lock and never meet the cluster's agent): the "
      "server pod has a CiliumNetworkPolicy allowing N `fromCIDR` /32 peers (fake addresses); "
      "a prober in the client pod sends a UDP request carrying its sequence number every "
      "100 µs on eBPF, 2 ms on iptables (whose rule walk would otherwise make the prober's "
      "denied packets the bottleneck) (ppoll), keeps when each send returned, and prints, for "
      "the first request answered, that time and the echo's (CLOCK_MONOTONIC); the clock "
      "starts right before `POST /v1/policies` of a policy allowing the client pod "
      "(`fromEndpoints`). *End to end* stops when the send of the first request the kernel let "
      "through returned: on a veth the whole path, the datapath's verdict included, runs "
      "inside that send (the sending CPU's softirq), so that is when the kernel enforced the "
      "change, at most one probe gap after it did. *Echo* stops when that request's answer "
      "reached the prober: it adds the echo server's and the prober's wake-ups (rows before "
      "2026-12-05 10:30 UTC measured end to end this way, the echo only). The client is "
      "checked to be "
      "denied before every change; the policy is deleted (and the denial observed) between "
      "rounds. *API* is the POST's own duration (the agent applies synchronously; it also "
      "waits for the fdatasync of the state journal, which the kernel update does not). "
      "*Base policy load* is the POST of the N-peer policy until it returns; `endpoint get` "
      "then proves the kernel's copy equals the computed policy (not timed). A cell takes "
      "20 samples on eBPF and 10 on iptables, fewer when its rounds run past the time budget "
      "(at least 3 once a cell passes 45 s, at least 1 once it passes 300 s: an iptables change "
      "at 50k-100k peers takes seconds to minutes, and the *samples* column says how many "
      "fitted).\n")
    w("| datapath | N | end to end p50 | p99 | echo p50 | API p50 | base policy load | samples "
      "| enforced |")
    w("|---|---|---|---|---|---|---|---|---|")
    for cond in ("ebpf", "iptables-plain", "iptables-ipset"):
        for n in r.sizes("B5", f"agent-{cond}"):
            for t in r.all("B5", f"agent-{cond}", n):
                w(f"| {LABEL[cond]} | {n:,} | {fmt(t.metrics.get('p50_s'), 's')} | "
                  f"{fmt(t.metrics.get('p99_s'), 's')} | {fmt(t.metrics.get('echo_p50_s'), 's')} | "
                  f"{fmt(t.metrics.get('api_p50_s'), 's')} | "
                  f"{fmt(t.metrics.get('base_apply_s'), 's')} | {int(t.metrics.get('samples', 0))} | "
                  f"{'yes' if t.enforced else 'NO ' + (t.error or t.proof)} |")
    for k, v in sorted(res.not_run.items()):
        if k.startswith("B5/"):
            w(f"\n- {k}: not run: {v}")
    w("")
    _agent_report().section(r, w)
    w("## B6 full resync of N entries (`Datapath.sync` from empty)\n")
    w("| condition | N | sync | dump matches |")
    w("|---|---|---|---|")
    for cond in ("ebpf", "iptables-plain", "iptables-ipset"):
        for n in r.sizes("B6", cond):
            for t in r.all("B6", cond, n):
                w(f"| {LABEL[cond]} | {n:,} | {fmt(t.metrics.get('sync_s'), 's')} | "
                  f"{'yes' if t.enforced else 'NO ' + (t.error or t.proof)} |")
    w("")
    w("## B7 start\n")
    for t in [t for t in res.trials if t.bench == "B7" and t.condition == "ebpf-datapath"]:
        w(f"- eBPF datapath: compile + load (`start()`) {fmt(t.metrics.get('compile_s'), 's')}; "
          f"populate {t.n:,} entries (`sync`) {fmt(t.metrics.get('populate_s'), 's')}; process RSS "
          f"afterwards {t.metrics.get('rss_mb', 0):.0f} MB (grew {t.metrics.get('rss_growth_mb', 0):.0f} MB); "
          f"{'verified by dump()' if t.enforced else 'NOT verified: ' + (t.error or t.proof)}")
    w("\n`axoneme agent run` until `/v1/healthz` answers (fresh state dir each time), and the "
      "agent's RSS then:\n")
    w("| datapath | ready | RSS | runs ok |")
    w("|---|---|---|---|")
    for cond in ("ebpf", "iptables-plain", "iptables-ipset"):
        ts = [t for t in res.trials if t.bench == "B7" and t.condition == f"agent-{cond}"]
        ok = [t for t in ts if t.enforced]
        errs = sorted({t.error for t in ts if t.error})
        w(f"| {LABEL[cond]} | {mmm(_vals(ok, 'ready_s'), 's')} | {mmm(_vals(ok, 'rss_mb'))} MB | "
          f"{len(ok)}/{len(ts)}{' — not run: ' + '; '.join(e[:200] for e in errs) if errs else ''} |")
    w("")
    w("## B8 the ipset control\n")
    w("The ipset mode renders one `-m set --match-set` rule per peer identity, so the chain "
      "is as long as in plain mode: a set per identity does not collapse the rule walk for "
      "identity-per-rule policies. Its rows in B2/B3/B5/B6 above are reported as they are.\n")
    L.extend(_agent_report("xnode_report").section(sys.modules[__name__], r, out))
    w("## Charts\n")
    for c in charts:
        w(f"![{c}]({c})")
    w("")
    w("## Trials that did not count\n")
    bad = [t for t in res.trials if t.error or not t.enforced]
    if not bad:
        w("None: every trial proved enforcement.")
    for t in bad:
        w(f"- {t.bench} {t.condition} N={t.n} rep {t.rep}: {t.error or t.proof}")
    w("\nRaw per-trial data, with each trial's enforcement proof: `results.json`.")
    (out / "README.md").write_text("\n".join(L) + "\n")


def _charts(r: _R, out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return []
    names = []
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (metric, title) in zip(axes.flat, TRAFFIC, strict=True):
        base = r.baseline(metric)
        for cond in DP_CONDS:
            pts = [(n, ratio(r.traffic_median(cond, n, metric), base))
                   for n in r.sizes("traffic", cond)]
            pts = [(n, y) for n, y in pts if y is not None]
            if pts:
                ax.plot([n for n, _ in pts], [y for _, y in pts], marker="o", label=LABEL[cond])
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        ax.axhline(0.8, color="red", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_ylim(bottom=0)
        ax.set_title(title)
        ax.set_xlabel("N rules/entries")
        ax.set_ylabel("ratio to no policy")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "ratio_vs_n.png", dpi=110)
    plt.close(fig)
    names.append("ratio_vs_n.png")

    fig, ax = plt.subplots(figsize=(7, 5))
    for cond in ("ebpf", "iptables-plain", "iptables-ipset", "agent-ebpf",
                 "agent-iptables-plain", "agent-iptables-ipset"):
        pts = [(n, med(_vals(r.counted("B5", cond, n), "p50_s")),
                med(_vals(r.counted("B5", cond, n), "p99_s"))) for n in r.sizes("B5", cond)]
        pts = [x for x in pts if x[1] is not None]
        if pts:
            name = ("agent, " + LABEL[cond[6:]]) if cond.startswith("agent-") else LABEL[cond]
            line = ax.plot([x[0] for x in pts], [x[1] for x in pts],
                           marker="s" if cond.startswith("agent-") else "o",
                           label=f"{name} p50")[0]
            ax.plot([x[0] for x in pts], [x[2] for x in pts], ls="--", color=line.get_color(),
                    label=f"{name} p99")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("N entries present")
    ax.set_ylabel("one-change latency (s)")
    ax.set_title("B5 one policy change: Datapath.apply (o), agent API to traffic (s)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "update_latency.png", dpi=110)
    plt.close(fig)
    names.append("update_latency.png")

    fig, ax = plt.subplots(figsize=(7, 5))
    for kind in ("ebpf-established", "ebpf-policy-hot", "ebpf-policy-random"):
        sizes = sorted({t.n for t in r.res.trials if t.bench == "B1" and t.condition == kind})
        pts = [(n, med(_vals(r.counted("B1", kind, n), "ns_per_packet"))) for n in sizes]
        pts = [x for x in pts if x[1] is not None]
        if pts:
            ax.plot([x[0] for x in pts], [x[1] for x in pts], marker="o", label=kind[5:])
    ax.set_xscale("log")
    ax.set_xlabel("N policy entries")
    ax.set_ylabel("ns per packet")
    ax.set_ylim(bottom=0)
    ax.set_title("B1 from-container program cost (BPF_PROG_TEST_RUN)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "b1_prog_cost.png", dpi=110)
    plt.close(fig)
    names.append("b1_prog_cost.png")
    return names
