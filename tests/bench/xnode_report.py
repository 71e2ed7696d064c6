"""Report pieces for XNODE, cross-node traffic through agents (see xnode.py):
its tables, ratios and targets. Used by report.py (``R`` is that module)."""

from __future__ import annotations

from typing import Any

METRICS = (("udp_rr", "UDP RR (tps)"), ("tcp_rr", "TCP RR (tps)"),
           ("flood_pps", "64-byte flood (pps received)"))
CONDS = ("ebpf", "iptables-plain", "iptables-ipset")
# the single-node targets (B2/B3), held against the cross-node path too
TARGETS = (("udp_rr", "UDP RR", 3.0), ("tcp_rr", "TCP RR", 3.0), ("flood_pps", "flood", 10.0))


def _modes(r: Any) -> list[str]:
    found = {t.condition.split("/", 1)[1] for t in r.res.trials if t.bench == "XNODE"}
    return [m for m in ("native", "tunnel") if m in found]


def _med(R: Any, r: Any, cond: str, mode: str, n: int, metric: str) -> float | None:
    return R.med(R._vals(r.counted("XNODE", f"{cond}/{mode}", n), metric))


def _same_reps(R: Any, r: Any, mode: str, n: int, metric: str) -> float | None:
    """eBPF with the uplink as a device over eBPF, both from the repetitions that ran
    the device condition (it may come from a run of its own, merged in)."""
    dev = r.counted("XNODE", f"ebpf-devices/{mode}", n)
    reps = {t.rep for t in dev}
    plain = [t for t in r.counted("XNODE", f"ebpf/{mode}", n) if t.rep in reps]
    return R.ratio(R.med(R._vals(dev, metric)), R.med(R._vals(plain, metric)))


def targets(R: Any, r: Any) -> list[tuple[str, str, str, str]]:
    rows = []
    for mode in _modes(r):
        for metric, name, want in TARGETS:
            x = R.ratio(_med(R, r, "ebpf", mode, 10_000, metric),
                        _med(R, r, "iptables-plain", mode, 10_000, metric))
            rows.append((f"XNODE cross-node ({mode}) eBPF / iptables-plain at N=10k >= "
                         f"{want:.0f}x ({name})", "–" if x is None else f"{x:.2f}x",
                         "not measured" if x is None else ("met" if x >= want else "MISSED"),
                         "medians of counted trials, agents in two node namespaces"))
    return rows


