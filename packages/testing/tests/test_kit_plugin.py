"""The kit as a third party uses it: ``pytest --axoneme-datapath NAME`` in a
directory that is not this repository (no conftest of ours, no tests/ tree)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from axoneme.core.datapath import NoopDatapath
from axoneme.testing.plugin import DatapathSpec, leaves_nothing_in_the_kernel, parse_specs


def run_kit(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=600)


def test_specs_are_comma_separated_repeatable_and_carry_a_mode() -> None:
    specs = parse_specs(["ebpf,iptables:ipset", " noop ", "ebpf"])
    assert specs == [DatapathSpec("ebpf"), DatapathSpec("iptables", "ipset"), DatapathSpec("noop")]
    assert [s.id for s in specs] == ["ebpf", "iptables-ipset", "noop"]
    assert specs[1].label == "iptables/ipset"
    with pytest.raises(pytest.UsageError, match=r"--axoneme-datapath: 'my dp' is not NAME or NAME:MODE"):
        parse_specs(["my dp"])


def test_a_datapath_with_its_own_cleanup_is_a_kernel_datapath() -> None:
    class Kernelish(NoopDatapath):
        def cleanup(self) -> None:
            return None

    assert leaves_nothing_in_the_kernel(NoopDatapath)
    assert not leaves_nothing_in_the_kernel(Kernelish)
    assert not leaves_nothing_in_the_kernel(None)


def test_the_kit_runs_from_any_directory(tmp_path: Path) -> None:
    res = run_kit(tmp_path, "--axoneme-datapath", "noop", "-rA", "-v")
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "axoneme-testing: datapaths under test: noop (offline part only" in out
    kit = "axoneme/testing/conformance"
    assert f"PASSED {kit}/offline.py::test_options_are_well_formed[noop]" in out
    assert f"PASSED {kit}/semantics.py::test_follows_the_noop_reference[noop-7]" in out
    # the kernel part does not apply to a datapath that leaves nothing in the kernel
    assert "k8s.py" not in out and "failclosed.py" not in out
    assert " deselected" in out


def test_an_uninstalled_datapath_fails_loudly(tmp_path: Path) -> None:
    res = run_kit(tmp_path, "--axoneme-datapath", "nope", "-m", "axoneme_offline")
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    assert "no axoneme.datapath plugin named 'nope'" in out


def test_a_bad_datapath_item_is_a_usage_error(tmp_path: Path) -> None:
    res = run_kit(tmp_path, "--axoneme-datapath", "noop,bad/name")
    assert res.returncode == pytest.ExitCode.USAGE_ERROR, res.stdout + res.stderr
    assert "--axoneme-datapath: 'bad/name' is not NAME or NAME:MODE" in res.stderr


def test_the_kit_without_a_datapath_says_how_to_name_one(tmp_path: Path) -> None:
    import axoneme.testing.plugin as plugin

    res = run_kit(tmp_path, *plugin.kit_files()[:1])
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    assert "needs the datapath under test: pytest --axoneme-datapath NAME[:MODE]" in out


def test_a_projects_conftest_names_the_datapaths_and_the_option_wins(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text(
        "def pytest_axoneme_datapaths(config):\n    return ['noop']\n")
    (tmp_path / "test_conf.py").write_text(
        "from axoneme.testing.conformance.offline import *  # noqa: F403\n")
    res = run_kit(tmp_path, "test_conf.py", "-rA")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "PASSED test_conf.py::test_entry_point_loads_a_datapath[noop]" in res.stdout
    assert "4 passed" in res.stdout
    res = run_kit(tmp_path, "test_conf.py", "--axoneme-datapath", "nope")
    assert res.returncode == 1 and "no axoneme.datapath plugin named 'nope'" in res.stdout


def test_the_repositorys_conformance_run_is_the_whole_kit() -> None:
    """tests/conformance names every kit module (so the built-ins run all of it)."""
    from axoneme.testing.plugin import KIT_MODULES

    here = Path(__file__).resolve().parents[3] / "tests" / "conformance"
    for module in KIT_MODULES:
        text = (here / f"test_conformance_{module}.py").read_text()
        assert f"from axoneme.testing.conformance.{module} import *" in text, module
    assert sorted(p.stem for p in here.glob("test_*.py")) == sorted(
        f"test_conformance_{m}" for m in KIT_MODULES), "a conformance module outside the kit"
