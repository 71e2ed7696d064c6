"""The CNI plugin executables a test can run: the Python plugin (``axoneme-cni``)
and its native fast path (``axoneme-cni-native``, built by scripts/cni-build),
both beside this interpreter."""

from __future__ import annotations

import os
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
