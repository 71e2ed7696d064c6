"""DNS proxy benchmark: added latency (p50/p99) of a UDP and a TCP query
through the proxy vs straight to the upstream, on loopback, in one run.

TCP opens a connection per query on both paths. The upstream (the tests'
dnslib server) and the proxy each run in their own
process; this process sends one query at a time and times each round trip.
The proxy does the full work per query: parse, rules.dns match (two rules),
forward, parse the answer, record it in an FQDN cache, an async on_answer
hook, two flows. Numbers go to extra_info and are printed; nothing is
asserted on speed. AXONEME_BENCH_QUICK=1: 200 queries per case instead of 3000.
"""

from __future__ import annotations

import os
import socket
import statistics
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dnslib import DNSRecord

pytestmark = pytest.mark.bench

QUICK = os.environ.get("AXONEME_BENCH_QUICK") == "1"
QUERIES = 200 if QUICK else 3000
UPSTREAM_SCRIPT = Path(__file__).parent.parent / "tests" / "dns_upstream.py"

PROXY = textwrap.dedent("""
    import asyncio, sys
    from axoneme.l7.dns import DNSRule
    from axoneme.l7.dns import DnsProxy, DnsProxyConfig, FQDNCache
    RULES = (DNSRule(match_name="api.twitter.com"), DNSRule(match_pattern="*.example.com"))
    flows = []
    async def on_answer(name, ips, ttl):
        pass
    def sink(flow):
        flows.append(flow)
        if len(flows) > 1000:
            del flows[:]
    async def main():
        p = DnsProxy(DnsProxyConfig(upstream=("127.0.0.1", int(sys.argv[1]))),
                     policy_for=lambda *a: RULES, cache=FQDNCache(), on_answer=on_answer,
                     flow_sink=sink)
        await p.start()
        print(p.port, flush=True)
        await asyncio.Event().wait()
    asyncio.run(main())
""")


def _spawn(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def ports() -> Iterator[tuple[int, int]]:
    procs: list[subprocess.Popen[str]] = []
    try:
        port = 20000 + os.getpid() % 20000
        for attempt in range(10):
            up = _spawn([sys.executable, str(UPSTREAM_SCRIPT), "127.0.0.1", str(port + attempt),
                         "--quiet"])
            line = up.stdout.readline()  # type: ignore[union-attr]
            if line.startswith("READY"):
                procs.append(up)
                up_port = port + attempt
                break
            up.wait(5)
        else:
            pytest.fail("could not start the dnslib upstream")
        proxy = _spawn([sys.executable, "-c", PROXY, str(up_port)])
        procs.append(proxy)
        proxy_port = int(proxy.stdout.readline())  # type: ignore[union-attr]
        yield up_port, proxy_port
    finally:
        for p in procs:
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()


def _udp_latencies(port: int, n: int) -> list[float]:
    q = DNSRecord.question("sub.example.com").pack()
    out = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        s.connect(("127.0.0.1", port))
        for _ in range(n):
            t0 = time.perf_counter()
            s.send(q)
            s.recv(4096)
            out.append(time.perf_counter() - t0)
    return out


def _tcp_latencies(port: int, n: int) -> list[float]:
    """A new connection per query (dnslib's TCP server answers one per connection)."""
    q = DNSRecord.question("sub.example.com").pack()
    msg = struct.pack("!H", len(q)) + q
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.sendall(msg)
            (length,) = struct.unpack("!H", s.recv(2, socket.MSG_WAITALL))
            s.recv(length, socket.MSG_WAITALL)
        out.append(time.perf_counter() - t0)
    return out


def _pct(values: list[float], p: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(p * len(v)))] * 1e6  # microseconds


@pytest.mark.parametrize("proto", ["udp", "tcp"])
def test_dns_proxy_added_latency(benchmark, ports, proto):
    up_port, proxy_port = ports
    measure = _udp_latencies if proto == "udp" else _tcp_latencies
    measure(up_port, 20)  # warm up both paths
    measure(proxy_port, 20)
    result: dict[str, float] = {}

    def run() -> None:
        direct = measure(up_port, QUERIES)
        proxied = measure(proxy_port, QUERIES)
        result.update({
            "direct_p50_us": _pct(direct, 0.50), "direct_p99_us": _pct(direct, 0.99),
            "proxy_p50_us": _pct(proxied, 0.50), "proxy_p99_us": _pct(proxied, 0.99),
            "direct_mean_us": statistics.fmean(direct) * 1e6,
            "proxy_mean_us": statistics.fmean(proxied) * 1e6,
        })
        result["added_p50_us"] = result["proxy_p50_us"] - result["direct_p50_us"]
        result["added_p99_us"] = result["proxy_p99_us"] - result["direct_p99_us"]

    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update({k: round(v, 1) for k, v in result.items()})
    benchmark.extra_info["queries"] = QUERIES
    print(f"\n[dns {proto}] " + " ".join(f"{k}={v:.0f}" for k, v in result.items()))
    assert result["proxy_p50_us"] > 0 and result["direct_p50_us"] > 0