def section(R: Any, r: Any, out: Any = None) -> list[str]:
    """The section; ``out``/xnode-reading.md (hand-written, after a run) follows it."""
    res = r.res
    if not any(t.bench == "XNODE" for t in res.trials):
        return []
    plan = res.extra.get("xnode_plan", {})
    L: list[str] = []
    w = L.append
    w("## XNODE cross-node pod traffic through the agents\n")
    w("Two nodes are network namespaces of ours joined by a bridge in a third (none has a "
      "default route: the host's network is never involved); each node runs its own "
      "`axoneme agent run` (`nsenter --net`, its own state dir, socket and bpffs root) of the "
      "condition's datapath, and `axoneme pod run` wires its pods: node a holds the client and "
      "an intruder, node b the server. The nodes route each other's pod CIDR with the agent's "
      "own `NodeRouting`: *native* (a route via the other node's address) or *tunnel* (VXLAN "
      "device `axon_vxlan`, UDP 8472, VNI 1, for every datapath: the eBPF identity-in-VNI device "
      "needs identities shared by the nodes, i.e. Kubernetes mode). Packets cross two node "
      "namespaces, a bridge and both nodes' datapaths (the client's veth on node a, where no "
      "policy selects it, and the server's ingress on node b).\n")
    w("The server's agent knows the client through its ipcache: a standalone agent has no "
      "Pod objects of other nodes, so the client's /32 is a `fromCIDR` peer (a CIDR identity). "
      "Node b's policy: N fake peers (/32s in 10.244.128.0/17, one identity each, TCP/UDP "
      "alternating on the service port: N entries), applied first, then the client's own /32 "
      "on the service port (TCP, UDP) and the sink port (UDP). Every (condition, N) gets fresh "
      "nodes and agents, so the client's identity is the newest and the iptables renderer puts "
      "its rules after the N peers' (checked from `iptables-save` inside node b in every "
      "counted trial). A trial counts only if the allowed runs succeeded, node b's kernel held "
      "the policy (`endpoint get`: in_sync, >= N entries) and the intruder (UDP and TCP) and "
      "the client on a port nobody is allowed on were dropped; *no policy* (agents with the "
      "noop datapath) requires the same probes answered. Traffic as B2/B3 (`loadgen`, RR "
      "client and server on CPU 0, flood sender on CPU 1 and sink on CPU 0).\n")
    loads = res.extra.get("xnode_load", [])
    w(f"- plan: {plan.get('reps', '?')} repetitions, {plan.get('seconds', '?')} s per "
      f"measurement, N {plan.get('sizes', '?')}, routing {plan.get('modes', '?')}; each "
      "repetition runs every (condition, N) in a fresh shuffled order, both routing modes "
      "(shuffled) on the same nodes")
    if loads:
        w(f"- load average (1/5/15 min) at the start of XNODE: {loads[0]}, at its end: "
          f"{loads[-1]} (2 shared vCPUs: other sessions' test runs ran beside it)")
    setups = res.extra.get("xnode_setup_s", {})
    if setups:
        w("- nodes + agents + pods ready (median s): " + ", ".join(
            f"{R.LABEL[c]} {R.med(v):.1f}" for c, v in sorted(setups.items())))
    w("")
    for mode in _modes(r):
        w(f"### XNODE {mode} routing: rates, median (min–max) of counted trials\n")
        w("| condition | N | " + " | ".join(t for _, t in METRICS) +
          " | policy load | both agents' CPU during traffic | counted |")
        w("|---|---|---|---|---|---|---|---|")
        for cond in ("none", "ebpf", "ebpf-devices", *CONDS[1:]):
            for n in r.sizes("XNODE", f"{cond}/{mode}"):
                ok = r.counted("XNODE", f"{cond}/{mode}", n)
                cells = [R.mmm(R._vals(ok, m)) for m, _ in METRICS]
                load = R.fmt(R.med(R._vals(ok, "setup_s")), "s") if cond != "none" else "–"
                cpu = R.med(R._vals(ok, "agents_cpu_pct"))
                w(f"| {R.LABEL[cond]} | {n:,} | " + " | ".join(cells) + f" | {load} | "
                  + ("–" if cpu is None else f"{cpu:.1f} %") +
                  f" | {len(ok)}/{len(r.all('XNODE', f'{cond}/{mode}', n))} |")
        w("")
        dev = bool(r.sizes("XNODE", f"ebpf-devices/{mode}"))
        w(f"Ratios ({mode}), medians: eBPF over each, and each over no policy\n")
        w("| N | metric | eBPF / no policy | eBPF / iptables plain | eBPF / iptables ipset | "
          "iptables plain / no policy | iptables ipset / no policy |"
          + (" eBPF, uplink a device / eBPF (same repetitions) |" if dev else ""))
        w("|---|---|---|---|---|---|---|" + ("---|" if dev else ""))
        base = {m: _med(R, r, "none", mode, 0, m) for m, _ in METRICS}
        sizes = sorted({n for c in CONDS for n in r.sizes("XNODE", f"{c}/{mode}")})
        for n in sizes:
            for m, title in METRICS:
                v = {c: _med(R, r, c, mode, n, m) for c in CONDS}
                cells = [R.ratio(v["ebpf"], base[m]), R.ratio(v["ebpf"], v["iptables-plain"]),
                         R.ratio(v["ebpf"], v["iptables-ipset"]),
                         R.ratio(v["iptables-plain"], base[m]),
                         R.ratio(v["iptables-ipset"], base[m])]
                if dev:
                    cells.append(_same_reps(R, r, mode, n, m))
                w(f"| {n:,} | {title} | " + " | ".join(
                    "–" if x is None else f"{x:.2f}" for x in cells) + " |")
        w("")
    reading = out / "xnode-reading.md" if out is not None else None
    if reading is not None and reading.exists():
        w(reading.read_text().strip() + "\n")
    return L
