"""The web UI's bundle: built by scripts/ui-build (scripts/bootstrap runs it) from ui/'s
current sources and lock file, into the agent package's static/ that `axoneme ui` serves
and the wheel ships (docs/ui.md)."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STATIC = ROOT / "packages" / "agent" / "src" / "axoneme" / "agent" / "ui" / "static"


def test_bundle_is_built_from_the_current_sources() -> None:
    res = subprocess.run([str(ROOT / "scripts" / "ui-build"), "--check"], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, (
        f"the UI bundle in {STATIC} is missing or older than ui/: run scripts/bootstrap "
        f"(or scripts/ui-build)")
    index = (STATIC / "index.html").read_text()
    assets = re.findall(r'(?:src|href)="\./(assets/[^"]+)"', index)
    assert any(a.endswith(".js") for a in assets) and any(a.endswith(".css") for a in assets), index
    for asset in assets:
        assert (STATIC / asset).is_file(), asset


def test_bundle_is_git_ignored_and_shipped_by_the_wheel() -> None:
    res = subprocess.run(["git", "check-ignore", "-q", str(STATIC / "index.html")], cwd=ROOT)
    assert res.returncode == 0, "static/ must stay out of git (it is built)"
    pyproject = tomllib.loads((ROOT / "packages" / "agent" / "pyproject.toml").read_text())
    assert "src/axoneme/agent/ui/static/**" in pyproject["tool"]["hatch"]["build"]["artifacts"]
