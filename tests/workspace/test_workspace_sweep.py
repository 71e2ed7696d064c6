"""The root conftest's sweep of a killed run's leftovers never lets a stray file
stop the suite: whatever it cannot parse, or does not own, it leaves alone."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _root_conftest() -> ModuleType:
    # loaded under its own name: pytest's importlib mode keeps conftests out of sys.modules
    spec = importlib.util.spec_from_file_location("_axoneme_root_conftest", ROOT / "conftest.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _agent_state(tmp: Path) -> dict[str, object]:
    return {"version": 1, "datapath": "noop", "api_socket": str(tmp / "gone.sock"),
            "pods": {}, "endpoints": {}}


def _strays(tmp: Path) -> dict[str, Path]:
    """One state.json per way a foreign file can look; name -> path."""
    contents: dict[str, bytes] = {
        "nested": b"[" * 100_000,
        "nested-dict": b'{"a":' * 50_000,
        "binary": bytes(range(256)) * 64,
        "latin1": b'{"api_socket": "\xff\xfe"}',
        "bigint": b'{"version": ' + b"9" * 5000 + b"}",
        "list": b"[1, 2, 3]",
        "no-version": json.dumps({"datapath": "noop", "api_socket": "/nowhere.sock"}).encode(),
        "bool-version": json.dumps({"version": True, "datapath": "noop",
                                    "api_socket": "/nowhere.sock"}).encode(),
        "empty": b"",
    }
    made: dict[str, Path] = {}
    for name, data in contents.items():
        (tmp / name).mkdir()
        (tmp / name / "state.json").write_bytes(data)
        made[name] = tmp / name / "state.json"
    # too big to be ours: never read (sparse, so cheap)
    (tmp / "huge").mkdir()
    with open(tmp / "huge" / "state.json", "wb") as f:
        f.truncate(200 << 20)
    made["huge"] = tmp / "huge" / "state.json"
    # a FIFO would block a reader forever
    (tmp / "fifo").mkdir()
    os.mkfifo(tmp / "fifo" / "state.json")
    made["fifo"] = tmp / "fifo" / "state.json"
    # a symlink to an agent's state: not a file of the dir it sits in
    (tmp / "target").mkdir()
    (tmp / "target" / "real.json").write_text(json.dumps(_agent_state(tmp)))
    (tmp / "link").mkdir()
    (tmp / "link" / "state.json").symlink_to(tmp / "target" / "real.json")
    made["link"] = tmp / "link" / "state.json"
    if os.geteuid() == 0:  # another user's agent-shaped state is theirs
        (tmp / "foreign").mkdir()
        (tmp / "foreign" / "state.json").write_text(json.dumps(_agent_state(tmp)))
        os.chown(tmp / "foreign" / "state.json", 65534, 65534)
        made["foreign"] = tmp / "foreign" / "state.json"
    return made


def _snapshot(paths: dict[str, Path]) -> dict[str, tuple[int, int, int]]:
    return {n: (st.st_size, st.st_mtime_ns, st.st_mode)
            for n, p in paths.items() for st in [os.lstat(p)]}


def test_sweep_skips_unparsable_and_foreign_state_files(tmp_path: Path) -> None:
    conftest = _root_conftest()
    strays = _strays(tmp_path)
    before = _snapshot(strays)
    (tmp_path / "stale").mkdir()
    (tmp_path / "stale" / "state.json").write_text(json.dumps(_agent_state(tmp_path)))
    globs = [str(tmp_path / "*" / "state.json")]

    assert conftest._stale_state_dirs(globs) == [str(tmp_path / "stale")]
    swept = conftest._sweep_state_dirs(globs)

    assert swept == [str(tmp_path / "stale")]
    assert not (tmp_path / "stale" / "state.json").exists(), "the stale agent state was cleaned"
    assert _snapshot(strays) == before, "foreign files are left exactly as they were"
    assert (tmp_path / "target" / "real.json").exists()


def test_sweep_leaves_a_served_state_dir_alone(tmp_path: Path) -> None:
    import socket

    conftest = _root_conftest()
    (tmp_path / "live").mkdir()
    state = _agent_state(tmp_path)
    state["api_socket"] = str(tmp_path / "live.sock")
    (tmp_path / "live" / "state.json").write_text(json.dumps(state))
    with socket.socket(socket.AF_UNIX) as srv:
        srv.bind(str(tmp_path / "live.sock"))
        srv.listen()
        assert conftest._stale_state_dirs([str(tmp_path / "*" / "state.json")]) == []


def test_a_stray_state_file_in_tmpdir_does_not_stop_the_session(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the sweep runs only in root sessions (not root here)")
    tmpdir = tmp_path / "tmp"
    for name, data in {"nested": b"[" * 100_000, "binary": bytes(range(256)) * 16}.items():
        (tmpdir / name).mkdir(parents=True)
        (tmpdir / name / "state.json").write_bytes(data)
    env = {**os.environ, "TMPDIR": str(tmpdir)}
    env.pop("PYTEST_XDIST_WORKER", None)
    res = subprocess.run([sys.executable, "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider",
                          "tests/workspace/test_workspace_layout.py"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"exit {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    assert "INTERNALERROR" not in res.stdout + res.stderr
    assert "test_pep420_namespace_has_no_init" in res.stdout
    assert (tmpdir / "nested" / "state.json").read_bytes() == b"[" * 100_000


def test_sweep_leaves_a_live_sessions_state_dir_alone(tmp_path: Path) -> None:
    """A state dir named for a live session (-p<pid>-) is its own, even while its
    agent is down on purpose (a restart test); one named for a gone pid is stale."""
    conftest = _root_conftest()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    for name in (f"axa-p{os.getpid()}-live", f"axa-p{gone.pid}-dead"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "state.json").write_text(json.dumps(_agent_state(tmp_path)))
    assert conftest._stale_state_dirs([str(tmp_path / "*" / "state.json")]) == \
        [str(tmp_path / f"axa-p{gone.pid}-dead")]
