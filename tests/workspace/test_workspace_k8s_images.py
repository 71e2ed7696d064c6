"""scripts/k8s-images: the OCI image layout it writes, and its images in a real containerd.

The writer's output must be a valid OCI image layout (index -> manifest ->
config and layers, every digest and size matching its blob) and reproducible
(the same content gives the same manifest digest, whatever the files' mtimes).
As root, the pause and agnhost images are built (cached after the first run),
imported into a throwaway containerd (scripts/k8s-build's binaries, built if
missing), listed by `ctr images ls` under the names the cluster needs, and
agnhost runs under `ctr run` with its shell and applets.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import runpy
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from axoneme.testing import capability

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "k8s-images"


def _load_script() -> SimpleNamespace:
    return SimpleNamespace(**runpy.run_path(str(SCRIPT), run_name="k8s_images_script"))


ki = _load_script()


def _tree(top: Path, mtime: float) -> Path:
    (top / "bin").mkdir(parents=True)
    (top / "bin" / "tool").write_bytes(b"#!/bin/sh\necho hi\n")
    (top / "bin" / "tool").chmod(0o755)
    (top / "bin" / "hard").hardlink_to(top / "bin" / "tool")
    (top / "bin" / "sh").symlink_to("tool")
    (top / "etc").mkdir()
    (top / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    for p in (top / "bin" / "tool", top / "etc" / "passwd", top / "etc", top / "bin"):
        os.utime(p, (mtime, mtime))
    return top


def _image(tmp: Path, mtime: float) -> tuple[Path, str]:
    top = _tree(tmp / "root", mtime)
    layer = ki.write_layer(ki.tree_entries(top), tmp / "layer.tar.gz", "test layer")
    archive = tmp / "image.oci.tar"
    digest = ki.write_oci_archive("example.test/img:1", [layer],
                                  {"Entrypoint": ["/bin/tool"], "Env": ["PATH=/bin"], "WorkingDir": "/"},
                                  archive)
    return archive, digest


def _blob(tar: tarfile.TarFile, desc: dict[str, object]) -> bytes:
    digest = str(desc["digest"])
    f = tar.extractfile(f"blobs/sha256/{digest.split(':')[1]}")
    assert f is not None, f"blob {digest} missing"
    data = f.read()
    assert f"sha256:{hashlib.sha256(data).hexdigest()}" == digest
    assert len(data) == desc["size"]
    return data


def test_oci_layout_is_valid_and_reproducible(tmp_path: Path) -> None:
    archive, digest = _image(tmp_path / "a", 1_700_000_000)
    with tarfile.open(archive) as tar:
        assert json.loads(tar.extractfile("oci-layout").read()) == {"imageLayoutVersion": "1.0.0"}  # type: ignore[union-attr]
        index = json.loads(tar.extractfile("index.json").read())  # type: ignore[union-attr]
        assert index["schemaVersion"] == 2 and len(index["manifests"]) == 1
        desc = index["manifests"][0]
        assert desc["digest"] == digest
        assert desc["annotations"]["org.opencontainers.image.ref.name"] == "example.test/img:1"
        assert desc["platform"] == {"architecture": "amd64", "os": "linux"}
        manifest = json.loads(_blob(tar, desc))
        assert manifest["mediaType"] == ki.MT_MANIFEST
        config = json.loads(_blob(tar, manifest["config"]))
        assert config["config"]["Entrypoint"] == ["/bin/tool"]
        assert config["os"] == "linux" and config["architecture"] == "amd64"
        [layer_desc] = manifest["layers"]
        assert layer_desc["mediaType"] == ki.MT_LAYER
        layer_tar = gzip.decompress(_blob(tar, layer_desc))
    assert config["rootfs"]["diff_ids"] == [f"sha256:{hashlib.sha256(layer_tar).hexdigest()}"]
    with tarfile.open(fileobj=io.BytesIO(layer_tar)) as lt:
        members = lt.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names) == ["bin", "bin/hard", "bin/sh", "bin/tool", "etc", "etc/passwd"]
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" for m in members)
    by = {m.name: m for m in members}
    assert by["bin/sh"].issym() and by["bin/sh"].linkname == "tool"
    # the inode is written under its first name in order; the second name is a hard link to it
    assert by["bin/hard"].isfile() and by["bin/hard"].mode == 0o755
    assert by["bin/tool"].islnk() and by["bin/tool"].linkname == "bin/hard"
    # the same content elsewhere, other mtimes: the same digests
    _, again = _image(tmp_path / "b", 1_800_000_000)
    assert again == digest
    # other content: another digest
    (tmp_path / "c").mkdir()
    _tree(tmp_path / "c" / "root", 0)
    (tmp_path / "c" / "root" / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/false\n")
    layer = ki.write_layer(ki.tree_entries(tmp_path / "c" / "root"), tmp_path / "c" / "l.tar.gz")
    other = ki.write_oci_archive("example.test/img:1", [layer], {"Entrypoint": ["/bin/tool"],
                                 "Env": ["PATH=/bin"], "WorkingDir": "/"}, tmp_path / "c" / "i.tar")
    assert other != digest


def test_bad_input_exits_2() -> None:
    res = subprocess.run([sys.executable, str(SCRIPT), "--only", "nginx"], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 2 and "--only nginx" in res.stderr
    res = subprocess.run([sys.executable, str(SCRIPT), "--address", "/nonexistent/c.sock"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "/nonexistent/c.sock" in res.stderr


def _k8s_bin() -> Path:
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "k8s-build"), "--print-dir"],
                         capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    binaries = Path(out)
    if not all((binaries / b).exists() for b in ("containerd", "containerd-shim-runc-v2", "ctr", "agnhost")):
        # a missing build is no reason to skip: build it (cached for every later run)
        subprocess.run([sys.executable, str(ROOT / "scripts" / "k8s-build")], check=True, timeout=3600)
    return binaries


@pytest.fixture
def containerd() -> Iterator[tuple[Path, str]]:
    """A throwaway containerd (no CRI) in a temp dir; stopped by PID, its mounts and dir removed."""
    if capability.lacks_root():
        pytest.skip("needs root: runs containerd and containers")
    binaries = _k8s_bin()
    d = Path(tempfile.mkdtemp(prefix="axk8simg.", dir="/tmp"))  # short: a socket path has 108 bytes
    sock = d / "containerd.sock"
    (d / "config.toml").write_text(
        f'version = 3\nroot = "{d}/root"\nstate = "{d}/state"\n'
        'disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.cri.v1.runtime", '
        '"io.containerd.cri.v1.images"]\n'
        f'[grpc]\n  address = "{sock}"\n')
    log = (d / "containerd.log").open("w")
    proc = subprocess.Popen([str(binaries / "containerd"), "--config", str(d / "config.toml")],
                            stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ, PATH=f"{binaries}:{os.environ['PATH']}"))
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert proc.poll() is None, (d / "containerd.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "containerd did not make its socket in 30 s"
            time.sleep(0.1)
        yield binaries, str(sock)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()
                  if line.split()[1].startswith(f"{d}/")]
        for m in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", m], check=False)
        subprocess.run(["rm", "-rf", "--one-file-system", str(d)], check=False)


@pytest.mark.privileged
@pytest.mark.timeout(900)
def test_pause_and_agnhost_import_and_run(containerd: tuple[Path, str]) -> None:
    binaries, sock = containerd
    res = subprocess.run([sys.executable, str(SCRIPT), "--only", "pause", "agnhost", "--address", sock],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{ki.PAUSE}: imported" in res.stdout and f"{ki.AGNHOST}: imported" in res.stdout
    ctr = [str(binaries / "ctr"), "--address", sock, "-n", "k8s.io"]
    listed = subprocess.run([*ctr, "images", "ls", "-q"], capture_output=True, text=True, timeout=60,
                            check=True).stdout.split()
    assert ki.PAUSE in listed and ki.AGNHOST in listed
    # a second call finds both in containerd and imports nothing
    res = subprocess.run([sys.executable, str(SCRIPT), "--only", "pause", "agnhost", "--address", sock],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "imported" not in res.stdout and res.stdout.count("already in containerd") == 2
    # agnhost runs, with a shell, the applets e2e tests use, and upstream's image user and group
    cmd = ("/agnhost --version; id user-defined-in-image; cat /etc/nsswitch.conf | grep hosts; "
           "ls /agnhost-2 /localhost.crt; echo x | nc -w1 127.0.0.1 1 || echo nc refused")
    run = subprocess.run([*ctr, "run", "--rm", ki.AGNHOST, f"axk8simg-{os.getpid()}", "sh", "-c", cmd],
                         capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PATH=f"{binaries}:{os.environ['PATH']}"))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2.66.1" in run.stdout
    assert "groups=1000(user-defined-in-image),50000(group-defined-in-image)" in run.stdout
    assert "hosts: files dns" in run.stdout and "/agnhost-2" in run.stdout
    assert "nc refused" in run.stdout
