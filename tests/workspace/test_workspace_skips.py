"""The root conftest counts skips: in a strict session (CI=true, or root with
AXONEME_STRICT_SKIPS=1) a skip whose reason is not on the allow-list fails the
session and is listed with its reason."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

CONFTEST = textwrap.dedent(f"""\
    import importlib.util
    spec = importlib.util.spec_from_file_location("_root_conftest", {str(ROOT / "conftest.py")!r})
    root = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(root)

    def pytest_configure(config):
        root._CONFIG[:] = [config]

    pytest_runtest_logreport = root.pytest_runtest_logreport
    pytest_collectreport = root.pytest_collectreport
    pytest_sessionfinish = root.pytest_sessionfinish
    pytest_terminal_summary = root.pytest_terminal_summary
""")


def _run(tmp_path: Path, tests: str, **env: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_tiny.py").write_text(textwrap.dedent(tests))
    full = {k: v for k, v in os.environ.items() if k not in ("CI", "AXONEME_STRICT_SKIPS")}
    full.update(env)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path), str(tmp_path / "test_tiny.py")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, env=full)


UNEXPECTED = """\
    import pytest

    def test_ok():
        assert 1 + 1 == 2

    def test_skips():
        pytest.skip("no frobnicator on this machine")

    @pytest.mark.xfail(reason="known", strict=True)
    def test_xfail():
        assert False
"""


def test_an_unexpected_skip_fails_a_strict_session(tmp_path: Path) -> None:
    res = _run(tmp_path, UNEXPECTED, CI="true")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "unexpected skips" in res.stdout
    assert "test_tiny.py::test_skips: no frobnicator on this machine" in res.stdout
    assert "test_xfail" not in res.stdout.split("unexpected skips")[1], "xfail is not a skip"


def test_strict_as_root_with_axoneme_strict_skips(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("AXONEME_STRICT_SKIPS applies to root sessions (not root here)")
    res = _run(tmp_path, UNEXPECTED, AXONEME_STRICT_SKIPS="1")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "no frobnicator on this machine" in res.stdout


def test_a_module_level_skip_counts_too(tmp_path: Path) -> None:
    res = _run(tmp_path, """\
        import pytest
        pytest.skip("whole module: no widget", allow_module_level=True)
    """, CI="true")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "whole module: no widget" in res.stdout


def test_allowed_skip_and_non_strict_sessions_pass(tmp_path: Path) -> None:
    res = _run(tmp_path, """\
        import pytest

        def test_l7():
            pytest.skip("noop datapath has no L7 redirect")
    """, CI="true")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "unexpected skips" not in res.stdout
    res = _run(tmp_path, UNEXPECTED)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 skipped" in res.stdout


def test_a_failing_session_keeps_its_own_exit_code(tmp_path: Path) -> None:
    res = _run(tmp_path, """\
        import pytest

        def test_fails():
            assert 1 == 2

        def test_skips():
            pytest.skip("no frobnicator")
    """, CI="true")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "no frobnicator" in res.stdout


def test_scripts_test_runs_strict() -> None:
    text = (ROOT / "scripts" / "test").read_text()
    assert "export AXONEME_STRICT_SKIPS=1" in text or "AXONEME_STRICT_SKIPS=${AXONEME_STRICT_SKIPS:-1}" in text
