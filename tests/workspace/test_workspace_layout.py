"""The workspace keeps its shape: PEP 420 namespace, py.typed, pants roots,
entry points, documented hooks, and the import rules of STYLE.md."""

from __future__ import annotations

import ast
import inspect
import re
import sys
import tomllib
from importlib.metadata import distribution, entry_points
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = sorted(p for p in (ROOT / "packages").iterdir() if (p / "pyproject.toml").exists())

# distribution -> the import prefix it owns
OWNS = {
    "axoneme-core": "axoneme.core",
    "axoneme": "axoneme.agent",
    "axoneme-datapath-ebpf": "axoneme.datapath.ebpf",
    "axoneme-datapath-iptables": "axoneme.datapath.iptables",
    "axoneme-l7-http": "axoneme.l7.http",
    "axoneme-l7-kafka": "axoneme.l7.kafka",
    "axoneme-l7-dns": "axoneme.l7.dns",
    "axoneme-cni": "axoneme.cni",
    "axoneme-testing": "axoneme.testing",
}


def _pyproject(pkg: Path) -> dict:
    return tomllib.loads((pkg / "pyproject.toml").read_text())


def _dist(pkg: Path) -> str:
    return _pyproject(pkg)["project"]["name"]


def test_every_package_is_a_workspace_member_with_readme_and_tests():
    assert {p.name for p in PACKAGES} == {
        "core", "agent", "datapath-ebpf", "datapath-iptables", "l7-http", "l7-kafka", "l7-dns", "cni",
        "testing"}
    for pkg in PACKAGES:
        assert (pkg / "README.md").is_file(), pkg
        assert (pkg / "tests").is_dir(), pkg
        assert (pkg / "src" / "axoneme").is_dir(), pkg


def test_pep420_namespace_has_no_init():
    for pkg in PACKAGES:
        for ns in ("axoneme", "axoneme/datapath", "axoneme/l7"):
            assert not (pkg / "src" / ns / "__init__.py").exists(), f"{pkg.name}: {ns}/__init__.py breaks PEP 420"


def test_every_leaf_has_py_typed():
    for pkg in PACKAGES:
        leaf = pkg / "src" / Path(*OWNS[_dist(pkg)].split("."))
        assert (leaf / "py.typed").is_file(), leaf
        assert (leaf / "__init__.py").is_file(), leaf


def test_pants_roots_match_workspace_members():
    pants = tomllib.loads((ROOT / "pants.toml").read_text())
    roots = set(pants["source"]["root_patterns"])
    assert roots == {f"packages/{p.name}/src" for p in PACKAGES}
    root = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert root["tool"]["uv"]["workspace"]["members"] == ["packages/*"]
    assert root["tool"]["uv"]["package"] is False


@pytest.mark.parametrize("group", ["axoneme.datapath", "axoneme.l7", "axoneme.plugins"])
def test_every_entry_point_loads_by_name(group):
    from axoneme.core.plugins import load_class

    eps = {ep.name: ep for ep in entry_points(group=group)}
    if group != "axoneme.plugins":
        assert eps, f"no {group} entry points installed"
    for name in eps:
        obj = load_class(group, name)
        assert obj is not None
        if group == "axoneme.datapath":
            from axoneme.core.datapath import Datapath
            assert issubclass(obj, Datapath) and obj.name == name
        if group == "axoneme.l7":
            from axoneme.core.l7 import L7Parser
            assert issubclass(obj, L7Parser) and obj.name == name


def test_expected_builtin_entry_points_are_declared():
    assert {"ebpf", "iptables", "noop"} <= {ep.name for ep in entry_points(group="axoneme.datapath")}
    assert {"http", "kafka", "dns"} <= {ep.name for ep in entry_points(group="axoneme.l7")}


def test_unknown_plugin_fails_loudly():
    from axoneme.core.errors import PluginError
    from axoneme.core.plugins import load_driver

    with pytest.raises(PluginError, match="no axoneme.datapath plugin named 'nope'"):
        load_driver("axoneme.datapath", "nope")


def test_every_hook_is_documented():
    from axoneme.core import hookspecs

    doc = (ROOT / "docs" / "plugins.md").read_text()
    hooks = [n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("axoneme_")]
    assert hooks
    for name in hooks:
        assert f"### `{name}(" in doc, f"hook {name} is not documented in docs/plugins.md"
        fn = getattr(hookspecs, name)
        assert ":param" in (fn.__doc__ or "") or not inspect.signature(fn).parameters, name
        assert "Who implements" in (fn.__doc__ or ""), name


def test_plugin_manager_is_not_built_at_import():
    import axoneme.core.plugins as plugins

    src = Path(plugins.__file__).read_text()
    tree = ast.parse(src)
    for node in tree.body:
        if isinstance(node, ast.Assign | ast.Expr) and "PluginManager(" in ast.unparse(node):
            pytest.fail("plugin manager built at import time")


# --- import rules ---------------------------------------------------------------

def _imports(pkg: Path) -> dict[str, set[str]]:
    """module file -> top-level-qualified names it imports."""
    out: dict[str, set[str]] = {}
    for f in (pkg / "src").rglob("*.py"):
        if GENERATED in f.parts:
            continue
        names: set[str] = set()
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        out[str(f.relative_to(ROOT))] = names
    return out


