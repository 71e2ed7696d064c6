"""HTTP proxy benchmark: requests/s and p50/p99 latency through the proxy vs
direct on loopback, keep-alive and a new connection per request, in one run.

Two upstreams: a minimal asyncio server (a no-op handler: the proxy's cost
shows in full) and the stdlib ThreadingHTTPServer (a typical Python app
server). Upstream, proxies and load generator each run in their own process;
both engines are measured in the same run: the Python proxy on uvloop, and
the native engine (axoneme-l7-http, its policy and flows served by a Python
front on uvloop, as in the agent; its CPU counts both processes). A bare uvloop relay (bytes only, no
HTTP logic) is measured in the same run: the floor any proxy process here
starts from (two more socket round trips per request). The load generator
is ``wrk`` when installed, else a bounded Python one. Numbers go to the
benchmark's extra_info and are printed; nothing is asserted on speed.
AXONEME_BENCH_QUICK=1: 1 s per case instead of 5 s.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import pytest

pytestmark = pytest.mark.bench

QUICK = os.environ.get("AXONEME_BENCH_QUICK") == "1"
SECONDS = 1 if QUICK else 5
CONNS = 16

UPSTREAM = textwrap.dedent("""
    import asyncio, sys
    BODY = b"hello from upstream\\n"
    OK = b"HTTP/1.1 200 OK\\r\\nContent-Type: text/plain\\r\\nContent-Length: %d\\r\\n\\r\\n%s" % (len(BODY), BODY)
    CLOSE = OK.replace(b"\\r\\n\\r\\n", b"\\r\\nConnection: close\\r\\n\\r\\n", 1)
    async def handle(r, w):
        try:
            while True:
                head = await r.readuntil(b"\\r\\n\\r\\n")
                if b"onnection: close" in head or b"onnection: Close" in head:
                    w.write(CLOSE); await w.drain(); break
                w.write(OK)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            w.close()
    async def main():
        srv = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=1024)
        print(srv.sockets[0].getsockname()[1], flush=True)
        await srv.serve_forever()
    asyncio.run(main())
""")

# A typical Python application server (stdlib, thread per connection, HTTP/1.1
# keep-alive): the proxy's cost relative to a real handler, not a no-op one.
APPSERVER = textwrap.dedent("""
    import http.server, sys
    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # else delayed ACKs cap keep-alive at 25 req/s
        def do_GET(self):
            body = b"hello from upstream\\n"
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *a):
            pass
    class S(http.server.ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 1024  # the default backlog (5) drops SYNs: 1 s retries
    srv = S(("127.0.0.1", 0), H)
    print(srv.server_address[1], flush=True)
    srv.serve_forever()
""")

# argv: upstream port, engine (python | native: axoneme-l7-http behind the same
# Python front, as in the agent); prints the port and the engine child's pid (0: none)
PROXY = textwrap.dedent("""
    import asyncio, socket, sys
    from axoneme.core.l7proxy import ProxyConfig, ProxyPolicy
    from axoneme.core.mapstate import Direction
    from axoneme.l7.http import HTTPRule
    from axoneme.l7.http import HttpProxy
    from axoneme.l7.http._native import NativeHttpProxy
    POLICY = ProxyPolicy((HTTPRule(method="GET", path="/bench(/.*)?"),))
    count = [0]
    def sink(flow):
        count[0] += 1
    async def main():
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0)); s.listen(1024)
        cls = NativeHttpProxy if sys.argv[2] == "native" else HttpProxy
        p = cls(s, direction=Direction.INGRESS, policy_for=lambda *a: POLICY, flow_sink=sink,
                config=ProxyConfig(upstream=("127.0.0.1", int(sys.argv[1]))))
        await p.start()
        print(s.getsockname()[1], getattr(p.engine, "pid", 0) if sys.argv[2] == "native" else 0,
              flush=True)
        await asyncio.Event().wait()
    try:  # the agent runs its proxies on uvloop when installed
        import uvloop
        factory = uvloop.new_event_loop
    except ImportError:
        factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())
