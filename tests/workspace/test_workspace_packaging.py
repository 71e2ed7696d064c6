"""Every distribution is publishable the same way: one version, lockstep pins, license, metadata."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = sorted(p for p in (ROOT / "packages").iterdir() if (p / "pyproject.toml").exists())
REPOSITORY = "https://github.com/axoneme/axoneme"  # placeholder until the project is published


def _project(path: Path) -> dict:
    return tomllib.loads(path.read_text())["project"]


def _requirements(project: dict) -> list[str]:
    return [*project.get("dependencies", []),
            *(r for extra in project.get("optional-dependencies", {}).values() for r in extra)]


def _version() -> str:
    return _project(ROOT / "pyproject.toml")["version"]


def test_one_version_everywhere() -> None:
    versions = {p.name: _project(p / "pyproject.toml")["version"] for p in PACKAGES}
    assert set(versions.values()) == {_version()}, versions


@pytest.mark.parametrize("pkg", PACKAGES, ids=lambda p: p.name)
def test_internal_requirements_pinned_in_lockstep(pkg: Path) -> None:
    project = _project(pkg / "pyproject.toml")
    ours = {_project(p / "pyproject.toml")["name"] for p in PACKAGES}
    for req in _requirements(project):
        name = re.split(r"[<>=~!\[ ;]", req, maxsplit=1)[0]
        if name == project["name"]:
            assert re.fullmatch(r"[a-z0-9-]+\[[a-z0-9,-]+\]", req), f"self-reference {req!r}: extras only"
        elif name.startswith("axoneme"):
            assert name in ours, f"{req!r}: no such distribution in the workspace"
            assert req == f"{name}=={_version()}", f"{pkg.name}: {req!r} must be {name}=={_version()}"


@pytest.mark.parametrize("pkg", PACKAGES, ids=lambda p: p.name)
def test_license_and_metadata(pkg: Path) -> None:
    project = _project(pkg / "pyproject.toml")
    assert project["license"] == "Apache-2.0"  # SPDX expression (PEP 639)
    assert project["license-files"] == ["LICENSE"]
    # a copy, not a link: an sdist keeps links, and the wheel built from it would lose the file
    assert not (pkg / "LICENSE").is_symlink()
    assert (pkg / "LICENSE").read_bytes() == (ROOT / "LICENSE").read_bytes(), f"{pkg.name}/LICENSE"
    classifiers = project["classifiers"]
    assert not [c for c in classifiers if c.startswith("License ::")], "PEP 639: the expression only"
    for needed in ("Programming Language :: Python :: 3 :: Only", "Operating System :: POSIX :: Linux",
                   "Typing :: Typed"):
        assert needed in classifiers, needed
    assert project["urls"] == {"Homepage": REPOSITORY, "Documentation": f"{REPOSITORY}/tree/main/docs",
                               "Source": REPOSITORY, "Issues": f"{REPOSITORY}/issues"}
    assert project["description"] and project["readme"] == "README.md"
    build = tomllib.loads((pkg / "pyproject.toml").read_text())["build-system"]
    assert "hatchling>=1.27" in build["requires"], "license-files needs hatchling 1.27"


def test_root_license_is_apache_2() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License")
    assert "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text


def test_agent_heavy_dependencies_are_the_agent_extra() -> None:
    """The CLI's offline commands need axoneme-core only; the node agent's deps are an extra."""
    agent = _project(ROOT / "packages" / "agent" / "pyproject.toml")
    # argcomplete: shell completion of the CLI itself (pure Python, no dependencies of its own);
    # PyYAML (-o yaml) comes with axoneme-core anyway, declared as the CLI imports it
    assert agent["dependencies"] == ["argcomplete>=3.1", f"axoneme-core=={_version()}", "pyyaml>=6"]
    extras = agent["optional-dependencies"]
    heavy = {re.split(r"[<>=]", r)[0] for r in extras["agent"]}
    assert heavy == {"aiohttp", "prometheus-client", "kubernetes",
                     "opentelemetry-api", "opentelemetry-sdk",
                     "opentelemetry-exporter-otlp-proto-http", "grpcio", "protobuf",
                     "uvloop",  # the proxies' event loop
                     "httptools"}  # the API socket's front for the policy changes (_apifast)
    for datapath in ("ebpf", "iptables"):
        assert "axoneme[agent]" in extras[datapath], f"axoneme[{datapath}] must be a working node"
