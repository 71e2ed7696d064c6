"""docs/plugins.md builds what it shows, so the guide can never drift.

Each example of the guide is a group of fenced blocks between
``<!-- example: NAME -->`` and ``<!-- /example -->``: a block whose first
line is ``# PATH`` is a file of the example's distribution, an ``sh`` block
holds the commands a reader types. Here every example is written out from
those blocks into a temp dir and its commands run as written, in one fresh
venv holding the axoneme wheels built from this checkout (axoneme-core, the
``axoneme`` CLI, axoneme-testing): ``uv build`` builds the example's wheel,
``pip`` installs it, ``pytest --axoneme-datapath`` runs the kit against the
example datapath, ``axoneme`` lines must print what their comment says
(``# verdict: X``; ``# KIND NAME DIST VERSION yes ...`` as a line of
``axoneme plugins``). The hook example is then called through the plugin
manager the agent uses.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
DOC = ROOT / "docs" / "plugins.md"
PYTHON = "/usr/bin/python3"  # Debian's python, as scripts/bootstrap uses
EXAMPLE = re.compile(r"<!-- example: (\S+) -->\n(.*?)<!-- /example -->", re.S)
BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.S)
# the distributions an example needs next to it, built from this checkout
AXONEME_DISTS = ("core", "agent", "testing")


def examples() -> dict[str, tuple[dict[str, str], list[tuple[str, str]]]]:
    """name -> ({path: content}, [(command, expectation comment)])."""
    out: dict[str, tuple[dict[str, str], list[tuple[str, str]]]] = {}
    for name, body in EXAMPLE.findall(DOC.read_text()):
        files: dict[str, str] = {}
        commands: list[tuple[str, str]] = []
        for lang, text in BLOCK.findall(body):
            if lang == "sh":
                joined = text.replace("\\\n", " ")
                for line in joined.splitlines():
                    command, _, comment = line.partition("  #")
                    if command.strip():
                        commands.append((" ".join(command.split()), comment.strip()))
                continue
            first = text.partition("\n")[0]
            assert first.startswith("# "), f"{DOC.name} example {name}: a {lang} block must start with '# PATH'"
            files[first[2:].split()[0]] = text
        out[name] = (files, commands)
    return out


def _uv() -> str:
    found = shutil.which("uv") or str(Path.home() / ".local" / "bin" / "uv")
    if not Path(found).exists():
        pytest.skip("uv is not installed (scripts/bootstrap installs it)")
    return found


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the axoneme wheels of this checkout; its bin dir."""
    uv = _uv()
    dist = tmp_path_factory.mktemp("axoneme-wheels")
    for pkg in AXONEME_DISTS:
        subprocess.run([uv, "build", "--wheel", "--out-dir", str(dist), str(ROOT / "packages" / pkg)],
                       check=True, capture_output=True, timeout=300)
    path = tmp_path_factory.mktemp("venv")
    subprocess.run([PYTHON, "-m", "venv", str(path)], check=True, capture_output=True, timeout=120)
    bin_dir = path / "bin"
    wheels = sorted(str(w) for w in dist.glob("*.whl"))
    res = subprocess.run([str(bin_dir / "pip"), "install", "--quiet", *wheels], capture_output=True,
                         text=True, env=_env(dist), timeout=600)
    assert res.returncode == 0, res.stderr
    (bin_dir / "find-links").write_text(str(dist))
    return bin_dir


def _env(dist: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PIP_FIND_LINKS"] = " ".join(filter(None, [str(dist), env.get("PIP_FIND_LINKS", "")]))
    return env


def _expect(command: str, comment: str, stdout: str) -> None:
    if m := re.match(r"verdict: (\w+)", comment):
        assert m.group(1) in stdout, f"{command}: wanted verdict {m.group(1)}:\n{stdout}"
    elif command.split()[:2] == ["axoneme", "plugins"] and comment:
        want = [w for w in comment.split() if w != "..."]
        assert any(line.split()[:len(want)] == want for line in stdout.splitlines()), \
            f"{command}: no line starting {want}:\n{stdout}"


def run_example(name: str, venv: Path, workdir: Path) -> dict[str, str]:
    """Write the example out and run its commands as the guide says; their outputs."""
    files, commands = examples()[name]
    for rel, text in files.items():
        (workdir / rel).parent.mkdir(parents=True, exist_ok=True)
        (workdir / rel).write_text(text)
    env = _env(Path((venv / "find-links").read_text()))
    outputs: dict[str, str] = {}
    for command, comment in commands:
        argv = shlex.split(command)
        tool, cwd = argv[0], workdir
        if tool == "uv":
            exe = _uv()
        elif tool in ("pip", "pytest", "axoneme"):
            exe = str(venv / tool)
            if tool == "pytest":  # a directory of its own: no conftest, no project of ours
                cwd = workdir / "kit-run"
                cwd.mkdir(exist_ok=True)
        else:
            raise AssertionError(f"docs/plugins.md example {name}: a command I cannot run: {command}")
        res = subprocess.run([exe, *argv[1:]], cwd=cwd, capture_output=True, text=True, env=env,
                             timeout=600)
        assert res.returncode == 0, f"{command}: exit {res.returncode}\n{res.stdout}\n{res.stderr}"
        _expect(command, comment, res.stdout)
        outputs[command] = res.stdout
    return outputs


def test_the_guide_marks_its_examples() -> None:
    found = examples()
    assert {"mydp", "echo", "flowprint"} <= set(found), sorted(found)
    for name, (files, commands) in found.items():
        assert "pyproject.toml" in files and commands, name


def test_the_datapath_example_passes_the_kits_offline_part(venv: Path, tmp_path: Path) -> None:
    outputs = run_example("mydp", venv, tmp_path)
    runs = [out for cmd, out in outputs.items() if cmd.startswith("pytest --axoneme-datapath mydp")]
    assert len(runs) == 2, "the guide runs the kit on the example"
    for out in runs:
        assert re.search(r"\b\d+ passed\b", out) and "failed" not in out and "error" not in out, out
    # every offline check and the NoopDatapath reference ran on it
    assert re.search(r"\b12 passed\b", runs[0]), runs[0]


def test_the_l7_example_is_selected_by_a_policy_and_traced(venv: Path, tmp_path: Path) -> None:
    outputs = run_example("echo", venv, tmp_path)
    traces = [out for cmd, out in outputs.items() if cmd.startswith("axoneme policy trace")]
    assert len(traces) == 2 and "ALLOWED" in traces[0] and "DENIED" in traces[1], traces


def test_the_hook_example_is_called_by_the_plugin_manager(venv: Path, tmp_path: Path) -> None:
    run_example("flowprint", venv, tmp_path)
    code = ("from axoneme.core.plugins import make_plugin_manager\n"
            "class Flow:\n"
            "    def to_json(self):\n"
            "        return {'verdict': 'FORWARDED', 'from': 'docs'}\n"
            "make_plugin_manager().hook.axoneme_flow_observed(flow=Flow())\n")
    res = subprocess.run([str(venv / "python"), "-c", code], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1]) == {"verdict": "FORWARDED", "from": "docs"}
