"""scripts/k8s-e2e: upstream Kubernetes' NetworkPolicy e2e tests against axoneme.

    scripts/k8s-e2e [--datapath ebpf|iptables] [--iptables-mode plain|ipset]
                    [--nodes 1|2|3] [--routing-mode native|tunnel]
                    [--focus REGEX] [--skip REGEX] [--subset ci] [--keep-cluster]
                    [--results DIR]

1. `scripts/k8s-build --with-e2e`: upstream's e2e.test from the same pinned
   Kubernetes as the cluster (cached outside the repository);
2. `scripts/cluster up --datapath ...` (a cluster on another datapath is
   brought down and up again);
3. e2e.test with Ginkgo's focus on the NetworkPolicy tests (the `Netpol`
   suite: `[Feature:NetworkPolicy]`, UDP, SCTP where the kernel has it, and the
   API tests), its JUnit report in the results directory;
4. the differential (scripts/_k8s_differential.py): while the tests run, the
   cluster's states and the kernel's verdicts (the agent's flows) are
   recorded; afterwards every pod-to-pod attempt is decided offline by the
   engine of `axoneme policy trace/matrix` with the state it happened in, and
   each disagreement is listed (differential.json; `--no-differential` leaves
   it out);
5. the per-test outcome and the summary (date, versions, datapath, duration,
   the differential's counts) as results.json and README.md there; the last
   line printed is `N passed, M failed, K skipped`. Exit 0 only when nothing
   failed and the engine agreed with the kernel on every attempt.

Only tests the focus selects are counted: a spec Ginkgo filtered out is not
"skipped". A test the suite skips itself (e.g. SCTP when the kernel has no
SCTP module) is listed with the suite's reason. --subset ci is the bounded
set CI runs (the CIDR tests, a named port, namespace selectors, default deny).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _k8s_differential as differential  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / ".cluster"
DEFAULT_RESULTS = REPO / "conformance-results"
# every NetworkPolicy test of upstream's suite (test/e2e/network/netpol)
FOCUS = r"\[sig-network\] Netpol "
# what CI runs: issue 16's representative subset
CI_SUBSET = (
    r"should allow egress access to server in CIDR block",
    r"should enforce except clause while egress access to server in CIDR block",
    r"should ensure an IP overlapping both IPBlock.CIDR and IPBlock.Except is allowed",
    r"should allow ingress access on one named port",
    r"should enforce policy to allow traffic only from a different namespace, based on NamespaceSelector",
    r"should support a 'default-deny-ingress' policy",
    r"should support a 'default-deny-all' policy",
)


def say(msg: str) -> None:
    print(f"k8s-e2e: {msg}", flush=True)


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    say("$ " + " ".join(cmd))
    return subprocess.run(cmd, text=True, **kw)  # type: ignore[call-overload]


def build() -> Path:
    res = run([str(REPO / "scripts" / "k8s-build"), "--with-e2e"])
    if res.returncode != 0:
        raise SystemExit("k8s-e2e: error: scripts/k8s-build --with-e2e failed")
    out = subprocess.run([str(REPO / "scripts" / "k8s-build"), "--print-dir"], text=True,
                         capture_output=True, check=True).stdout.strip().splitlines()[-1]
    return Path(out)


def cluster_up(datapath: str, mode: str, nodes: int = 1, routing: str = "native") -> None:
    res = run([str(REPO / "scripts" / "cluster"), "up", "--datapath", datapath,
               "--iptables-mode", mode, "--nodes", str(nodes), "--routing-mode", routing])
    if res.returncode != 0:
        raise SystemExit("k8s-e2e: error: scripts/cluster up failed")


def sctp_available() -> bool:
    """The kernel's SCTP (loaded or loadable): without it the suite's SCTP tests fail
    for lack of a socket, not of policy, so they are only selected with it."""
    import socket

    try:  # the kernel loads the module on the first SCTP socket when it has one
        socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_SCTP).close()
        return True
    except OSError:
        return False


SUITE_NODES = ("[SynchronizedBeforeSuite]", "[SynchronizedAfterSuite]", "[ReportAfterSuite]",
               "[ReportBeforeSuite]", "[BeforeSuite]", "[AfterSuite]")


def filtered_out(case: ET.Element) -> bool:
    """A spec the focus/skip filtered out (Ginkgo's bare "skipped"): not part of the run.
    A skip the suite decides itself carries its reason."""
    skipped = case.find("skipped")
    return skipped is not None and (skipped.get("message") or "") in ("", "skipped")


def parse_junit(path: Path) -> list[dict[str, str]]:
    """The outcome of each test the run selected (Ginkgo's JUnit report); a suite
    node (before/after suite) only when it failed."""
    out = []
    for case in ET.parse(path).getroot().iter("testcase"):
        if filtered_out(case):
            continue
        name = case.get("name") or ""
        fail = case.find("failure")
        if fail is None:
            fail = case.find("error")
        skipped = case.find("skipped")
        if name.startswith(SUITE_NODES) and fail is None:
            continue
        outcome, why = (("failed", fail) if fail is not None else
                        ("skipped", skipped) if skipped is not None else ("passed", None))
        out.append({"name": name, "outcome": outcome,
                    "message": ((why.get("message") or "") if why is not None else "")[:2000],
                    "time_s": case.get("time") or "0"})
    return out


def write_results(dest: Path, summary: dict[str, object], tests: list[dict[str, str]]) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "results.json").write_text(json.dumps({**summary, "tests": tests}, indent=2) + "\n")
    lines = [f"# Upstream NetworkPolicy e2e: {summary['datapath']}", "",
             f"- date: {summary['date']}", f"- Kubernetes (e2e.test and cluster): {summary['kubernetes']}",
             f"- axoneme: {summary['axoneme']}", f"- focus: `{summary['focus']}`",
             f"- skip: `{summary['skip'] or '-'}`",
             *([f"- left out for a missing machine capability: {summary['left_out']}"]
               if summary.get("left_out") else []),
             f"- duration: {summary['duration_s']} s",
             f"- **{summary['passed']} passed, {summary['failed']} failed, {summary['skipped']} skipped**",
             *_differential_lines(summary.get("differential")),
             "", "| test | outcome | s |", "|---|---|---|"]
    for t in sorted(tests, key=lambda t: t["name"]):
        name = t["name"].replace("[It] ", "").replace("|", "\\|")
        why = f" ({t['message'].splitlines()[0][:120]})" if t["outcome"] != "passed" and t["message"] else ""
        lines.append(f"| {name} | {t['outcome']}{why} | {float(t.get('time_s') or 0):.0f} |")
    (dest / "README.md").write_text("\n".join(lines) + "\n")


def _differential_lines(d: object) -> list[str]:
    if not isinstance(d, dict):
        return []
    lines = [f"- differential (`axoneme policy trace` offline vs the kernel, every pod-to-pod "
             f"attempt the tests made, in the cluster state it was made in): "
             f"**{d['connections']} connections, {d['attempts']} attempts, {d['states_with_attempts']} "
             f"states, {len(d['disagreements'])} disagreements** (differential.json)"]
    for x in d["disagreements"][:20]:
        lines.append(f"  - {x['from']} -> {x['to']} {x['port']}/{x['protocol']}: kernel {x['kernel']}, "
                     f"engine {x['engine']}")
    return lines


def write_junit(path: Path, junits: list[Path]) -> None:
    """Ginkgo's JUnit report without the specs the focus filtered out."""
    out = ET.Element("testsuites")
    for j in junits:
        for suite in ET.parse(j).getroot().iter("testsuite"):
            keep = ET.SubElement(out, "testsuite", {k: v for k, v in suite.attrib.items()
                                                   if k in ("name", "package", "time", "timestamp")})
            n = 0
            for case in suite.iter("testcase"):
                if filtered_out(case):
                    continue
                keep.append(case)
                n += 1
            keep.set("tests", str(n))
    ET.indent(out)
    ET.ElementTree(out).write(path, encoding="unicode", xml_declaration=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/k8s-e2e", description=__doc__.split("\n\n")[0])
    p.add_argument("--datapath", choices=("ebpf", "iptables"), default="ebpf")
    p.add_argument("--iptables-mode", choices=("plain", "ipset"), default="plain")
    p.add_argument("--nodes", type=int, choices=(1, 2, 3), default=1,
                   help="the cluster's nodes (scripts/cluster up --nodes; default 1)")
    p.add_argument("--routing-mode", choices=("native", "tunnel"), default="native",
                   help="how pods reach each other across nodes (with --nodes 2 or 3)")
    p.add_argument("--focus", help="run only the NetworkPolicy tests whose name matches REGEX")
    p.add_argument("--skip", help="leave out the tests whose name matches REGEX")
    p.add_argument("--subset", choices=("ci",), help="ci: the bounded subset CI runs")
    p.add_argument("--keep-cluster", action="store_true",
                   help="leave the cluster up afterwards (default: leave it as found)")
    p.add_argument("--no-differential", dest="differential", action="store_false",
                   help="do not record the cluster's states and flows to compare with the engine")
    p.add_argument("--results", type=Path, help="results directory (default: "
                   "conformance-results/<datapath>, or a temporary one for --focus/--subset)")
    args = p.parse_args(argv)
    for what in ("focus", "skip"):
        value = getattr(args, what)
        if value:
            try:
                re.compile(value)
            except re.error as e:
                print(f"k8s-e2e: error: --{what} {value!r}: not a regular expression: {e}",
                      file=sys.stderr)
                return 2
    if os.geteuid() != 0:
        print("k8s-e2e: needs root (it brings the cluster up)", file=sys.stderr)
        return 1
    label = args.datapath if args.datapath == "ebpf" else f"iptables-{args.iptables_mode}"
    if args.nodes > 1:
        label += f"-{args.nodes}nodes" + ("-tunnel" if args.routing_mode == "tunnel" else "")
    partial = bool(args.focus or args.subset)
    dest = args.results or (DEFAULT_RESULTS / label if not partial
                            else Path("/tmp") / f"axoneme-k8s-e2e-{label}")
    focus = FOCUS
    inner = args.focus or ("|".join(CI_SUBSET) if args.subset == "ci" else "")
    if inner:
        focus = f"{FOCUS}.*({inner})"
    skip = args.skip or ""
    left_out = ""
    if not sctp_available():
        left_out = ("[Feature:SCTPConnectivity] (SCTP connections): this kernel has no SCTP "
                    "(an SCTP socket cannot be made); the SCTP-policy tests that probe TCP run")
        say("the kernel has no SCTP: the suite's [Feature:SCTPConnectivity] tests are left out")
        skip = "|".join(x for x in (skip, r"\[Feature:SCTPConnectivity\]") if x)

    was_up = (CLUSTER / "state.json").exists()
    t0 = time.monotonic()
    bindir = build()
    cluster_up(args.datapath, args.iptables_mode, args.nodes, args.routing_mode)
    # Ginkgo's own report lists all ~3,200 specs (the filtered ones as skipped) and the
    # log is megabytes: both stay in a work directory; the results get the selected tests
    work = Path("/tmp") / f"axoneme-k8s-e2e-work-{label}"
    report = work / "junit"
    report.mkdir(parents=True, exist_ok=True)
    dest.mkdir(parents=True, exist_ok=True)
    for old in report.glob("*.xml"):
        old.unlink()
    cmd = [str(bindir / "e2e.test"), f"--kubeconfig={CLUSTER / 'kubeconfig'}",
           f"--kubectl-path={CLUSTER / 'bin' / 'kubectl'}", "--provider=local",
           f"--report-dir={report}", "--ginkgo.no-color", "--ginkgo.v",
           "--disable-log-dump", "--minStartupPods=-1", "--ginkgo.timeout=6h",
           f"--ginkgo.focus={focus}"]
    if skip:
        cmd.append(f"--ginkgo.skip={skip}")
    log = work / "e2e.log"
    recorder = None
    if args.differential:
        diff_work = work / "differential"
        if diff_work.exists():
            shutil.rmtree(diff_work)
        nodes = ([] if args.nodes == 1 else
                 ["axoneme-node", *(f"axoneme-node{k}" for k in range(2, args.nodes + 1))])
        recorder = differential.Recorder([str(CLUSTER / "bin" / "kubectl"),
                                          f"--kubeconfig={CLUSTER / 'kubeconfig'}"], diff_work,
                                         nodes)
        recorder.start()
    say(f"running e2e.test (log: {log})")
    t1 = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=str(work))
        assert proc.stdout is not None
        for line in proc.stdout:
            f.write(line)
            if line.startswith(("•", "[sig-network]", "  [FAILED]", "[FAIL]", "Ran ", "FAIL!",
                                "SUCCESS!")) or "[FAILED]" in line[:40]:
                print(line.rstrip(), flush=True)
        rc = proc.wait()
    duration = time.monotonic() - t1
    diff_result = None
    if recorder is not None:
        recorder.stop()
        diff_result = differential.decide(recorder.polls, recorder.flows(), recorder.work)
        for err in recorder.errors[:10]:
            say(f"differential: {err}")
    junits = sorted(report.glob("*.xml"))
    if not junits:
        say(f"error: e2e.test (exit {rc}) wrote no JUnit report; see {log}")
        return 1
    tests = [t for j in junits for t in parse_junit(j)]
    counts = {k: sum(1 for t in tests if t["outcome"] == k) for k in ("passed", "failed", "skipped")}
    version = bindir.parent.name
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
    summary = {"datapath": label, "nodes": args.nodes, "routing_mode": args.routing_mode,
               "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "kubernetes": version, "axoneme": head, "focus": focus, "skip": skip,
               "duration_s": round(duration), "total_s": round(time.monotonic() - t0),
               "e2e_exit": rc, "left_out": left_out, **counts}
    if diff_result is not None:
        summary["differential"] = diff_result.to_json()
        (dest / "differential.json").write_text(json.dumps(diff_result.to_json(), indent=2) + "\n")
    write_results(dest, summary, tests)
    write_junit(dest / "junit.xml", junits)
    if not args.keep_cluster and not was_up:
        run([str(REPO / "scripts" / "cluster"), "down"])
    for t in tests:
        if t["outcome"] != "passed":
            say(f"{t['outcome'].upper()}: {t['name']}: {t['message'].splitlines()[0] if t['message'] else ''}")
    agreed = True
    if diff_result is not None:
        for x in diff_result.disagreements:
            say(f"DISAGREEMENT: {x.attempt.source} -> {x.attempt.destination} "
                f"{x.attempt.port}/{x.attempt.protocol}: kernel "
                f"{'admitted' if x.attempt.admitted else 'dropped'}, engine {x.engine}: {x.reproduce}")
        say(diff_result.summary())
        agreed = not diff_result.disagreements and diff_result.attempts > 0
        if diff_result.attempts == 0:
            say("differential: error: no attempt was decided (were any flows recorded?)")
    say(f"results in {dest} (e2e.test's log and full report: {work})")
    print(f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped")
    return 0 if counts["failed"] == 0 and rc == 0 and agreed else 1


if __name__ == "__main__":
    sys.exit(main())
