"""The agent's Hubble gRPC stubs are generated, never written by hand (issue 18).

scripts/hubble-build --protos generates them with grpcio-tools from the .proto
files of the pinned Cilium Go module into packages/agent/src/axoneme/agent/_hubble_pb/
(scripts/bootstrap runs it). Here: nothing under that directory is in git, and
the stubs the agent imports are byte for byte what the generator makes now from
the same .proto files (a hand edit, or stubs of another Cilium, fails).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "hubble-build"
STUBS = ROOT / "packages" / "agent" / "src" / "axoneme" / "agent" / "_hubble_pb"


def _load_script() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("hubble_build_script", str(SCRIPT))
    spec = importlib.util.spec_from_loader("hubble_build_script", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


def test_stubs_are_not_in_git() -> None:
    tracked = subprocess.run(["git", "ls-files", "--", str(STUBS.relative_to(ROOT))], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    assert tracked == [], f"generated Hubble stubs committed: {tracked}"
    probe = STUBS.relative_to(ROOT) / "flow" / "flow_pb2.py"
    ignored = subprocess.run(["git", "check-ignore", "-q", str(probe)], cwd=ROOT)
    assert ignored.returncode == 0, f"{probe} is not ignored by git"


def test_stubs_are_the_generators_output(tmp_path: Path) -> None:
    script = _load_script()
    source = script.GO_CACHE / "mod" / f"{script.MODULE}@{script.VERSION}"
    if not (source / "api" / "v1" / "flow" / "flow.proto").exists():
        pytest.skip(f"Cilium's Go module {script.VERSION} is not in {script.GO_CACHE} "
                    "(scripts/hubble-build --protos fetches it)")
    if not (STUBS / ".stamp").exists():
        pytest.fail("no Hubble stubs: run scripts/hubble-build --protos (scripts/bootstrap does)")
    out = tmp_path / "stubs"
    assert script.generate_stubs(source, out) is True
    want, have = _files(out), _files(STUBS)
    assert sorted(have) == sorted(want), "stub files differ from the generator's"
    edited = [name for name in want if have[name] != want[name]]
    assert not edited, f"stubs differ from what grpcio-tools generates: {edited}"
