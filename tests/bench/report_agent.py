"""Report pieces for the agent at scale (issue 17): its read paths at each N,
its RSS and its restart adopting an N-identity state (see suite.py
``_views_timed`` / ``_agent_adopt``). Used by report.py."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from typing import Any

VIEWS = (("status_s", "status"), ("ep_list_s", "endpoint list"), ("pol_list_s", "policy list"),
         ("ep_get_s", "endpoint get"))
RSS_MAX_MB = 250.0
START_MAX_S = 2.0  # plus the datapath's own load (compile + attach)
FLAT_MAX = 3.0  # status/lists: slowest / fastest across N (each the best of 3 calls)
FLAT_FLOOR_S = 0.005  # ... or all under 5 ms (then noise decides the ratio)


def _ms(x: float | None) -> str:
    return "–" if x is None or math.isnan(x) else f"{x * 1e3:,.1f} ms"


def _cells(r: Any) -> list[Any]:
    return [t for n in r.sizes("B5", "agent-ebpf") for t in r.all("B5", "agent-ebpf", n)
            if not t.error]


def _adopts(r: Any) -> list[Any]:
    """The restart trials that finished, in the order they ran."""
    ts = [t for n in r.sizes("B5", "agent-ebpf-adopt") for t in r.all("B5", "agent-ebpf-adopt", n)]
    return sorted((t for t in ts if not t.error and "ready_s" in t.metrics), key=lambda t: t.rep)


def _adopt(r: Any) -> Any | None:
    """The restart trial with the median ready time (restart_adopt.py runs
    several in a row; the suite one)."""
    ts = [t for n in r.sizes("B5", "agent-ebpf-adopt") for t in r.all("B5", "agent-ebpf-adopt", n)]
    ok = sorted(_adopts(r), key=lambda t: t.metrics["ready_s"])
    if ok:
        return ok[(len(ok) - 1) // 2]
    return ts[-1] if ts else None


def _rebuilt(m: dict[str, float]) -> str:
    """An adopting restart's background rebuild (agent/_checkpoint.py)."""
    if not m.get("adopting"):
        return ""
    return (f"; it adopted the kernel's state (checkpoint and stamp matched): the policy "
            f"state was rebuilt and compared with the kernel in the background, every "
            f"request but /v1/healthz waiting for it, served from {m['rebuilt_s']:.2f} s")


def _split(m: dict[str, float]) -> str:
    """Anonymous / file-backed / proportional, when the trial recorded them."""
    if "rssanon_mb_before" not in m:
        return ""
    parts = [f"{when}: anon {m.get(f'rssanon_mb{sfx}', 0):.0f}, file {m.get(f'rssfile_mb{sfx}', 0):.0f}, "
             f"PSS {m.get(f'pss_mb{sfx}', 0):.0f} MB" for when, sfx in (("before", "_before"),
                                                                       ("after", ""))]
    return " (" + "; ".join(parts) + ")"


