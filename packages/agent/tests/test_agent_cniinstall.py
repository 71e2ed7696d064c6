"""``agent run --install-cni`` in Kubernetes mode: the native plugin as axoneme-cni with the Python
plugin's zipapp beside it (axoneme-cni-python), or the zipapp alone when the installation has no
native plugin; each file written atomically, the plugin before the conflist."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import threading
from pathlib import Path

import pytest
from axoneme.agent import _cniinstall
from axoneme.agent._config import AgentConfig
from axoneme.testing.cni import build_native_without_fallback

NATIVE_SRC = Path(__file__).resolve().parents[2] / "cni" / "native"


@pytest.fixture(scope="module")
def native(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The native plugin as the image carries it (static, no compiled-in fallback)."""
    out = tmp_path_factory.mktemp("native") / "axoneme-cni-native"
    return build_native_without_fallback(str(NATIVE_SRC), str(out))


def k8s_config(tmp_path: Path) -> AgentConfig:
    return AgentConfig(api_socket=str(tmp_path / "agent.sock"), k8s_api_server="https://10.255.254.1:6443")


def version(plugin: Path) -> subprocess.CompletedProcess[str]:
    """VERSION as containerd runs the plugin: the host's python3, a bare environment."""
    return subprocess.run([str(plugin)], input='{"cniVersion": "1.0.0"}', capture_output=True,
                          text=True, cwd="/", timeout=60,
                          env={"CNI_COMMAND": "VERSION", "PATH": "/usr/bin:/bin"})


def install(tmp_path: Path, native: str | None, monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Install into tmp_path/{net.d,bin}; the bin directory's listing when the conflist is written."""
    monkeypatch.setattr(_cniinstall, "native_plugin", lambda: native)
    seen: list[list[str]] = []
    write = _cniinstall.write_json_atomic

    def spy(path: str, doc: object) -> None:
        seen.append(sorted(os.listdir(tmp_path / "bin")))
        write(path, doc)

    monkeypatch.setattr(_cniinstall, "write_json_atomic", spy)
    _cniinstall.install_cni(k8s_config(tmp_path), str(tmp_path / "net.d"), str(tmp_path / "bin"))
    return seen


def test_native_plugin_installed_with_the_zipapp_beside_it(
        native: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "bin").mkdir()
    old = tmp_path / "bin" / "axoneme-cni"
    old.write_text("#!/bin/sh\necho old\n")
    running = old.open()  # a runtime executing the old plugin keeps its file: rename, not rewrite
    with caplog.at_level(logging.WARNING, logger=_cniinstall.LOG.name):
        at_conflist = install(tmp_path, native, monkeypatch)
    assert at_conflist == [["axoneme-cni", "axoneme-cni-python"]]  # both before the conflist
    assert running.read() == "#!/bin/sh\necho old\n"
    running.close()
    plugin, zipapp = tmp_path / "bin" / "axoneme-cni", tmp_path / "bin" / "axoneme-cni-python"
    assert plugin.read_bytes() == Path(native).read_bytes()
    assert zipapp.read_bytes().startswith(b"#!/usr/bin/env python3\n")
    for f in (plugin, zipapp):
        assert stat.S_IMODE(f.stat().st_mode) == 0o755
    assert sorted(os.listdir(tmp_path / "bin")) == ["axoneme-cni", "axoneme-cni-python"]  # no .tmp
    conflist = json.loads((tmp_path / "net.d" / "05-axoneme.conflist").read_text())
    assert conflist["plugins"] == [{"type": "axoneme-cni", "agentSocket": str(tmp_path / "agent.sock")}]
    assert "native" in caplog.text and "axoneme-cni-python" in caplog.text
    # the pair works as containerd runs it: VERSION is handed to the zipapp beside the native one
    res = version(plugin)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1.1.0" in json.loads(res.stdout)["supportedVersions"]
    zipapp.unlink()
    res = version(plugin)
    assert res.returncode == 1 and str(zipapp) in json.loads(res.stdout)["details"]


def test_without_a_native_plugin_the_zipapp_is_the_plugin(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=_cniinstall.LOG.name):
        at_conflist = install(tmp_path, None, monkeypatch)
    assert at_conflist == [["axoneme-cni"]]
    plugin = tmp_path / "bin" / "axoneme-cni"
    assert plugin.read_bytes().startswith(b"#!/usr/bin/env python3\n")
    assert stat.S_IMODE(plugin.stat().st_mode) == 0o755
    assert "no native plugin (axoneme-cni-native)" in caplog.text
    res = version(plugin)
    assert res.returncode == 0 and "1.1.0" in json.loads(res.stdout)["supportedVersions"], res.stderr


def test_native_plugin_is_the_one_beside_the_interpreter(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exe = tmp_path / "venv" / "bin" / "python3"
    exe.parent.mkdir(parents=True)
    monkeypatch.setattr(_cniinstall.sys, "executable", str(exe))
    assert _cniinstall.native_plugin() is None
    native = exe.parent / "axoneme-cni-native"
    native.write_bytes(b"\x7fELF")
    assert _cniinstall.native_plugin() is None  # not executable: not a plugin
    native.chmod(0o755)
    assert _cniinstall.native_plugin() == str(native)


def test_agents_sharing_one_bin_dir_install_together(native: str, tmp_path: Path) -> None:
    """Several nodes' agents on one host (scripts/cluster --nodes N) share the bin directory:
    installs at the same time each write their own temporary files; the result is whole."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    errors: list[BaseException] = []

    def agent() -> None:
        try:
            for _ in range(3):
                _cniinstall.install_k8s_plugin(str(bin_dir), native)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=agent) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert sorted(os.listdir(bin_dir)) == ["axoneme-cni", "axoneme-cni-python"]
    assert (bin_dir / "axoneme-cni").read_bytes() == Path(native).read_bytes()
    assert version(bin_dir / "axoneme-cni").returncode == 0