FORBIDDEN = {
    "axoneme-core": [r"^axoneme\.(?!core)"],
    "axoneme": [r"^axoneme\.datapath", r"^axoneme\.l7", r"^axoneme\.cni"],
    "axoneme-datapath-ebpf": [r"^axoneme\.(agent|l7|cni|datapath\.(?!ebpf))"],
    "axoneme-datapath-iptables": [r"^axoneme\.(agent|l7|cni|datapath\.(?!iptables))"],
    "axoneme-l7-http": [r"^axoneme\.(agent|datapath|cni|l7\.(?!http))"],
    "axoneme-l7-kafka": [r"^axoneme\.(agent|datapath|cni|l7\.(?!kafka))"],
    "axoneme-l7-dns": [r"^axoneme\.(agent|datapath|cni|l7\.(?!dns))"],
    "axoneme-cni": [r"^axoneme\.(?!core|cni)"],
    "axoneme-testing": [r"^axoneme\.(?!core|testing)"],
}


@pytest.mark.parametrize("pkg", PACKAGES, ids=lambda p: p.name)
def test_import_rules(pkg):
    bad = []
    for module, names in _imports(pkg).items():
        for name in names:
            for pattern in FORBIDDEN[_dist(pkg)]:
                if re.match(pattern, name):
                    bad.append(f"{module} imports {name}")
    assert not bad, "\n".join(bad)


# generated at bootstrap, not in git (scripts/hubble-build --protos): not our code
GENERATED = "_hubble_pb"
# import name -> distribution, for third-party imports
IMPORT_DIST = {
    "yaml": "PyYAML", "pluggy": "pluggy", "stevedore": "stevedore", "aiohttp": "aiohttp",
    "prometheus_client": "prometheus-client", "dnslib": "dnslib",
    "h11": "h11", "kafka": "kafka-python", "aiokafka": "aiokafka", "opentelemetry": "opentelemetry-api",
    "re2": "google-re2", "pytest": "pytest", "kubernetes": "kubernetes", "argcomplete": "argcomplete",
    "grpc": "grpcio", "google": "protobuf", "uvloop": "uvloop", "httptools": "httptools",
}
# distributions that share a top-level import name with another: the module they own
DIST_IMPORT = {"opentelemetry-sdk": "opentelemetry.sdk",
               "opentelemetry-exporter-otlp-proto-http": "opentelemetry.exporter.otlp.proto.http"}
# provided by Debian (python3-bpfcc), never a PyPI dependency
SYSTEM_IMPORTS = {"bcc"}


def _declared(pkg: Path) -> set[str]:
    """Requirements, extras included (the agent's own dependencies are its `agent` extra)."""
    project = _pyproject(pkg)["project"]
    deps = [*project.get("dependencies", []),
            *(d for extra in project.get("optional-dependencies", {}).values() for d in extra)]
    return {re.split(r"[<>=~!\[ ;]", d, maxsplit=1)[0].lower() for d in deps}


@pytest.mark.parametrize("pkg", PACKAGES, ids=lambda p: p.name)
def test_third_party_imports_are_declared(pkg):
    declared = _declared(pkg)
    stdlib = set(sys.stdlib_module_names)
    missing = []
    for module, names in _imports(pkg).items():
        for name in names:
            top = name.split(".")[0]
            if top in stdlib or top == "axoneme" or top in SYSTEM_IMPORTS or top == "__future__":
                continue
            dist = IMPORT_DIST.get(top)
            if dist is None:
                missing.append(f"{module}: import {name} has no known distribution (add it to IMPORT_DIST)")
            elif dist.lower() not in declared:
                missing.append(f"{module}: imports {top} but {_dist(pkg)} does not depend on {dist}")
    assert not missing, "\n".join(missing)


def test_no_pypi_bcc_dependency():
    for pkg in PACKAGES:
        assert "bcc" not in _declared(pkg), f"{pkg.name} lists PyPI 'bcc' (unrelated package)"


def test_installed_distributions_match_workspace():
    for pkg in PACKAGES:
        assert distribution(_dist(pkg)).version == _pyproject(pkg)["project"]["version"]


@pytest.mark.parametrize("pkg", PACKAGES, ids=lambda p: p.name)
def test_declared_dependencies_are_imported(pkg):
    """A distribution depends on nothing it does not import (extras naming plugins aside)."""
    dist_import = {dist.lower(): name for name, dist in IMPORT_DIST.items()}
    dist_import.update({d: prefix for d, prefix in OWNS.items()})
    dist_import.update(DIST_IMPORT)
    imported = {n for names in _imports(pkg).values() for n in names}
    project = _pyproject(pkg)["project"]
    # base requirements and the agent's own extra; the other extras install plugins,
    # which are loaded by entry point, never imported
    reqs = [*project.get("dependencies", []), *project.get("optional-dependencies", {}).get("agent", [])]
    unused = []
    for req in reqs:
        dist = re.split(r"[<>=~!\[ ;]", req, maxsplit=1)[0].lower()
        name = dist_import.get(dist)
        if name is None or not any(n == name or n.startswith(name + ".") for n in imported):
            unused.append(f"{_dist(pkg)} depends on {dist} but does not import it")
    assert not unused, "\n".join(unused)
