"""Kubernetes-mode benchmarks on the local cluster (scripts/cluster): README table.

    scripts/bench-k8s [--datapath ebpf|iptables] [--pods 50] [--policies 20]
                      [--api-pods 1000] [--out bench-results/k8s]
                      [--scale-sizes 100,1000,5000] [--only all|scale|ready] [--rounds 2]

- ``cluster up`` warm: ``scripts/cluster down`` then ``up`` with every build and
  image cached (the cold figure, with nothing built, is the build's: see
  docs/kubernetes.md);
- pod create -> Ready: N agnhost pods created one after another in a fresh
  namespace; each from the create call's return to its Ready condition seen by a
  watch (client clock, milliseconds; the API's own timestamps have 1 s
  resolution);
- ``kubectl apply`` of a policy -> enforced in the kernel: a client pod probes a
  server in a tight loop (``agnhost connect``, 50 ms timeout) and stamps each
  probe's start with /proc/uptime, the host's clock too; a deny policy is
  applied and the latency is from just before ``kubectl apply`` to the start of
  the first probe that was dropped. Repeated (deny, delete, back to allowed);
- agent RSS with many pods: the agent's resident set (its process, seen from the
  host) with N pods in the API besides the running ones (bound to another node
  name, so they never run here, but the agent caches them all as it must for
  cluster-wide identities).

- scale (k8s_converge.py): 1,000 pod events and 100 policy changes written
  concurrently -> the exact kernel state; the agent's CPU per pod event at
  100 / 1,000 / 5,000 pods in the API (``--only scale`` runs only these and
  keeps the other figures of --out's results.json).
- ready (k8s_ready.py, ``--only ready``): pod create -> Ready with the native
  CNI plugin the agent installed and with the Python plugin's zipapp in its
  place, interleaved, --rounds times, on the running cluster (up if it is not);
  the load average with each run; keeps the other figures.

Writes results.json and README.md (a table) under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import k8s_converge  # tests/bench/, this script's own directory
import k8s_ready
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
AGNHOST = "registry.k8s.io/e2e-test-images/agnhost:2.66.1"


def run(*cmd: str, input: str | None = None, timeout: float = 600,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(list(cmd), capture_output=True, text=True, input=input, timeout=timeout)
    if check and res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])}... failed ({res.returncode}): {res.stderr[-2000:]}")
    return res


class Kubectl:
    def __init__(self, kubeconfig: str) -> None:
        self.base = [str(REPO / ".cluster" / "bin" / "kubectl"), "--kubeconfig", kubeconfig]

    def __call__(self, *args: str, **kw) -> subprocess.CompletedProcess[str]:
        return run(*self.base, *args, **kw)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]


def summary(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50": round(pct(values, 50), 3), "p99": round(pct(values, 99), 3),
            "mean": round(statistics.fmean(values), 3), "max": round(max(values), 3)}


def cluster_up(datapath: str, fresh: bool) -> tuple[str, float]:
    if fresh:
        run(str(REPO / "scripts" / "cluster"), "down", timeout=600)
    t0 = time.monotonic()
    res = run(str(REPO / "scripts" / "cluster"), "up", "--datapath", datapath, timeout=1800)
    took = time.monotonic() - t0
    return res.stdout.strip().splitlines()[-1].split("=", 1)[1], took


def pod(ns: str, name: str, labels: dict, command: list[str], node: str | None = None) -> dict:
    spec: dict = {"terminationGracePeriodSeconds": 1,
                  "containers": [{"name": "c", "image": AGNHOST, "imagePullPolicy": "IfNotPresent",
                                  "command": command}]}
    if node:
        spec["nodeName"] = node
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels}, "spec": spec}


def bench_pod_ready(k: Kubectl, kubeconfig: str, n: int) -> list[float]:
    from kubernetes import client, config, watch

    ns = "bench-pods"
    k("create", "namespace", ns)
    api = client.CoreV1Api(config.new_client_from_config(config_file=kubeconfig))
    out = []
    try:
        for i in range(n):
            body = pod(ns, f"p{i}", {"bench": "ready"}, ["/agnhost", "pause"])
            w = watch.Watch()
            t0 = time.monotonic()
            created = api.create_namespaced_pod(ns, body)
            for ev in w.stream(api.list_namespaced_pod, ns, field_selector=f"metadata.name=p{i}",
                               resource_version=created.metadata.resource_version,
                               timeout_seconds=120):
                conds = ev["object"].status.conditions or []
                if any(c.type == "Ready" and c.status == "True" for c in conds):
                    out.append(time.monotonic() - t0)
                    w.stop()
            if len(out) != i + 1:
                raise SystemExit(f"pod p{i} not Ready within 120 s")
    finally:
        k("delete", "namespace", ns, "--wait=true", "--timeout=300s", check=False, timeout=400)
    return out


def bench_policy_enforced(k: Kubectl, reps: int) -> list[float]:
    ns = "bench-policy"
    objs = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}},
            pod(ns, "server", {"app": "server"}, ["/agnhost", "netexec", "--http-port=80"]),
            pod(ns, "client", {"app": "client"}, ["/agnhost", "pause"])]
    k("apply", "-f", "-", input=yaml.safe_dump_all(objs))
    deny = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "deny", "namespace": ns},
            "spec": {"podSelector": {"matchLabels": {"app": "server"}}, "policyTypes": ["Ingress"]}}
    out = []
    try:
        k("-n", ns, "wait", "--for=condition=Ready", "pod", "--all", "--timeout=180s", timeout=200)
        server = k("-n", ns, "get", "pod", "server", "-o", "jsonpath={.status.podIP}").stdout
        loop = (f"i=0; while [ $i -lt 400 ]; do t=$(cut -d' ' -f1 /proc/uptime); "
                f"if /agnhost connect {server}:80 --timeout=50ms --protocol=tcp >/dev/null 2>&1; "
                f"then echo \"$t ok\"; else echo \"$t no\"; [ -f /tmp/go ] && break; fi; "
                f"i=$((i+1)); done")
        for _ in range(reps):
            k("-n", ns, "exec", "client", "--", "rm", "-f", "/tmp/go")
            proc = subprocess.Popen([*k.base, "-n", ns, "exec", "client", "--", "sh", "-c", loop],
                                    stdout=subprocess.PIPE, text=True)
            time.sleep(1.0)
            with open("/proc/uptime") as f:
                t0 = float(f.read().split()[0])
            k("apply", "-f", "-", input=yaml.safe_dump(deny))
            k("-n", ns, "exec", "client", "--", "touch", "/tmp/go")
            lines = [ln.split() for ln in proc.communicate(timeout=120)[0].splitlines() if ln.strip()]
            dropped = [float(t) for t, r in lines if r == "no" and float(t) >= t0]
            if not dropped:
                raise SystemExit("the deny policy was never enforced")
            out.append(dropped[0] - t0)
            k("delete", "-f", "-", input=yaml.safe_dump(deny))
            time.sleep(1.5)
    finally:
        k("delete", "namespace", ns, "--wait=true", "--timeout=300s", check=False, timeout=400)
    return out


def agent_pid() -> int:
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            argv = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"agent" in argv and b"run" in argv and any(a.startswith(b"--k8s-") for a in argv):
            return int(d)
    raise SystemExit("no agent process in Kubernetes mode found")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def bench_agent_rss(k: Kubectl, n: int) -> dict[str, float]:
    ns = "bench-rss"
    k("create", "namespace", ns)
    pid = agent_pid()
    before = rss_mb(pid)
    try:
        pods = [pod(ns, f"r{i}", {"app": f"a{i % 50}", "tier": f"t{i % 7}"}, ["/agnhost", "pause"],
                    node="bench-elsewhere") for i in range(n)]
        for i in range(0, n, 200):
            k("apply", "-f", "-", input=yaml.safe_dump_all(pods[i:i + 200]), timeout=300)
        time.sleep(10)  # the agent's watch has them all
        after = rss_mb(pid)
    finally:
        k("delete", "namespace", ns, "--wait=false", check=False)
    return {"pods_in_api": n, "rss_mb_before": round(before, 1), "rss_mb_after": round(after, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/bench-k8s")
    ap.add_argument("--datapath", default="ebpf")
    ap.add_argument("--pods", type=int, default=50)
    ap.add_argument("--policies", type=int, default=20)
    ap.add_argument("--api-pods", type=int, default=1000)
    ap.add_argument("--out", default=str(REPO / "bench-results" / "k8s"))
    ap.add_argument("--scale-sizes", default="100,1000,5000",
                    help="pods in the API at which the agent's CPU per pod event is measured")
    ap.add_argument("--only", choices=("all", "scale", "ready"), default="all",
                    help="scale: only convergence under churn and CPU per pod event; ready: only "
                         "pod create -> Ready, native CNI plugin against the Python one "
                         "(the other figures are kept from --out's results.json)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="--only ready: rounds of --pods pods per plugin, interleaved")
    args = ap.parse_args(argv)
    results: dict = {"datapath": args.datapath, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                     "machine": f"{os.cpu_count()} cores, kernel {os.uname().release}"}
    out = Path(args.out)
    if args.only in ("scale", "ready"):
        results = {**results, **json.loads((out / "results.json").read_text()),
                   f"{args.only}_date": results["date"]}
        kubeconfig, _ = cluster_up(args.datapath, fresh=False)
    else:
        kubeconfig, warm = cluster_up(args.datapath, fresh=True)
        results["cluster_up_warm_s"] = round(warm, 1)
        print(f"cluster up (warm): {warm:.1f} s", flush=True)
    k = Kubectl(kubeconfig)
    if args.only == "all":
        results["pod_ready_s"] = summary(bench_pod_ready(k, kubeconfig, args.pods))
        print(f"pod create -> Ready: {results['pod_ready_s']}", flush=True)
        results["policy_enforced_s"] = summary(bench_policy_enforced(k, args.policies))
        print(f"kubectl apply -> enforced: {results['policy_enforced_s']}", flush=True)
        results["agent_rss"] = bench_agent_rss(k, args.api_pods)
        print(f"agent RSS: {results['agent_rss']}", flush=True)
    if args.only == "ready":
        runs = k8s_ready.run(lambda: bench_pod_ready(k, kubeconfig, args.pods), args.rounds)
        results["pod_ready_by_plugin"] = {
            kind: {**summary([v for r in rs for v in r["values"]]),  # type: ignore[attr-defined]
                   "runs_p50": [summary(r["values"])["p50"] for r in rs],  # type: ignore[arg-type]
                   "load": [r["load"] for r in rs]}
            for kind, rs in runs.items()}
    else:
        sizes = tuple(int(x) for x in args.scale_sizes.split(","))
        results["scale"] = k8s_converge.run(k, kubeconfig, agent_pid(), sizes)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    pr, pe, rss = results["pod_ready_s"], results["policy_enforced_s"], results["agent_rss"]
    sc = results["scale"]
    conv = sc["converge"]
    cpu = " / ".join(f"{r['cpu_ms_per_event']} ms at {r['pods']:,}" for r in sc["cpu_per_pod_event"])
    (out / "README.md").write_text(
        f"# Kubernetes-mode benchmarks ({results['date']}, {results['machine']}, "
        f"datapath {args.datapath})\n\nProduced by `scripts/bench-k8s`; see tests/bench/k8s_bench.py "
        f"for the method.\n\n| measure | p50 | p99 | n |\n|---|---|---|---|\n"
        f"| pod create -> Ready (s) | {pr['p50']} | {pr['p99']} | {pr['n']} |\n"
        f"| `kubectl apply` of a policy -> enforced in the kernel (s) | {pe['p50']} | {pe['p99']} "
        f"| {pe['n']} |\n\n| measure | value |\n|---|---|\n"
        f"| `scripts/cluster up`, warm (s) | {results['cluster_up_warm_s']} |\n"
        f"| agent RSS, {rss['pods_in_api']} pods in the API (MB) | {rss['rss_mb_after']} "
        f"(before: {rss['rss_mb_before']}) |\n"
        f"| {conv['pod_events']:,} pod events + {conv['policy_changes']} policy changes written "
        f"concurrently ({conv['writes_s']} s) -> the exact kernel state (s after the last write; "
        f"target <= 10) | {conv['converged_after_last_write_s']} |\n"
        f"| agent CPU per pod event, pods in the API ({cpu}; flat: max/min <= 1.5) | "
        f"max/min {sc['cpu_spread']} |\n\n"
        f"The scale rows ({results.get('scale_date', results['date'])}): "
        f"tests/bench/k8s_converge.py (pods of a Node without a kubelet, "
        f"the kernel read with bpftool from the pinned maps).\n" + ready_rows(results))
    return 0


def ready_rows(results: dict) -> str:
    """The --only ready table: pod create -> Ready by the CNI plugin containerd runs."""
    by = results.get("pod_ready_by_plugin")
    if not by:
        return ""
    rows = "".join(
        f"| {kind} | {r['p50']} | {r['p99']} | {r['n']} | {', '.join(map(str, r['runs_p50']))} | "
        f"{', '.join(f'{a}-{b}' for a, b in r['load'])} |\n" for kind, r in sorted(by.items()))
    return (f"\n## Pod create -> Ready by CNI plugin ({results.get('ready_date', results['date'])})\n\n"
            f"`scripts/bench-k8s --only ready` (tests/bench/k8s_ready.py): the native plugin the "
            f"agent installs as axoneme-cni, and the Python plugin's zipapp (axoneme-cni-python) "
            f"put in its place, interleaved on one cluster.\n\n"
            f"| plugin | p50 (s) | p99 (s) | n | p50 of each run (s) | load average (1 min, "
            f"before-after each run) |\n|---|---|---|---|---|---|\n{rows}")


if __name__ == "__main__":
    sys.exit(main())
