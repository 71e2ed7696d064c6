"""The fuzzing regression guard (issue 13, "make it stay fixed").

1. Every seed-corpus input goes through its target in-process: each call
   checks the target's invariants (its own assertions) and must finish fast.
2. Every crasher ever found goes through its target in a child process with
   a memory limit and a timeout, so a segfault, a hang or a memory blow-up
   fails this test instead of taking pytest down.
3. A short atheris run per target (``scripts/fuzz --seconds 20``): exit 0,
   more than zero inputs run.
"""

from __future__ import annotations

import importlib.util
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
RUN = HERE / "run.py"
TARGET_NAMES = ("policy", "http", "kafka", "dns")
MAX_CORPUS_FILES = 300  # per target: minimise with `scripts/fuzz --merge` from scratch if it grows
MAX_INPUT_BYTES = 64 * 1024
INPUT_SECONDS = 2.0
CRASHER_SECONDS = 60
CRASHER_AS_BYTES = 2 << 30
FUZZ_SECONDS = int(os.environ.get("AXONEME_FUZZ_SECONDS", "20"))

# Crashers whose fix is another change still in flight: strict xfail, so the
# run that fixes one XPASSes and fails until its line here is removed.
KNOWN_UNFIXED: dict[str, str] = {}


def _load_targets():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("axoneme_fuzz_targets", HERE / "targets.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


targets = _load_targets()


def _files(kind: str) -> list[tuple[str, Path]]:
    out = []
    for t in TARGET_NAMES:
        d = HERE / kind / t
        if d.is_dir():
            out.extend((t, p) for p in sorted(d.iterdir()) if p.is_file())
    return out


CORPUS = _files("corpus")
CRASHERS = _files("crashers")


def test_every_target_has_a_seed_corpus_and_it_stays_small() -> None:
    assert set(targets.TARGETS) == set(TARGET_NAMES)
    for t in TARGET_NAMES:
        files = [p for tt, p in CORPUS if tt == t]
        assert 5 <= len(files) <= MAX_CORPUS_FILES, (t, len(files))
        big = [p.name for p in files if p.stat().st_size > MAX_INPUT_BYTES]
        assert not big, (t, big)


@pytest.mark.parametrize(("target", "path"), CORPUS, ids=[f"{t}/{p.name}" for t, p in CORPUS])
def test_corpus_input(target: str, path: Path) -> None:
    data = path.read_bytes()
    t0 = time.monotonic()
    targets.TARGETS[target](data)  # raises on any broken invariant
    took = time.monotonic() - t0
    assert took < INPUT_SECONDS, f"{target}/{path.name} took {took:.2f} s"


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (CRASHER_AS_BYTES, CRASHER_AS_BYTES))


def _crasher_params() -> list[object]:
    params = []
    for t, p in CRASHERS:
        key = f"{t}/{p.name}"
        marks = [pytest.mark.xfail(strict=True, reason=KNOWN_UNFIXED[key])] \
            if key in KNOWN_UNFIXED else []
        params.append(pytest.param(t, p, id=key, marks=marks))
    return params


def test_known_unfixed_crashers_exist() -> None:
    keys = {f"{t}/{p.name}" for t, p in CRASHERS}
    assert set(KNOWN_UNFIXED) <= keys, set(KNOWN_UNFIXED) - keys
    assert CRASHERS, "tests/fuzz/crashers/ is empty: the issue-13 crashers belong there"


@pytest.mark.parametrize(("target", "path"), _crasher_params())
def test_crasher_stays_fixed(target: str, path: Path) -> None:
    try:
        proc = subprocess.run([sys.executable, str(RUN), "--replay", target, str(path)],
                              capture_output=True, text=True, timeout=CRASHER_SECONDS,
                              preexec_fn=_limit_memory, cwd=REPO)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{target}/{path.name}: still hangs (> {CRASHER_SECONDS} s)")
    assert proc.returncode == 0, (
        f"{target}/{path.name}: exit {proc.returncode} "
        f"({'killed by signal ' + str(-proc.returncode) if proc.returncode < 0 else 'failed'})\n"
        f"{proc.stderr[-4000:]}")
    assert f"ok {path}" in proc.stdout


@pytest.mark.parametrize("target", TARGET_NAMES)
def test_short_fuzz_run(target: str, tmp_path: Path) -> None:
    # atheris is a dev dependency (scripts/bootstrap installs it): missing is a
    # broken environment, so no skip here; scripts/fuzz says what is wrong.
    proc = subprocess.run([str(REPO / "scripts" / "fuzz"), "--target", target,
                           "--seconds", str(FUZZ_SECONDS), "--no-record",
                           # a find is reported (log + input), not written into the tree
                           "--crashers-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=FUZZ_SECONDS + 300, cwd=REPO)
    m = re.search(rf"^fuzz {target}: (\d+) executions", proc.stdout, re.M)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-6000:]
    assert m is not None, proc.stdout
    assert int(m.group(1)) > 0, proc.stdout
    assert f"fuzz {target}: CRASH" not in proc.stdout