def targets(r: Any) -> list[tuple[str, str, str, str]]:
    rows: list[tuple[str, str, str, str]] = []
    cells = _cells(r)
    for key, name in VIEWS[:3]:
        vals = {t.n: t.metrics[key] for t in cells if key in t.metrics}
        if len(vals) < 2:
            rows.append((f"`{name}` O(1) in policy size", "–", "not measured", ""))
            continue
        spread = max(vals.values()) / max(min(vals.values()), 1e-9)
        ok = spread <= FLAT_MAX or max(vals.values()) <= FLAT_FLOOR_S
        rows.append((f"`{name}` O(1) in policy size (max/min <= {FLAT_MAX:g} or all <= "
                     f"{FLAT_FLOOR_S * 1e3:g} ms)", f"{spread:.2f}", "met" if ok else "MISSED",
                     ", ".join(f"N={n:,}: {_ms(v)}" for n, v in sorted(vals.items()))))
    gets = {t.n: t.metrics["ep_get_s"] for t in cells if "ep_get_s" in t.metrics}
    if gets:
        big = max(gets)
        per = gets[big] / (2 * big)  # the server endpoint holds 2N entries (TCP, UDP)
        rows.append(("`endpoint get` O(that endpoint's entries), from the computed state",
                     f"{per * 1e6:.1f} µs/entry at N={big:,}", "see basis",
                     ", ".join(f"N={n:,}: {_ms(v)}" for n, v in sorted(gets.items()))
                     + "; it also dumps the kernel's copy to report in_sync (the CLI contract)"))
    t = _adopt(r)
    if t is None or t.error:
        why = t.error if t is not None else "no run"
        rows.append((f"100k-identity agent RSS <= {RSS_MAX_MB:.0f} MB", "–", "not measured", why))
        rows.append((f"agent start adopting 100k identities <= {START_MAX_S:g} s + datapath load",
                     "–", "not measured", why))
        return rows
    m = t.metrics
    rss = max(m.get("rss_mb_before", 0.0), m.get("rss_mb", 0.0))
    basis = (f"before the restart {m.get('rss_mb_before', 0):.0f} MB, after it "
             f"{m.get('rss_mb', 0):.0f} MB" + _split(m))
    runs = _adopts(r)
    if len(runs) > 1:  # restarts in a row: the first one's agent loaded the policy (the API)
        before = runs[0].metrics.get("rss_mb_before", 0.0)
        after = statistics.median(x.metrics.get("rss_mb", 0.0) for x in runs)
        rss = max(before, after)
        basis = (f"before the first restart {before:.0f} MB (the agent that loaded the policy "
                 f"through the API), after each adopting restart "
                 + " / ".join(f"{x.metrics.get('rss_mb', 0):.0f}" for x in runs)
                 + f" MB, median {after:.0f} MB; the median-ready one's" + _split(m))
    rows.append((f"{t.n // 1000}k-identity agent RSS <= {RSS_MAX_MB:.0f} MB", f"{rss:.0f} MB",
                 "met" if rss <= RSS_MAX_MB else "MISSED",
                 f"{int(m.get('identities', 0)):,} identities (N CIDR identities); " + basis))
    load = m.get("datapath_load_s", float("nan"))
    own = m["ready_s"] - (0.0 if math.isnan(load) else load)
    rows.append((f"agent start adopting {t.n // 1000}k identities <= {START_MAX_S:g} s + "
                 f"datapath load", f"{own:.2f} s + {load:.2f} s",
                 "met" if own <= START_MAX_S and t.enforced else "MISSED",
                 f"SIGTERM, `agent run` again until /v1/healthz answers ({m['ready_s']:.2f} s); "
                 f"datapath load = its compile_seconds metric{_rebuilt(m)}; {t.proof}"))
    return rows


def section(r: Any, w: Callable[[str], None]) -> None:
    cells = _cells(r)
    if not cells:
        return
    w("**The agent's read paths at each N** (eBPF agent above, N-peer policy in force; "
      "best of 3 calls, endpoint get once; the base load's CPU is the agent process's "
      "user + system time for the POST, which a loaded machine does not inflate):\n")
    w("| N | base load | its CPU | " + " | ".join(name for _, name in VIEWS) + " |")
    w("|---|---|---|" + "---|" * len(VIEWS))
    for t in cells:
        cpu = t.metrics.get("base_apply_cpu_s")
        w(f"| {t.n:,} | {t.metrics.get('base_apply_s', 0):.2f} s | "
          f"{'–' if cpu is None else f'{cpu:.2f} s'} | "
          + " | ".join(_ms(t.metrics.get(k)) for k, _ in VIEWS) + " |")
    t = _adopt(r)
    if t is not None:
        m = t.metrics
        w(f"\n**Restart adopting the N={t.n:,} state** (SIGTERM, then `agent run` on the same "
          f"state dir and pinned maps): ready in {m.get('ready_s', float('nan')):.2f} s, of "
          f"which the datapath's compile/load {m.get('datapath_load_s', float('nan')):.2f} s"
          f"{_rebuilt(m)}; "
          f"RSS {m.get('rss_mb_before', 0):.0f} MB before, {m.get('rss_mb', 0):.0f} MB after"
          f"{_split(m)}; "
          f"{t.proof if not t.error else 'FAILED: ' + t.error}.")
    w("")
