"""Flame graph of the HTTP proxy under wrk load (keep-alive, 16 connections,
no-op asyncio upstream): the same processes as ``test_l7_http_bench.py``,
profiled with py-spy (needs root or ptrace rights).

    python packages/l7-http/benchmarks/flame.py OUT.svg [SECONDS]
"""

from __future__ import annotations

import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
from test_l7_http_bench import PROXY, UPSTREAM, _spawn  # noqa: E402


def main() -> None:
    out, seconds = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 10
    up, up_port = _spawn(UPSTREAM)
    px, px_port = _spawn(PROXY, str(up_port))
    try:
        spy = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "py-spy"), "record",
                                "-p", str(px.pid), "-d", str(seconds + 1), "-r", "250",
                                "-o", out, "-f", "raw" if out.endswith(".txt") else "flamegraph", "--nonblocking"])
        wrk = subprocess.run(["wrk", "-t1", "-c16", f"-d{seconds}s", "--latency",
                              f"http://127.0.0.1:{px_port}/bench"], capture_output=True, text=True)
        print(wrk.stdout)
        spy.wait(60)
    finally:
        for p in (px, up):
            p.terminate()
            p.wait(5)


if __name__ == "__main__":
    main()