""")

# The floor of any proxy here: a uvloop protocol that relays bytes with no
# HTTP logic at all (no parsing, policy or flow records), per connection.
RELAY = textwrap.dedent("""
    import asyncio, socket, sys, uvloop
    UP = ("127.0.0.1", int(sys.argv[1]))
    class Up(asyncio.Protocol):
        def __init__(self, client): self.client = client
        def data_received(self, d): self.client.write(d)
        def connection_lost(self, e): self.client.close()
    class Client(asyncio.Protocol):
        def connection_made(self, t):
            self.t, self.up, self.pending = t, None, []
            asyncio.get_running_loop().create_task(self.connect())
        async def connect(self):
            self.up, _ = await asyncio.get_running_loop().create_connection(lambda: Up(self.t), *UP)
            for d in self.pending: self.up.write(d)
        def data_received(self, d):
            if self.up is None: self.pending.append(d)
            else: self.up.write(d)
        def connection_lost(self, e):
            if self.up is not None: self.up.close()
    async def main():
        srv = await asyncio.get_running_loop().create_server(Client, "127.0.0.1", 0, backlog=1024)
        print(srv.sockets[0].getsockname()[1], flush=True)
        await asyncio.Event().wait()
    uvloop.run(main())
""")

PYLOAD = textwrap.dedent("""
    import asyncio, sys, time
    port, conns, seconds, close = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4] == "1"
    REQ = b"GET /bench HTTP/1.1\\r\\nHost: bench\\r\\n" + (b"Connection: close\\r\\n" if close else b"") + b"\\r\\n"
    lat = []
    async def one(deadline):
        r = w = None
        while time.monotonic() < deadline:
            t = time.perf_counter()
            if r is None:
                r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(REQ)
            head = await r.readuntil(b"\\r\\n\\r\\n")
            n = int(head.lower().split(b"content-length: ")[1].split(b"\\r\\n")[0])
            await r.readexactly(n)
            lat.append(time.perf_counter() - t)
            if close:
                w.close(); r = w = None
    async def main():
        deadline = time.monotonic() + seconds
        await asyncio.wait_for(asyncio.gather(*(one(deadline) for _ in range(conns))), seconds + 10)
    t0 = time.monotonic(); asyncio.run(main()); el = time.monotonic() - t0
    lat.sort()
    print(len(lat) / el, lat[len(lat) // 2] * 1e3, lat[int(len(lat) * 0.99)] * 1e3)
""")


def _spawn(code: str, *args: str) -> tuple[subprocess.Popen[str], int, int]:
    """(process, port, pid of its engine child or 0)."""
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                            text=True, start_new_session=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    if not line:
        proc.kill()
        raise RuntimeError("benchmark helper failed to start")
    return proc, int(line[0]), int(line[1]) if len(line) > 1 else 0


def _cpu_seconds(*pids: int) -> float:
    """user+system CPU of processes (0: none): a load-independent cost measure."""
    total = 0.0
    for pid in pids:
        if not pid:
            continue
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _engines() -> tuple[str, ...]:
    """The engines to measure: python, and native when axoneme-l7-http is built."""
    from axoneme.l7.http._native import engine_binary

    if engine_binary() is None:
        print("axoneme-l7-http is not built (scripts/l7-build; no Go toolchain?): python only")
        return ("python",)
    return ("python", "native")


ENGINES = _engines()


@pytest.fixture(scope="module", params=["minimal", "stdlib"])
def servers(request) -> Iterator[dict[str, Any]]:
    """Upstream, one proxy per engine and the bare relay: ports and pids."""
    procs: list[subprocess.Popen[str]] = []
    try:
        up, up_port, _ = _spawn(UPSTREAM if request.param == "minimal" else APPSERVER)
        procs.append(up)
        out: dict[str, Any] = {"kind": request.param, "direct": (up_port, ()), "up_pid": up.pid}
        for engine in ENGINES:
            px, px_port, child = _spawn(PROXY, str(up_port), engine)
            procs.append(px)
            out[engine] = (px_port, (px.pid, child))
        relay, relay_port, _ = _spawn(RELAY, str(up_port))
        procs.append(relay)
        out["relay"] = (relay_port, (relay.pid,))
        for via in ("direct", *ENGINES, "relay"):
            socket.create_connection(("127.0.0.1", out[via][0]), timeout=5).close()
        yield out
    finally:
        for p in procs:
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


def _ms(v: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", v)
    assert m, v
    return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[m.group(2)]


def load(port: int, conns: int, close: bool) -> tuple[float, float, float]:
    """(requests/s, p50 ms, p99 ms)."""
    if shutil.which("wrk"):
        cmd = ["wrk", "-t1", f"-c{conns}", f"-d{SECONDS}s", "--latency", "--timeout", "5s"]
        if close:
            cmd += ["-H", "Connection: close"]
        out = ""
        for _ in range(2):  # one retry: a shared CI box can hiccup
            out = subprocess.run([*cmd, f"http://127.0.0.1:{port}/bench"], capture_output=True,
                                 text=True, timeout=SECONDS + 30).stdout
            rps_m = re.search(r"Requests/sec:\s+([\d.]+)", out)
            # anchored: "+/- Stdev" columns such as "99.50%" also contain "50%"
            p50_m = re.search(r"^\s+50%\s+(\S+)[ \t]*$", out, re.M)
            p99_m = re.search(r"^\s+99%\s+(\S+)[ \t]*$", out, re.M)
            if rps_m and p50_m and p99_m:
                return float(rps_m.group(1)), _ms(p50_m.group(1)), _ms(p99_m.group(1))
        raise AssertionError(f"cannot parse wrk output:\n{out}")
    out = subprocess.run([sys.executable, "-c", PYLOAD, str(port), str(conns), str(SECONDS),
                          "1" if close else "0"], capture_output=True, text=True,
                         timeout=SECONDS + 30).stdout
    rps, p50, p99 = (float(x) for x in out.split())
    return rps, p50, p99


CASES = [("keepalive", False, CONNS), ("keepalive-1conn", False, 1), ("newconn", True, CONNS)]


def test_bench_http_proxy_vs_direct(benchmark, servers) -> None:
    kind = servers["kind"]
    vias = ("direct", *ENGINES, "relay")
    results: dict[str, dict[str, float]] = {}

    def run() -> None:
        for name, close, conns in CASES:
            for via in vias:
                port, pids = servers[via]
                cpu0 = _cpu_seconds(*pids), _cpu_seconds(servers["up_pid"])
                rps, p50, p99 = load(port, conns, close)
                cpu1 = _cpu_seconds(*pids), _cpu_seconds(servers["up_pid"])
                n = max(rps * SECONDS, 1.0)
                results[f"{name}/{via}"] = {
                    "rps": rps, "p50_ms": p50, "p99_ms": p99,
                    # CPU per request of the relaying processes / the upstream (us)
                    "proxy_cpu_us": (cpu1[0] - cpu0[0]) / n * 1e6,
                    "upstream_cpu_us": (cpu1[1] - cpu0[1]) / n * 1e6}
                time.sleep(0.2)

    benchmark.pedantic(run, rounds=1, iterations=1)
    with open("/proc/loadavg") as f:
        loadavg = " ".join(f.read().split()[:3])
    lines = [f"upstream: {kind}; load generator: {'wrk' if shutil.which('wrk') else 'python'}, "
             f"{SECONDS}s per case; load average {loadavg}"]
    for name, _, conns in CASES:
        d, r = results[f"{name}/direct"], results[f"{name}/relay"]
        floor = r["rps"] / d["rps"] if d["rps"] else 0.0
        info: dict[str, Any] = {"direct": d, "relay": r, "relay_ratio": round(floor, 3)}
        line = (f"{name:16} c={conns:<3} direct {d['rps']:9.0f} req/s p50 {d['p50_ms']:.3f} "
                f"p99 {d['p99_ms']:.3f} ms")
        for engine in ENGINES:
            p = results[f"{name}/{engine}"]
            ratio = p["rps"] / d["rps"] if d["rps"] else 0.0
            info[engine] = p
            info[f"{engine}_ratio"] = round(ratio, 3)
            info[f"{engine}_added_p50_ms"] = round(p["p50_ms"] - d["p50_ms"], 3)
            info[f"{engine}_added_p99_ms"] = round(p["p99_ms"] - d["p99_ms"], 3)
            line += (f" | {engine} {p['rps']:9.0f} req/s p50 {p['p50_ms']:.3f} p99 "
                     f"{p['p99_ms']:.3f} ms ratio {ratio:.2f} CPU/req {p['proxy_cpu_us']:.0f} us")
        # the README row's figure: the agent's engine (native when built) against direct
        info["throughput_ratio"] = info[f"{ENGINES[-1]}_ratio"]
        benchmark.extra_info[name] = info
        lines.append(line + f" | bare relay {floor:.2f} | upstream CPU/req {d['upstream_cpu_us']:.0f} us")
    report = "\n".join(lines)
    print("\n" + report)
    with open(os.path.join(tempfile.gettempdir(), f"axoneme-l7-http-bench-{kind}.txt"), "w") as f:
        f.write(report + "\n")
    assert all(r["rps"] > 0 for r in results.values())
