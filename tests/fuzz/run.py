"""Coverage-guided fuzzing of the parsers a hostile peer or policy author reaches.

    scripts/fuzz [--target T[,T...]] [--seconds S] [--jobs J] [--merge] [--record|--no-record]

Each target (tests/fuzz/targets.py: policy, http, kafka, dns) runs in its own
process under atheris (libFuzzer) with our modules instrumented, seeded from
tests/fuzz/corpus/<target>/. New inputs go to a scratch directory (``--merge``
adds the ones that reach new coverage to the corpus). A crash, a hang longer
than ``--timeout`` s or RSS above ``--rss-limit-mb`` is saved under
tests/fuzz/crashers/<target>/ and makes the exit status 1. Runs of 60 s or more
per target (or ``--record``) write their figures to bench-results/fuzz.md.

Internal modes: ``--worker T -- <libFuzzer args>`` (one atheris process) and
``--replay T FILE...`` (run inputs through a target without libFuzzer; exit 1
on the first failure), used by tests/fuzz/test_fuzz_corpus.py.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CORPUS = HERE / "corpus"
CRASHERS = HERE / "crashers"
RESULTS = REPO / "bench-results" / "fuzz.md"
TARGET_NAMES = ("policy", "http", "kafka", "dns")
# Our code plus the pure-Python libraries the parsers lean on: coverage of
# their branches is what guides the fuzzer into our error paths.
INSTRUMENT = ["axoneme", "yaml", "dnslib"]
RECORD_MIN_SECONDS = 60
_STATS = re.compile(r"^#(\d+)\s+(?:INITED|NEW|REDUCE|pulse|DONE|RELOAD)\b(.*)$", re.M)
_COV = re.compile(r"\bcov: (\d+)")
_CORP = re.compile(r"\bcorp: (\d+)/")
_FINAL = re.compile(r"^stat::(\w+):\s+(\d+)", re.M)


@dataclass
class Result:
    target: str
    seconds: float
    executions: int = 0
    corpus: int = 0
    coverage: int = 0
    crashes: list[str] = field(default_factory=list)
    elapsed: float = 0.0
    rate: int = 0
    rc: int = 0
    log: str = ""

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not self.crashes and self.executions > 0


# --- worker / replay (child processes) ----------------------------------------------

def _import_targets(instrument: bool):  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(HERE))
    if instrument:
        import atheris

        with atheris.instrument_imports(include=INSTRUMENT):
            import targets
    else:
        import targets
    return targets


def worker(target: str, fuzzer_args: list[str]) -> None:
    import atheris

    fn = _import_targets(instrument=True).TARGETS[target]
    atheris.Setup([sys.argv[0], *fuzzer_args], fn)
    atheris.Fuzz()


def replay(target: str, files: list[str]) -> int:
    fn = _import_targets(instrument=False).TARGETS[target]
    for f in files:
        data = Path(f).read_bytes()
        t0 = time.monotonic()
        try:
            fn(data)
        except BaseException:
            sys.stderr.write(f"FAIL {f}\n{traceback.format_exc()}")
            return 1
        print(f"ok {f} {time.monotonic() - t0:.3f}s", flush=True)
    return 0


# --- driver ---------------------------------------------------------------------------

def _symptom(log: str, kind: str) -> str:
    """A file-name word for what went wrong: the exception type, or the kind."""
    m = re.search(r"=== Uncaught Python exception: ===\s*\n(\w+)", log)
    if m and kind == "crash":
        return m.group(1)
    if "deadly signal" in log and kind == "crash":
        return "signal"
    return kind


def _crash_report(log: str) -> str:
    """The part of a libFuzzer log that says what crashed (traceback, input)."""
    starts = [log.rfind(m) for m in ("=== Uncaught Python exception", "==ERROR", "ALARM:",
                                     "out-of-memory", "deadly signal")]
    start = min((i for i in starts if i >= 0), default=max(len(log) - 4000, 0))
    return log[start:start + 8000]


def fuzz_one(target: str, seconds: float, rss_limit_mb: int, timeout: int,
             merge: bool, extra: list[str], crashers: Path = CRASHERS) -> Result:
    seeds = CORPUS / target
    seeds.mkdir(parents=True, exist_ok=True)
    res = Result(target, seconds)
    with tempfile.TemporaryDirectory(prefix=f"axoneme-fuzz-{target}-") as tmp:
        work = Path(tmp) / "corpus"
        arts = Path(tmp) / "artifacts"
        work.mkdir()
        arts.mkdir()
        args = [f"-max_total_time={int(seconds)}", f"-rss_limit_mb={rss_limit_mb}",
                f"-timeout={timeout}", f"-artifact_prefix={arts}/", "-print_final_stats=1",
                "-max_len=65536", *extra, str(work), str(seeds)]
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", target, "--", *args]
        # a wedged worker (libFuzzer's own timeout failing) must not wedge us
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  errors="replace", timeout=seconds + 10 * timeout + 120, cwd=REPO)
            res.rc, res.log = proc.returncode, proc.stdout
        except subprocess.TimeoutExpired as e:
            res.rc = -1
            out = e.stdout or b""
            res.log = out.decode("utf-8", "replace") if isinstance(out, bytes) else out
            res.log += "\nscripts/fuzz: the worker did not stop; killed\n"
        res.elapsed = time.monotonic() - t0
        final = dict((k, int(v)) for k, v in _FINAL.findall(res.log))
        res.executions = final.get("number_of_executed_units", 0)
        res.rate = final.get("average_exec_per_sec", 0)
        stats = _STATS.findall(res.log)
        if stats:
            res.executions = res.executions or int(stats[-1][0])
            cov = [int(m.group(1)) for _, rest in stats if (m := _COV.search(rest))]
            corp = [int(m.group(1)) for _, rest in stats if (m := _CORP.search(rest))]
            res.coverage = cov[-1] if cov else 0
            res.corpus = corp[-1] if corp else 0
        for art in sorted(arts.iterdir()):
            kind = art.name.split("-", 1)[0]
            if kind not in ("crash", "timeout", "oom", "leak"):
                continue
            data = art.read_bytes()
            dest = crashers / target
            dest.mkdir(parents=True, exist_ok=True)
            name = f"{_symptom(res.log, kind)}-{hashlib.sha1(data).hexdigest()[:12]}"
            (dest / name).write_bytes(data)
            saved = dest / name
            res.crashes.append(str(saved.relative_to(REPO) if saved.is_relative_to(REPO) else saved))
        if res.rc != 0 and not res.crashes:
            res.crashes.append(f"worker exit {res.rc} (no artifact)")
        if merge and not res.crashes:
            before = len(list(seeds.iterdir()))
            mcmd = [sys.executable, str(Path(__file__).resolve()), "--worker", target, "--",
                    "-merge=1", f"-rss_limit_mb={rss_limit_mb}", f"-timeout={timeout}",
                    str(seeds), str(work)]
            subprocess.run(mcmd, capture_output=True, timeout=600, cwd=REPO)
            after = len(list(seeds.iterdir()))
            res.log += f"\nscripts/fuzz: merge added {after - before} input(s) to {seeds}\n"
    return res


def record(results: list[Result]) -> None:
    """Update bench-results/fuzz.md: one row per target, newest run wins."""
    rows: dict[str, str] = {}
    if RESULTS.exists():
        for line in RESULTS.read_text().splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if line.startswith("|") and cells and cells[0] in TARGET_NAMES:
                rows[cells[0]] = line
    today = dt.date.today().isoformat()
    for r in results:
        rate = r.rate or (r.executions / r.elapsed if r.elapsed else 0)
        rows[r.target] = (f"| {r.target} | {today} | {int(r.seconds)} | {r.executions:,} | "
                          f"{rate:,.0f} | {r.corpus} | {r.coverage} | {len(r.crashes)} |")
    body = [
        "# Fuzzing figures",
        "",
        f"Written by `scripts/fuzz` (tests/fuzz/run.py) for runs of {RECORD_MIN_SECONDS} s or more",
        "per target. Coverage-guided fuzzing with atheris (libFuzzer), one process per",
        "target, our modules, PyYAML and dnslib instrumented; a run stops at its first crash.",
        "A hang over 5 s or RSS over 1 GiB counts as a crash. `corpus` is the number of",
        "inputs libFuzzer kept (seeds plus new coverage), `cov` its coverage counter.",
        f"Machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}.",
        "",
        "| target | date | seconds | executions | exec/s | corpus | cov | crashes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        *(rows[t] for t in TARGET_NAMES if t in rows),
        "",
    ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(body))


def main(argv: list[str]) -> int:
    if argv[:1] == ["--worker"]:
        rest = argv[2:]
        worker(argv[1], rest[1:] if rest[:1] == ["--"] else rest)
        return 0
    if argv[:1] == ["--replay"]:
        return replay(argv[1], argv[2:])
    ap = argparse.ArgumentParser(prog="scripts/fuzz", description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", action="append", default=[],
                    help=f"target(s), comma-separated or repeated: {', '.join(TARGET_NAMES)} "
                         "(default: all)")
    ap.add_argument("--seconds", type=float, default=60, help="fuzzing time per target (60)")
    ap.add_argument("--jobs", type=int, default=1, help="targets fuzzed in parallel (1)")
    ap.add_argument("--timeout", type=int, default=5, help="seconds one input may take (5)")
    ap.add_argument("--rss-limit-mb", type=int, default=1024, help="memory limit (1024)")
    ap.add_argument("--merge", action="store_true",
                    help="add inputs that reach new coverage to tests/fuzz/corpus/<target>/")
    ap.add_argument("--record", action=argparse.BooleanOptionalAction, default=None,
                    help=f"write bench-results/fuzz.md (default: when --seconds >= "
                         f"{RECORD_MIN_SECONDS})")
    ap.add_argument("--crashers-dir", type=Path, default=CRASHERS,
                    help="where new crashers are saved, per target (tests/fuzz/crashers)")
    ap.add_argument("--verbose", "-v", action="store_true", help="print the libFuzzer log")
    ap.add_argument("libfuzzer", nargs="*", help="extra libFuzzer flags, after --")
    args = ap.parse_args(argv)
    targets = [t for spec in args.target or [",".join(TARGET_NAMES)] for t in spec.split(",") if t]
    unknown = [t for t in targets if t not in TARGET_NAMES]
    if unknown or args.seconds <= 0 or args.jobs < 1:
        sys.stderr.write(f"error: unknown target(s) {', '.join(unknown)} (choose from "
                         f"{', '.join(TARGET_NAMES)})\n" if unknown else
                         "error: --seconds and --jobs must be positive\n")
        return 2
    try:
        import atheris  # noqa: F401
    except ImportError:
        sys.stderr.write("error: atheris is not installed in this environment "
                         "(it is a dev dependency: run ./scripts/bootstrap)\n")
        return 2

    def one(t: str) -> Result:
        print(f"fuzz {t}: {args.seconds:g} s ...", flush=True)
        return fuzz_one(t, args.seconds, args.rss_limit_mb, args.timeout, args.merge,
                        args.libfuzzer, args.crashers_dir)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(one, targets))
    failed = False
    for r in results:
        if args.verbose:
            sys.stderr.write(r.log + "\n")
        elif not r.ok:
            sys.stderr.write(_crash_report(r.log) + "\n")
        print(f"fuzz {r.target}: {r.executions} executions in {r.seconds:g} s, "
              f"corpus {r.corpus}, cov {r.coverage}, crashes {len(r.crashes)}", flush=True)
        for c in r.crashes:
            print(f"fuzz {r.target}: CRASH {c}", flush=True)
        failed |= not r.ok
    if args.record or (args.record is None and args.seconds >= RECORD_MIN_SECONDS):
        record(results)
        print(f"figures written to {RESULTS.relative_to(REPO)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
