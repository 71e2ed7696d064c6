"""Pod create -> Ready with the native CNI plugin against the Python one, same cluster, interleaved
(``scripts/bench-k8s --only ready``).

The agent installs, in Kubernetes mode, the native plugin as <bin dir>/axoneme-cni and the Python
plugin's zipapp beside it as axoneme-cni-python. Each round measures N pods with the installed
(native) plugin, then N with the zipapp put in its place (write + rename, as the agent installs),
then puts the native one back; the load average is recorded with each run. Without a native
plugin installed (an image built with no Go toolchain) only the installed one is measured.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CNI_BIN = REPO / ".cluster" / "cni" / "bin"
PLUGIN, PYTHON_PLUGIN = "axoneme-cni", "axoneme-cni-python"


def plugin_kind(path: Path) -> str:
    head = path.read_bytes()[:4]
    return "native" if head == b"\x7fELF" else "python" if head[:2] == b"#!" else f"unknown {head!r}"


def _replace(src: Path, dest: Path) -> None:
    tmp = dest.with_name(dest.name + ".bench-tmp")
    shutil.copyfile(src, tmp)
    tmp.chmod(0o755)
    tmp.replace(dest)


@contextmanager
def python_plugin_installed(bin_dir: Path = CNI_BIN) -> Iterator[None]:
    """The zipapp as axoneme-cni for the block; the native plugin back after it, whatever happens."""
    saved = bin_dir / ".axoneme-cni.native-saved"
    shutil.copyfile(bin_dir / PLUGIN, saved)
    try:
        _replace(bin_dir / PYTHON_PLUGIN, bin_dir / PLUGIN)
        yield
    finally:
        _replace(saved, bin_dir / PLUGIN)
        saved.unlink()


def run(measure: Callable[[], list[float]], rounds: int,
        bin_dir: Path = CNI_BIN) -> dict[str, list[dict[str, object]]]:
    """kind -> one entry per run: the latencies (s) and the 1-min load average before and after."""
    installed = plugin_kind(bin_dir / PLUGIN)
    ab = installed == "native" and (bin_dir / PYTHON_PLUGIN).exists()
    out: dict[str, list[dict[str, object]]] = {}

    def one(kind: str) -> None:
        load0 = os.getloadavg()[0]
        values = measure()
        out.setdefault(kind, []).append({"values": values, "load": [round(load0, 2),
                                                                    round(os.getloadavg()[0], 2)]})
        print(f"pod create -> Ready, {kind} plugin: p50 {sorted(values)[len(values) // 2]:.3f} s "
              f"(load {load0:.2f})", flush=True)

    for _ in range(rounds):
        one(installed)
        if ab:
            with python_plugin_installed(bin_dir):
                assert plugin_kind(bin_dir / PLUGIN) == "python"
                one("python")
    assert plugin_kind(bin_dir / PLUGIN) == installed
    return out
