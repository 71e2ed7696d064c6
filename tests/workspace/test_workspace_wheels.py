"""Built wheels install a working CLI with only the chosen plugins, exactly as the README says.

The README's "Install with pip" section is executed as written: its `uv build` line builds
the wheels, its `pip install` lines run with plain pip in fresh venvs (`python -m venv`),
its `axoneme` lines must exit 0 there. Third-party dependencies come from PyPI.
"""

from __future__ import annotations

import email
import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README_SECTION = "## Install with pip"
VERSION = tomllib.loads((ROOT / "packages" / "core" / "pyproject.toml").read_text())["project"]["version"]
# what the `agent` extra adds: never in an offline-only install
AGENT_EXTRA_MODULES = ("aiohttp", "prometheus_client")
PYTHON = "/usr/bin/python3"  # Debian's python, as scripts/bootstrap uses


def _uv() -> str:
    found = shutil.which("uv") or str(Path.home() / ".local" / "bin" / "uv")
    if not Path(found).exists():
        pytest.skip("uv is not installed (scripts/bootstrap installs it)")
    return found


def readme_blocks() -> list[list[str]]:
    """The command lines of each ```sh block in the README's install section."""
    text = (ROOT / "README.md").read_text()
    start = text.index(README_SECTION)
    end = text.find("\n## ", start + len(README_SECTION))
    section = text[start:end if end != -1 else None]
    blocks = re.findall(r"```sh\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 3, "the install section has a build, an offline and a node block"
    return [[line.split("  #")[0].strip() for line in b.splitlines() if line.strip()] for b in blocks]


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """Every distribution's wheel, built by the README's own build line."""
    uv = _uv()
    (build,) = readme_blocks()[0]
    argv = shlex.split(build)
    assert argv[:2] == ["uv", "build"] and argv[-2:] == ["--out-dir", "dist"], build
    out = tmp_path_factory.mktemp("wheels") / "dist"
    subprocess.run([uv, *argv[1:-1], str(out)], check=True, capture_output=True, cwd=ROOT, timeout=300)
    return out


def _venv(path: Path) -> Path:
    subprocess.run([PYTHON, "-m", "venv", str(path)], check=True, capture_output=True, timeout=120)
    return path / "bin"


def _run_readme_block(lines: list[str], bin_dir: Path, dist: Path) -> dict[str, str]:
    """Run a block's lines: `pip ...` from the venv next to dist/, `axoneme ...` in the clone."""
    outputs = {}
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    for line in lines:
        argv = shlex.split(line)
        assert argv[0] in ("pip", "axoneme"), f"README install line I cannot run: {line}"
        cwd = dist.parent if argv[0] == "pip" else ROOT
        res = subprocess.run([str(bin_dir / argv[0]), *argv[1:]], capture_output=True, text=True,
                             cwd=cwd, env=env, timeout=600)
        assert res.returncode == 0, f"{line}: exit {res.returncode}\n{res.stdout}\n{res.stderr}"
        outputs[line] = res.stdout
    return outputs


def _installed(bin_dir: Path) -> set[str]:
    res = subprocess.run([str(bin_dir / "pip"), "list", "--format", "json"], check=True,
                         capture_output=True, text=True)
    return {d["name"].lower() for d in json.loads(res.stdout)}


def _importable(bin_dir: Path, modules: tuple[str, ...]) -> dict[str, bool]:
    code = ("import importlib.util, json, sys; "
            "print(json.dumps({m: importlib.util.find_spec(m) is not None for m in sys.argv[1:]}))")
    res = subprocess.run([str(bin_dir / "python"), "-c", code, *modules], check=True,
                         capture_output=True, text=True)
    return json.loads(res.stdout)


def _plugins(bin_dir: Path) -> dict:
    res = subprocess.run([str(bin_dir / "axoneme"), "plugins", "-o", "json"], capture_output=True,
                         text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_every_wheel_carries_license_and_metadata(dist: Path) -> None:
    wheels = sorted(dist.glob("*.whl"))
    names = {w.name.split("-")[0] for w in wheels}
    expected = {tomllib.loads(p.read_text())["project"]["name"].replace("-", "_")
                for p in (ROOT / "packages").glob("*/pyproject.toml")}
    assert names == expected
    license_text = (ROOT / "LICENSE").read_bytes()
    for wheel in wheels:
        assert f"-{VERSION}-" in wheel.name, wheel.name
        with zipfile.ZipFile(wheel) as z:
            info = next(n.split("/")[0] for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            meta = email.message_from_bytes(z.read(f"{info}/METADATA"))
            assert z.read(f"{info}/licenses/LICENSE") == license_text, wheel.name
        assert meta["License-Expression"] == "Apache-2.0", wheel.name
        assert meta["License-File"] == "LICENSE", wheel.name
        urls = {u.split(",")[0] for u in meta.get_all("Project-URL")}
        assert urls == {"Homepage", "Documentation", "Source", "Issues"}, wheel.name
        assert "Typing :: Typed" in meta.get_all("Classifier"), wheel.name
        for req in meta.get_all("Requires-Dist") or []:
            if req.startswith("axoneme"):
                assert re.match(rf"axoneme[a-z0-9-]*=={re.escape(VERSION)}(;|$)", req), (wheel.name, req)


def test_readme_offline_install_has_none_of_the_agents_dependencies(dist: Path, tmp_path: Path) -> None:
    bin_dir = _venv(tmp_path / "venv")
    outputs = _run_readme_block(readme_blocks()[1], bin_dir, dist)
    assert outputs["axoneme --version"] == f"axoneme {VERSION}\n"
    assert "valid" in outputs["axoneme policy validate -f examples/demo/policies"]
    # nothing of the agent's: only axoneme, axoneme-core and the L7 parsers of ours
    assert {d for d in _installed(bin_dir) if d.startswith("axoneme")} == {
        "axoneme", "axoneme-core", "axoneme-l7-http", "axoneme-l7-kafka", "axoneme-l7-dns"}
    assert _importable(bin_dir, AGENT_EXTRA_MODULES) == dict.fromkeys(AGENT_EXTRA_MODULES, False)
    data = _plugins(bin_dir)
    assert set(data["datapath"]) == {"noop"} and set(data["l7"]) == {"http", "kafka", "dns"}
    # the agent itself says what is missing instead of a traceback
    res = subprocess.run([str(bin_dir / "axoneme"), "agent", "run", "--datapath", "noop",
                          "--state-dir", str(tmp_path / "state"),
                          "--api-socket", str(tmp_path / "agent.sock")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1, res.stderr
    assert "pip install 'axoneme[agent]' (missing module" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_readme_node_install_gives_every_plugin(dist: Path, tmp_path: Path) -> None:
    bin_dir = _venv(tmp_path / "venv")
    _run_readme_block(readme_blocks()[2], bin_dir, dist)
    assert _importable(bin_dir, AGENT_EXTRA_MODULES) == dict.fromkeys(AGENT_EXTRA_MODULES, True)
    data = _plugins(bin_dir)
    assert set(data["datapath"]) == {"noop", "ebpf", "iptables"}
    assert set(data["l7"]) == {"http", "kafka", "dns"}
    # the CNI plugin runs from the venv as a runtime runs it
    res = subprocess.run([str(bin_dir / "axoneme-cni")], input='{"cniVersion": "1.1.0"}',
                         env={"CNI_COMMAND": "VERSION", "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "1.1.0" in json.loads(res.stdout)["supportedVersions"]


def test_wheels_install_a_subset(dist: Path, tmp_path: Path) -> None:
    uv = _uv()
    venv = tmp_path / "venv"
    subprocess.run([uv, "venv", "--quiet", "--python", PYTHON, str(venv)], check=True)
    env = {**os.environ, "VIRTUAL_ENV": str(venv)}
    env.pop("UV_PROJECT_ENVIRONMENT", None)
    subprocess.run([uv, "pip", "install", "--quiet", "--python", str(venv / "bin" / "python"),
                    "--find-links", str(dist), "axoneme[http]"], check=True, env=env, cwd=tmp_path)
    data = _plugins(venv / "bin")
    # only what was chosen: the built-in noop datapath and the http parser
    assert set(data["datapath"]) == {"noop"}
    assert set(data["l7"]) == {"http"}
    # the namespace stays PEP 420 after installation
    site = next((venv / "lib").glob("python3*/site-packages"))
    assert not (site / "axoneme" / "__init__.py").exists()
    assert (site / "axoneme" / "core" / "py.typed").exists()
