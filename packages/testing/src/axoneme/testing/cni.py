"""The CNI plugin executables a test can run: the Python plugin (``axoneme-cni``)
and its native fast path (``axoneme-cni-native``, built by scripts/cni-build),
both beside this interpreter."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

KINDS = ("python", "native")


def plugin_executable(kind: str) -> str:
    """The path of the ``kind`` plugin; skips the test when it is not built
    (the native one needs a Go toolchain at bootstrap)."""
    name = {"python": "axoneme-cni", "native": "axoneme-cni-native"}[kind]
    exe = os.path.join(os.path.dirname(sys.executable), name)
    if not os.access(exe, os.X_OK):
        pytest.skip(f"{exe} is not built (scripts/cni-build needs a Go toolchain)")
    return exe


def build_native_without_fallback(source: str, out: str) -> str:
    """Build the native plugin from ``source`` (packages/cni/native) into ``out`` as
    scripts/k8s-images builds it for the image: static, main.fallback empty (it runs
    axoneme-cni-python beside itself). Skips the test without a Go toolchain."""
    go = shutil.which("go") or "/usr/local/go/bin/go"
    if not os.access(go, os.X_OK):
        pytest.skip("no Go toolchain to build packages/cni/native (scripts/cni-build needs one too)")
    cache = os.path.join(os.path.expanduser("~"), ".cache", "axoneme", "go")
    env = dict(os.environ, GOMODCACHE=os.path.join(cache, "mod"), GOCACHE=os.path.join(cache, "build"),
               GOFLAGS="-mod=mod -buildvcs=false", GOTOOLCHAIN="local", CGO_ENABLED="0")
    subprocess.run([go, "build", "-trimpath", "-ldflags", "-s -w", "-o", out, "."], cwd=source,
                   env=env, check=True, capture_output=True, timeout=300)
    return out
