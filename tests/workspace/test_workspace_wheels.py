"""Built wheels install a working CLI with only the chosen plugins."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _uv() -> str:
    found = shutil.which("uv") or str(Path.home() / ".local" / "bin" / "uv")
    if not Path(found).exists():
        pytest.skip("uv is not installed (scripts/bootstrap installs it)")
    return found


def test_wheels_install_a_subset(tmp_path):
    uv = _uv()
    dist = tmp_path / "dist"
    for pkg in ("core", "agent", "l7-http"):
        subprocess.run([uv, "build", "--wheel", "--out-dir", str(dist), str(ROOT / "packages" / pkg)],
                       check=True, capture_output=True, cwd=ROOT)
    wheels = sorted(p.name for p in dist.glob("*.whl"))
    assert len(wheels) == 3, wheels
    venv = tmp_path / "venv"
    subprocess.run([uv, "venv", "--quiet", "--python", "/usr/bin/python3", str(venv)], check=True)
    env = {**os.environ, "VIRTUAL_ENV": str(venv)}
    env.pop("UV_PROJECT_ENVIRONMENT", None)
    subprocess.run([uv, "pip", "install", "--quiet", "--python", str(venv / "bin" / "python"),
                    "--find-links", str(dist), "axoneme[http]"], check=True, env=env, cwd=tmp_path)
    out = subprocess.run([str(venv / "bin" / "axoneme"), "plugins", "-o", "json"],
                         check=True, capture_output=True, text=True, cwd=tmp_path)
    data = json.loads(out.stdout)
    # only what was chosen: the built-in noop datapath and the http parser
    assert set(data["datapath"]) == {"noop"}
    assert set(data["l7"]) == {"http"}
    # the namespace stays PEP 420 after installation
    site = next((venv / "lib").glob("python3*/site-packages"))
    assert not (site / "axoneme" / "__init__.py").exists()
    assert (site / "axoneme" / "core" / "py.typed").exists()
