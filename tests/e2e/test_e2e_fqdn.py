"""e2e: DNS-aware egress policy (toFQDNs + rules.dns) on the kernel datapaths.

An "outside world" netns holds a dnslib DNS server and an HTTP server on a
few 198.51.100.x addresses (host routes /32 through a veth of our own, so
another test's world on 198.51.100.0/24 does not interfere); pods resolve
through it (the agent's ``dns_server``). The agent's DNS proxy learns the
answers, the engine turns them into CIDR identities, and the datapath allows
exactly the resolved names.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import secrets
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _testnet  # tests/ is on sys.path (tests/conftest.py)
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.privileged]

HOST_IP = "198.51.100.149"  # the node's side of the world link
DNS_IP = "198.51.100.153"
ZONE = {  # name -> (ip, ttl)
    "api.twitter.com": ("198.51.100.150", 300),
    "kubernetes.io": ("198.51.100.151", 300),
    "sub.example.com": ("198.51.100.152", 300),
    "example.com": ("198.51.100.154", 300),
    "short.example.org": ("198.51.100.155", 2),
}
WORLD_IPS = [DNS_IP, *(ip for ip, _ in ZONE.values())]
PYTHON = sys.executable



def _demo_world() -> Any:
    """scripts/demo_world.py: its DNS server serves this suite's zone too."""
    path = Path(__file__).resolve().parents[2] / "scripts" / "demo_world.py"
    spec = importlib.util.spec_from_file_location("axoneme_demo_world", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


DNS_SERVER = _demo_world().DNS_SERVER

RESOLVE = textwrap.dedent("""
    import sys
    from dnslib import DNSRecord, RCODE
    r = DNSRecord.parse(DNSRecord.question(sys.argv[1]).send(sys.argv[2], 53, timeout=3))
    print(RCODE[r.header.rcode], " ".join(str(a.rdata) for a in r.rr))
""")

DATAPATHS = [("ebpf", ""), ("iptables", "plain"), ("iptables", "ipset")]


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    value = predicate()
    while not value and time.monotonic() < deadline:
        time.sleep(interval)
        value = predicate()
    return value


def other_iptables_agents() -> list[int]:
    """PIDs of running ``axoneme agent run --datapath iptables`` processes."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if b"agent" in args and b"run" in args and b"iptables" in args:
            out.append(int(pid))
    return out


def wait_for_iptables_quiet(timeout: float = 30.0) -> None:
    """iptables agents on one host share chain and set names (AXON-EP-<id>,
    AXON-IPC4): another test's iptables agent running at the same time
    rewrites ours. Wait (bounded) until none runs, then go ahead anyway."""
    others = other_iptables_agents()
    if others:
        print(f"waiting for other iptables agents to finish: {others}")
        wait_for(lambda: not other_iptables_agents(), timeout=timeout, interval=1.0)


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} -> {res.returncode}: {res.stderr}")
    return res


@pytest.fixture(scope="module")
def world(guard: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The outside world: DNS at DNS_IP, HTTP :80 on every zone address.

    ``guard`` (session) is installed first: pods never reach the uplink."""
    lock = open("/tmp/axoneme-fqdn-world.lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)  # the world's addresses are fixed: one at a time
    sfx = secrets.token_hex(3)
    ns, host_if, peer_if = f"fqw-p{os.getpid()}-{sfx}", f"fqw{sfx}h", f"fqw{sfx}p"
    procs: list[subprocess.Popen[bytes]] = []
    tmp = tmp_path_factory.mktemp("fqdn-world")
    try:
        _testnet.add_netns(ns, DNS_IP)  # its own resolver: the world's DNS, never the host's
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", peer_if)
        sh("ip", "link", "set", peer_if, "netns", ns)
        sh("ip", "addr", "add", f"{HOST_IP}/32", "dev", host_if)
        sh("ip", "link", "set", host_if, "up")
        for ip in WORLD_IPS:
            sh("ip", "-n", ns, "addr", "add", f"{ip}/32", "dev", peer_if)
        sh("ip", "-n", ns, "link", "set", peer_if, "up")
        sh("ip", "-n", ns, "route", "add", f"{HOST_IP}/32", "dev", peer_if)
        sh("ip", "-n", ns, "route", "add", "default", "via", HOST_IP, "dev", peer_if)
        for ip in WORLD_IPS:
            sh("ip", "route", "add", f"{ip}/32", "dev", host_if, "src", HOST_IP)
        for ip in WORLD_IPS:  # every probe below goes to our netns, nowhere else
            route = sh("ip", "route", "get", ip).stdout
            assert f"dev {host_if}" in route, f"{ip} is not routed to the test world: {route}"
        script = tmp / "dns_server.py"
        script.write_text(DNS_SERVER.format(zone={k: v for k, v in ZONE.items()}))
        www = tmp / "www"
        www.mkdir()
        (www / "index.html").write_text("hello from the world\n")
        dns = subprocess.Popen(["ip", "netns", "exec", ns, PYTHON, str(script), DNS_IP],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        procs.append(dns)
        assert dns.stdout is not None and dns.stdout.readline().strip() == b"READY"
        procs.append(_testnet.start_http_server(ns, "0.0.0.0", 80, str(www),
                                                log=str(tmp / "http.log"), python=PYTHON))
        yield {"netns": ns, "host_if": host_if}
    finally:
        for p in procs:
            p.kill()
            p.wait()
        for ip in WORLD_IPS:
            sh("ip", "route", "del", f"{ip}/32", "dev", host_if, check=False)
        sh("ip", "link", "del", host_if, check=False)
        _testnet.del_netns(ns)
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()


@pytest.fixture(params=DATAPATHS, ids=lambda d: f"{d[0]}-{d[1]}" if d[1] else d[0])
def fqdn_agent(request: pytest.FixtureRequest, agent_factory: Any, world: dict[str, str],
               tmp_path: Path, datapath_probe: Any) -> Iterator[Any]:
    name, mode = request.param
    reason = ("iptables ipset mode needs the ipset tool"
              if mode == "ipset" and shutil.which("ipset") is None else datapath_probe(name, mode))
    if reason is not None:
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    # the iptables datapath's chains and sets are host-wide: one iptables agent
    # at a time among the tests that take this lock
    lock = open("/tmp/axoneme-iptables-datapath.lock", "w")
    if name == "iptables":
        fcntl.flock(lock, fcntl.LOCK_EX)
        wait_for_iptables_quiet()
    ap = None
    try:
        conf = tmp_path / "agent.yaml"
        conf.write_text(f"dns_server: {DNS_IP}\n")
        extra = ["--config", str(conf), "--tofqdns-min-ttl", "0"]
        if mode:
            extra += ["--iptables-mode", mode]
        ap = agent_factory(name, extra_args=extra)
        yield ap
    finally:
        if ap is not None:
            ap.cleanup()  # before the lock goes (agent_factory's cleanup is idempotent)
        lock.close()  # releases the flock


def policy(dns_rules: list[dict[str, str]]) -> str:
    doc = {
        "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "fqdn-egress", "namespace": "default"},
        "spec": {
            "endpointSelector": {"matchLabels": {"org": "empire", "class": "test-pod"}},
            "egress": [
                {"toCIDR": [f"{DNS_IP}/32"],
                 "toPorts": [{"ports": [{"port": "53", "protocol": "UDP"},
                                        {"port": "53", "protocol": "TCP"}],
                              "rules": {"dns": dns_rules}}]},
                {"toFQDNs": [{"matchName": "api.twitter.com"},
                             {"matchPattern": "*.example.com"},
                             {"matchName": "short.example.org"}],
                 "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}]},
            ],
        },
    }
    return json.dumps(doc)


def curl(agent: Any, url: str, timeout: int = 3) -> subprocess.CompletedProcess[str]:
    """curl from the client pod. A resolver timeout (exit 6: the pods' resolv.conf
    allows one 1 s attempt, and UDP may lose a datagram) is retried, like a
    client's resolver would; a refused/dropped connection (7, 28) is not."""
    for _ in range(3):
        res = agent.pod_exec("client", "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                             "-m", str(timeout), url)
        if res.returncode != 6:
            break
        print(f"resolver timeout for {url}, retrying")
    return res


def resolve(agent: Any, name: str) -> str:
    res = agent.pod_exec("client", PYTHON, "-c", RESOLVE, name, DNS_IP)
    assert res.returncode == 0, f"{res.stderr}\nagent log:\n{agent.log()}"
    return res.stdout.strip()


def apply(agent: Any, tmp_path: Path, dns_rules: list[dict[str, str]]) -> None:
    f = tmp_path / "policy.json"
    f.write_text(policy(dns_rules))
    agent.cli("policy", "apply", "-f", str(f), check=True)


def test_fqdn_egress(fqdn_agent: Any, tmp_path: Path) -> None:
    agent = fqdn_agent
    plugins = json.loads(agent.cli("plugins", "-o", "json", check=True).stdout)
    if "dns" not in plugins.get("l7", {}):
        pytest.skip("the dns L7 parser is not installed")
    apply(agent, tmp_path, [{"matchPattern": "*"}])
    agent.pod_run("client", "sleep", "infinity", labels="org=empire,class=test-pod")
    twitter_ip = ZONE["api.twitter.com"][0]

    # never resolved through the proxy: the IP is not allowed
    before = curl(agent, f"http://{twitter_ip}/")
    assert before.returncode in (7, 28), f"reached {twitter_ip} before resolving it: {before}"

    ok = curl(agent, "http://api.twitter.com/")
    assert ok.returncode == 0 and ok.stdout == "200", (ok, agent.log())
    assert curl(agent, f"http://{twitter_ip}/").returncode == 0  # learned IP
    denied = curl(agent, "http://kubernetes.io/")
    assert denied.returncode in (7, 28), f"kubernetes.io reachable: {denied}"

    # wildcard: one label under example.com, not example.com itself
    assert curl(agent, "http://sub.example.com/").stdout == "200"
    apex = curl(agent, "http://example.com/")
    assert apex.returncode in (7, 28), f"example.com matched *.example.com: {apex}"

    # TTL expiry (2 s upstream TTL, min TTL 0) revokes the IP
    short_ip = ZONE["short.example.org"][0]
    assert curl(agent, "http://short.example.org/").stdout == "200"
    revoked = wait_for(lambda: curl(agent, f"http://{short_ip}/", timeout=1).returncode != 0,
                       timeout=20, interval=0.5)
    assert revoked, "short.example.org's IP still allowed after its TTL"

    # DNS flows reach the flow store
    flows = [json.loads(line) for line in agent.cli(
        "observe", "--protocol", "dns", "-o", "json", check=True).stdout.splitlines() if line]
    queries = {f.get("l7", {}).get("dns", {}).get("query", "") for f in flows}
    assert any(q.startswith("api.twitter.com") for q in queries), flows[-5:]

    # a policy added later selects a name learned before: allowed without a new query
    k8s_ip = ZONE["kubernetes.io"][0]
    extra = tmp_path / "k8s.json"
    doc = json.loads(policy([]))
    doc["metadata"]["name"] = "fqdn-k8s"
    doc["spec"]["egress"] = [{"toFQDNs": [{"matchName": "kubernetes.io"}],
                              "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}]}]
    extra.write_text(json.dumps(doc))
    agent.cli("policy", "apply", "-f", str(extra), check=True)
    assert wait_for(lambda: curl(agent, f"http://{k8s_ip}/", timeout=1).returncode == 0,
                    timeout=10), "a learned name was not applied to a new toFQDNs policy"

    # rules.dns restricts which names may be asked: others get REFUSED
    apply(agent, tmp_path, [{"matchName": "api.twitter.com"}])
    assert wait_for(lambda: resolve(agent, "kubernetes.io").startswith("REFUSED"), timeout=10), \
        resolve(agent, "kubernetes.io")
    allowed = resolve(agent, "api.twitter.com")
    assert allowed.startswith("NOERROR") and twitter_ip in allowed
    flows = [json.loads(line) for line in agent.cli(
        "observe", "--protocol", "dns", "--verdict", "DROPPED", "-o", "json",
        check=True).stdout.splitlines() if line]
    assert any(f.get("l7", {}).get("dns", {}).get("query", "").startswith("kubernetes.io")
               for f in flows), flows[-5:]

    # learned names survive an agent restart (persisted cache)
    agent.restart()
    assert wait_for(lambda: curl(agent, f"http://{twitter_ip}/").returncode == 0, timeout=10), \
        f"api.twitter.com's IP forgotten across a restart\n{agent.log()}"


def test_fqdn_reject_rcode_nxdomain(agent_factory: Any, world: dict[str, str],
                                    tmp_path: Path, datapath_probe: Any) -> None:
    """dns_reject_rcode: NXDOMAIN answers a denied query with NXDOMAIN (one datapath
    suffices: the proxy, not the datapath, answers)."""
    reason = datapath_probe("ebpf")
    if reason is not None:
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    conf = tmp_path / "agent.yaml"
    conf.write_text(f"dns_server: {DNS_IP}\ndns_reject_rcode: NXDOMAIN\n")
    agent = agent_factory("ebpf", extra_args=["--config", str(conf)])
    plugins = json.loads(agent.cli("plugins", "-o", "json", check=True).stdout)
    if "dns" not in plugins.get("l7", {}):
        pytest.skip("the dns L7 parser is not installed")
    apply(agent, tmp_path, [{"matchName": "api.twitter.com"}])
    agent.pod_run("client", "sleep", "infinity", labels="org=empire,class=test-pod")
    assert wait_for(lambda: resolve(agent, "kubernetes.io").startswith("NXDOMAIN"), timeout=10)
    assert resolve(agent, "api.twitter.com").startswith("NOERROR")


# -- benchmark: DNS through the proxy, and answer -> allowed --------------------------------------

PROBE = textwrap.dedent("""
    import json, socket, sys, time
    from dnslib import DNSRecord
    t0 = time.perf_counter()
    r = DNSRecord.parse(DNSRecord.question(sys.argv[1]).send(sys.argv[2], 53, timeout=3))
    t1 = time.perf_counter()
    ip = str(r.rr[0].rdata) if r.rr else ""
    ok = False
    if ip:
        s = socket.socket()
        s.settimeout(1.0)
        try:
            s.connect((ip, 80))
            ok = True
        except OSError:
            pass
        finally:
            s.close()
    print(json.dumps({"ip": ip, "dns_ms": (t1 - t0) * 1e3, "connect_ok": ok}))
""")


def _probe(agent: Any, name: str) -> dict[str, Any]:
    res = agent.pod_exec("client", PYTHON, "-c", PROBE, name, DNS_IP)
    assert res.returncode == 0, f"{res.stderr}\n{agent.log()}"
    return json.loads(res.stdout)  # type: ignore[no-any-return]


def _histogram(agent: Any, metric: str) -> tuple[int, float, list[tuple[float, float]]]:
    """count, sum and (le, cumulative count) buckets of ``metric`` from the agent's /metrics."""
    text = subprocess.run(["curl", "-s", "--unix-socket", str(agent.socket), "http://agent/metrics"],
                          capture_output=True, text=True, timeout=10).stdout
    count, total, buckets = 0, 0.0, []
    for line in text.splitlines():
        if line.startswith(f"{metric}_count "):
            count = int(float(line.split()[1]))
        elif line.startswith(f"{metric}_sum "):
            total = float(line.split()[1])
        elif line.startswith(f"{metric}_bucket{{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float(le), float(line.split()[1])))
    return count, total, buckets


def _bucket_quantile(buckets: list[tuple[float, float]], count: int, q: float) -> float:
    """The upper bound of the bucket holding quantile ``q`` (Prometheus-style, no interpolation)."""
    for le, cum in buckets:
        if cum >= q * count:
            return le
    return float("inf")


@pytest.mark.bench
def test_bench_fqdn_answer_to_allowed(fqdn_agent: Any, tmp_path: Path, benchmark: Any) -> None:
    """DNS latency through the proxy for a name already allowed vs a name whose
    answer changes the datapath (the proxy holds it until its IP is allowed),
    and the agent's own answer -> allowed histogram. The first connection after
    every fresh answer must succeed: the IP was allowed before the client saw it."""
    agent = fqdn_agent
    plugins = json.loads(agent.cli("plugins", "-o", "json", check=True).stdout)
    if "dns" not in plugins.get("l7", {}):
        pytest.skip("the dns L7 parser is not installed")
    rounds = 3 if os.environ.get("AXONEME_BENCH_QUICK") == "1" else 10
    apply(agent, tmp_path, [{"matchPattern": "*"}])
    agent.pod_run("client", "sleep", "infinity", labels="org=empire,class=test-pod")
    assert _probe(agent, "api.twitter.com")["connect_ok"]  # learned: later queries change nothing
    known = [_probe(agent, "api.twitter.com") for _ in range(rounds)]
    assert all(p["connect_ok"] for p in known), known
    short_ip = ZONE["short.example.org"][0]
    fresh: list[dict[str, Any]] = []

    def revoked() -> None:  # short.example.org's 2 s TTL ran out: the next answer is news again
        assert wait_for(lambda: curl(agent, f"http://{short_ip}/", timeout=1).returncode != 0,
                        timeout=20, interval=0.5), "short.example.org never expired"

    def learn() -> None:
        fresh.append(_probe(agent, "short.example.org"))

    benchmark.pedantic(learn, setup=revoked, rounds=rounds, iterations=1)
    assert [p["connect_ok"] for p in fresh] == [True] * rounds, fresh
    count, total, buckets = _histogram(agent, "axoneme_fqdn_answer_to_allowed_seconds")
    assert count >= rounds, (count, buckets)

    def p(values: list[float], q: float) -> float:
        values = sorted(values)
        return values[min(len(values) - 1, int(q * len(values)))]

    k, f = [x["dns_ms"] for x in known], [x["dns_ms"] for x in fresh]
    info = {"dns_known_p50_ms": p(k, 0.5), "dns_known_p99_ms": p(k, 0.99),
            "dns_fresh_p50_ms": p(f, 0.5), "dns_fresh_p99_ms": p(f, 0.99),
            "answer_to_allowed_mean_ms": total / count * 1e3,
            "answer_to_allowed_p50_le_ms": _bucket_quantile(buckets, count, 0.5) * 1e3,
            "answer_to_allowed_p99_le_ms": _bucket_quantile(buckets, count, 0.99) * 1e3,
            "first_connect_allowed": f"{sum(x['connect_ok'] for x in fresh)}/{rounds}"}
    benchmark.extra_info.update(info)
    args = list(agent.extra_args)
    mode = args[args.index("--iptables-mode") + 1] if "--iptables-mode" in args else ""
    print(f"\n{agent.datapath} {mode}: " + ", ".join(
        f"{key} {val:.2f}" if isinstance(val, float) else f"{key} {val}" for key, val in info.items()))
