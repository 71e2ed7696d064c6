"""scripts/k8s-build's wrapper modules (deploy/k8s-build), checked without building anything.

The kubernetes wrapper must replace every staging module that the pinned
k8s.io/kubernetes go.mod names (else `go build` fails on `k8s.io/foo v0.0.0`),
each with its published v0.x twin of the same release. The pinned go.mod comes
from the build's module cache; without one it is fetched alone (its .mod file,
a few KB, no source) into a temporary module cache.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "k8s-build"
WRAPPERS = ROOT / "deploy" / "k8s-build"


def _load_script() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("k8s_build_script", str(SCRIPT))
    spec = importlib.util.spec_from_loader("k8s_build_script", loader)
    assert spec is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    loader.exec_module(mod)
    return mod


kb = _load_script()


def _wrapper(name: str) -> str:
    return (WRAPPERS / name / "go.mod").read_text()


def _pinned() -> str:
    version = kb.gomod_require(_wrapper("kubernetes"), kb.K8S_MODULE)
    assert version, "deploy/k8s-build/kubernetes/go.mod requires no k8s.io/kubernetes"
    return str(version)


@pytest.fixture(scope="module")
def kube_gomod(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The pinned k8s.io/kubernetes go.mod: from the build's module cache, else fetched alone."""
    version = _pinned()
    cached = kb.GO_CACHE / "mod" / "cache" / "download" / "k8s.io" / "kubernetes" / "@v" / f"{version}.mod"
    if cached.is_file():
        print(f"kubernetes go.mod from the module cache: {cached}")
        return cached.read_text()
    if not shutil.which("go"):
        pytest.skip(f"no module cache at {cached} and no go toolchain to fetch the go.mod")
    tmp = tmp_path_factory.mktemp("kgomod")
    (tmp / "go.mod").write_text(f"module probe\n\ngo 1.21\n\nrequire {kb.K8S_MODULE} {version}\n")
    env = dict(os.environ, GOMODCACHE=str(tmp / "mod"), GOFLAGS="-mod=mod", GOTOOLCHAIN="local")
    # loading the graph fetches kubernetes' .mod, then stops at its unpublished v0.0.0 staging
    # requirements: the exit status says nothing here, the file does
    subprocess.run(["go", "list", "-m", kb.K8S_MODULE], cwd=tmp, env=env, capture_output=True,
                   timeout=180, check=False)
    fetched = tmp / "mod" / "cache" / "download" / "k8s.io" / "kubernetes" / "@v" / f"{version}.mod"
    assert fetched.is_file(), f"go could not fetch {kb.K8S_MODULE}@{version}'s go.mod"
    text = fetched.read_text()
    print(f"kubernetes go.mod fetched alone: {fetched}")
    subprocess.run(["chmod", "-R", "u+w", str(tmp)], check=False)
    return text


def test_wrapper_replaces_every_staging_module_with_its_twin(kube_gomod: str) -> None:
    version = _pinned()
    staging = kb.staging_modules(kube_gomod)
    assert "k8s.io/api" in staging and "k8s.io/kubelet" in staging and len(staging) >= 25, staging
    replaced = kb.replaced_with(_wrapper("kubernetes"))
    missing = [m for m in staging if m not in replaced]
    assert not missing, f"deploy/k8s-build/kubernetes/go.mod: no replace for staging modules {missing}"
    twin = kb.twin_version(version)
    wrong = {m: replaced[m] for m in staging if replaced[m] != (m, twin)}
    assert not wrong, f"deploy/k8s-build/kubernetes/go.mod: staging modules not at {twin}: {wrong}"
    # and the checked-in file is what the generator writes for this go.mod (plus go mod tidy)
    generated = kb.replaced_with(kb.kube_wrapper_gomod(version, kube_gomod))
    assert {m: replaced[m] for m in generated} == generated


def test_etcd_is_the_release_line_kubernetes_uses(kube_gomod: str) -> None:
    kube_etcd = kb.gomod_require(kube_gomod, kb.ETCD_MODULE)
    ours = kb.gomod_require(_wrapper("etcd"), kb.ETCD_MODULE)
    assert kube_etcd and ours, (kube_etcd, ours)
    assert ours.split(".")[:2] == kube_etcd.split(".")[:2], \
        f"deploy/k8s-build/etcd/go.mod: etcd {ours}, kubernetes {_pinned()} uses {kube_etcd}"
    etcd = _wrapper("etcd")
    for sibling in kb.ETCD_SIBLINGS:  # server/v3's own ../ replaces do not apply to us
        assert kb.gomod_require(etcd, sibling) == ours, sibling


def test_wrappers_name_the_components_they_build() -> None:
    kube = _wrapper("kubernetes")
    for tool in kb.KUBE_TOOLS:
        assert f"\t{kb.K8S_MODULE}/{tool}\n" in kube, tool
    containerd = _wrapper("containerd")
    assert (kb.gomod_require(containerd, kb.CONTAINERD_MODULE) or "").startswith("v2."), containerd
    for tool in kb.CONTAINERD_TOOLS:
        assert f"\t{kb.CONTAINERD_MODULE}/{tool}\n" in containerd, tool


def test_twin_version() -> None:
    assert kb.twin_version("v1.37.2") == "v0.37.2"
    assert kb.twin_version("v1.38.0-beta.0") == "v0.38.0-beta.0"
    with pytest.raises(kb.UsageError, match="v1.37.2"):
        kb.twin_version("1.37")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


def test_print_dir_names_the_cache_and_builds_nothing(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, str(SCRIPT), "--print-dir"], capture_output=True, text=True,
                         timeout=60, cwd=ROOT, env=dict(os.environ, AXONEME_CACHE=str(tmp_path)))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(tmp_path / "k8s" / _pinned() / "bin")
    assert not (tmp_path / "k8s").exists(), "--print-dir created or built something"


def test_bad_version_exits_2_naming_the_flag() -> None:
    res = _run("--version", "latest", "--print-dir")
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "--version 'latest'" in res.stderr and res.stdout == ""


@pytest.mark.parametrize("written, expected", [("3.7.0", "v3.7.0"), ('"3.5.21-0"', "v3.5.21")])
def test_etcd_version_from_dependencies_yaml(tmp_path: Path, written: str, expected: str) -> None:
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / "dependencies.yaml").write_text(
        f'dependencies:\n  # etcd\n  - name: "etcd"\n    version: {written}\n    refPaths:\n')
    assert kb.Builder.etcd_for(tmp_path) == expected
    (tmp_path / "build" / "dependencies.yaml").write_text("dependencies: []\n")
    with pytest.raises(kb.BuildError, match="dependencies.yaml: no etcd version"):
        kb.Builder.etcd_for(tmp_path)
