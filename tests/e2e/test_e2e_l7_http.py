"""The L7 HTTP issue's acceptance, end to end through the real agent on each kernel datapath.

Real servers run in pods (the fixtures' HTTP server, tests/_testnet.py: files, or a
keep-alive echo), curl is the client, policies go through ``axoneme policy apply``.
Pods are created once per datapath (module-scoped fixtures); each test
applies its own policies and removes them, on success and on failure.

Covered: the three seed scenarios (path, method, label-selected clients with
an L3/L4 drop for the unselected one), egress L7 to an outside host, an L4
rule on the same port making L7 rules moot, deny winning over an L7 allow,
L7 flows in ``observe``, and a policy change reaching the next request of
an already-open keep-alive connection.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import secrets
import shutil
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _capability  # tests/ is on sys.path (tests/conftest.py)
import _testnet
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.privileged]

PYTHON = "python3"
KERNEL_DATAPATHS = [("ebpf", ""), ("iptables", "plain"), ("iptables", "ipset")]

# One HTTP connection, two rounds of requests; the test changes the policy in between.
KEEPALIVE_CLIENT = textwrap.dedent('''\
    import http.client, json, os, sys, time

    host, ready, go = sys.argv[1], sys.argv[2], sys.argv[3]
    conn = http.client.HTTPConnection(host, 80, timeout=5)

    def get(path):
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")

    out = {"first_public": get("/public")}
    sock, name = conn.sock, conn.sock.getsockname()
    open(ready, "w").close()
    deadline = time.monotonic() + 30
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.05)
    out["second_public"] = get("/public")
    out["second_private"] = get("/private")
    out["same_connection"] = conn.sock is sock and conn.sock.getsockname() == name
    print(json.dumps(out))
''')


def _unavailable(name: str, mode: str) -> str | None:
    """The capability this machine lacks for the datapath (skip), or None; fails if broken."""
    return _capability.probe_datapath(name, mode)


def _sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(list(cmd), capture_output=True, text=True)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} -> {res.returncode}: {res.stderr}")
    return res


def _redirect_rules() -> str:
    """The node's TPROXY redirect chain, for failure messages.

    The chain (like the iptables datapath's AXON- chains) is node-global: an
    agent of another test starting or cleaning up on this machine at the same
    time rewrites it, and a marked packet without its TPROXY rule is routed
    to the pod unproxied. Shown so such interference is told from a bug.
    """
    return _sh("iptables", "-w", "5", "-t", "mangle", "-S", "AXON-PROXY", check=False).stdout


def _other_iptables_agents() -> list[int]:
    """PIDs of other running ``axoneme agent run --datapath iptables`` processes."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            args = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"agent" in args and b"run" in args and b"--datapath" in args and \
                args[args.index(b"--datapath") + 1:][:1] == [b"iptables"]:
            pids.append(int(entry))
    return pids


def _wait_iptables_quiet(timeout: float = 90.0) -> None:
    """The iptables datapath's chains and sets are node-global (one agent per node): wait
    for another test's iptables agent to finish rather than fight over them."""
    deadline = time.monotonic() + timeout
    while (others := _other_iptables_agents()) and time.monotonic() < deadline:
        time.sleep(1.0)
    if others:
        print(f"WARNING: iptables agents {others} still run: results may suffer interference")


# -- the outside host ----------------------------------------------------------------------

@dataclass
class Outside:
    netns: str
    host_if: str
    ip: str
    log: Path


@pytest.fixture(scope="module")
def outside(guard: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outside]:
    """A netns at a free /28 of 198.51.100.0/24 running an HTTP server, routed via the node.

    A /28 (not the whole /24) so a conformance ``world`` running at the same
    time (198.51.100.0/24) never collides: the more specific route wins here.
    The netns has its own resolv.conf and the server accepts before a test
    runs: ``-m http.server`` looked its address up before listening, and from
    here the host's resolver is unreachable (a resolver timeout, tests saw 000).
    """
    used = _sh("ip", "-4", "route", "show").stdout
    blocks = [ipaddress.ip_network(f"198.51.100.{16 * i}/28") for i in range(4, 15)]
    random.shuffle(blocks)
    block = next((b for b in blocks if str(b) not in used), None)
    if block is None:
        pytest.skip("no free /28 in 198.51.100.0/24 for the outside host")
    hosts = list(block.hosts())
    host_ip, srv_ip = str(hosts[0]), str(hosts[1])
    sfx = secrets.token_hex(3)
    ns, host_if, peer_if = f"l7out-p{os.getpid()}-{sfx}", f"l7o{sfx}h", f"l7o{sfx}p"
    www = tmp_path_factory.mktemp("outside")
    (www / "public").write_text("outside public\n")
    (www / "private").write_text("outside secret\n")
    log = www.parent / f"outside-{sfx}.log"
    proc = None
    try:
        _testnet.add_netns(ns)
        _sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", peer_if)
        _sh("ip", "link", "set", peer_if, "netns", ns)
        _sh("ip", "addr", "add", f"{host_ip}/{block.prefixlen}", "dev", host_if)
        _sh("ip", "link", "set", host_if, "up")
        _sh("ip", "-n", ns, "addr", "add", f"{srv_ip}/{block.prefixlen}", "dev", peer_if)
        _sh("ip", "-n", ns, "link", "set", peer_if, "up")
        _sh("ip", "-n", ns, "route", "add", "default", "via", host_ip)
        route = _sh("ip", "route", "get", srv_ip).stdout
        assert f"dev {host_if}" in route, f"{srv_ip} is not routed to the outside netns: {route}"
        proc = _testnet.start_http_server(ns, srv_ip, 80, str(www), log=str(log), python=PYTHON)
        yield Outside(ns, host_if, srv_ip, log)
    finally:
        if proc is not None:
            proc.kill()
            proc.wait(10)
        _sh("ip", "link", "del", host_if, check=False)
        _testnet.del_netns(ns)


# -- one agent and its pods per datapath ------------------------------------------------------

@dataclass
class Cluster:
    agent: Any
    label: str
    tmp: Path
    ips: dict[str, str] = field(default_factory=dict)
    applied: list[Path] = field(default_factory=list)

    # -- policies ---------------------------------------------------------------------------
    def apply(self, name: str, yaml: str) -> None:
        path = self.tmp / f"{name}.yaml"
        path.write_text(textwrap.dedent(yaml))
        if path not in self.applied:  # before applying: a failed apply may still store it
            self.applied.append(path)
        self.agent.cli("policy", "apply", "-f", str(path), check=True)

    def clear(self) -> None:
        errors = []
        for path in self.applied:
            res = self.agent.cli("policy", "delete", "-f", str(path))
            if res.returncode != 0:
                errors.append(res.stderr.strip())
        self.applied.clear()
        left = self.agent.json("policy", "list")
        assert left == [], f"policies left behind: {left}; delete errors: {errors}"

    # -- clients ----------------------------------------------------------------------------
    def curl(self, pod: str, url: str, *extra: str) -> tuple[int, str, str]:
        """(curl exit code, HTTP code, body) of one request from ``pod``."""
        body = self.tmp / f"body-{secrets.token_hex(3)}"
        res = self.agent.pod_exec(pod, "curl", "-s", "-m", "2", "-o", str(body),
                                  "-w", "%{http_code}", *extra, url, timeout=30)
        text = body.read_text(errors="replace") if body.exists() else ""
        body.unlink(missing_ok=True)
        return res.returncode, res.stdout.strip(), text

    def code(self, pod: str, url: str, *extra: str) -> str:
        return self.curl(pod, url, *extra)[1]

    def logs(self, pod: str) -> str:
        return str(self.agent.cli("pod", "logs", pod, check=True).stdout)


def _wait_code(cl: Cluster, pod: str, url: str, want: str, *extra: str,
               tries: int = 25) -> str:
    """Poll until ``url`` answers ``want`` (servers still binding); the last code otherwise."""
    got = ""
    for _ in range(tries):
        got = cl.code(pod, url, *extra)
        if got == want:
            break
        time.sleep(0.2)
    return got


@pytest.fixture(scope="module", params=KERNEL_DATAPATHS,
                ids=lambda d: f"{d[0]}-{d[1]}" if d[1] else d[0])
def cluster(request: pytest.FixtureRequest, guard: str) -> Iterator[Cluster]:
    name, mode = request.param
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, veth, kernel datapaths)")
    reason = _unavailable(name, mode)
    if reason:
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    cf = _testnet.conftest_module()
    node_lock = _testnet.kernel_agent_lock()
    node_lock.__enter__()
    if name == "iptables":
        _wait_iptables_quiet()
    workdir = Path(tempfile.mkdtemp(prefix="axl7-", dir="/tmp"))
    extra = ["--iptables-mode", mode] if mode else []
    ap = cf.AgentProcess(workdir, name, cf.free_pod_cidr(), extra)
    try:
        ap.start()
        plugins = json.loads(ap.cli("plugins", "-o", "json", check=True).stdout)
        if "http" not in plugins.get("l7", {}):
            pytest.skip("the http L7 parser is not installed")
        detail = ap.json("status")["datapath"]["detail"]
        assert "no enforcement" not in detail, detail
        cl = Cluster(ap, request.node.callspec.id if hasattr(request.node, "callspec") else name,
                     workdir / "t")
        cl.tmp.mkdir()
        www = workdir / "www"
        www.mkdir()
        (www / "public").write_text("public data\n")
        (www / "private").write_text("secret data\n")
        (workdir / "keepalive_client.py").write_text(KEEPALIVE_CLIENT)
        cl.ips["app1"] = ap.pod_run("app1", PYTHON, *_testnet.http_server_argv("0.0.0.0", 80, str(www)),
                                    labels="id=app1", extra=["--port", "http:80/TCP"])
        cl.ips["app2"] = ap.pod_run("app2", "sleep", "infinity", labels="id=app2")
        echo = _testnet.http_server_argv("0.0.0.0", 80, echo=True)
        cl.ips["shop"] = ap.pod_run("shop", PYTHON, "-u", *echo, labels="app=shop")
        cl.ips["flights"] = ap.pod_run("flights", PYTHON, "-u", *echo, labels="app=flights")
        cl.ips["board"] = ap.pod_run("board", "sleep", "infinity",
                                     labels="env=prod,app=flights_board")
        cl.ips["devboard"] = ap.pod_run("devboard", "sleep", "infinity",
                                        labels="env=dev,app=flights_board")
        cl.ips["egc"] = ap.pod_run("egc", "sleep", "infinity", labels="id=egc")
        for server in ("app1", "shop", "flights"):
            got = _wait_code(cl, "app2", f"http://{cl.ips[server]}/public", "200")
            assert got == "200", f"{server} is not serving ({got}):\n{ap.log()}"
        yield cl
    finally:
        try:
            ap.cleanup()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
            node_lock.__exit__(None, None, None)


@pytest.fixture
def cl(cluster: Cluster) -> Iterator[Cluster]:
    """The module's cluster with no policy before and after the test."""
    cluster.clear()
    try:
        yield cluster
    finally:
        cluster.clear()


# -- policies ---------------------------------------------------------------------------------

def _l7_ingress(name: str, target: str, source: str, rules: str, port: int = 80) -> str:
    return f"""\
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {{name: {name}, namespace: default}}
        spec:
          endpointSelector: {{matchLabels: {target}}}
          ingress:
          - fromEndpoints: [{{matchLabels: {source}}}]
            toPorts:
            - ports: [{{port: "{port}", protocol: TCP}}]
              rules:
                http: {rules}
        """


PUBLIC_ONLY = _l7_ingress("app1-public", "{id: app1}", "{id: app2}",
                          '[{method: GET, path: "/public"}]')


# -- the tests --------------------------------------------------------------------------------

def test_scenario1_public_allowed_private_denied(cl: Cluster) -> None:
    app1 = cl.ips["app1"]
    cl.apply("public-only", PUBLIC_ONLY)
    rc, code, body = cl.curl("app2", f"http://{app1}/public")
    assert (rc, code, body) == (0, "200", "public data\n"), _redirect_rules()
    marker = f"/private?probe={secrets.token_hex(4)}"
    rc, code, body = cl.curl("app2", f"http://{app1}{marker}")
    assert code == "403", (rc, code, body, _redirect_rules())
    assert body == "Access denied"
    rc, code, body = cl.curl("app2", f"http://{app1}/private")
    assert code == "403" and body == "Access denied"
    # the server saw /public and never /private
    logs = cl.logs("app1")
    assert '"GET /public HTTP/1.1" 200' in logs, logs
    assert "/private" not in logs, logs
    # l7_http_engine auto (the default): axoneme-l7-http serves when built (bootstrap builds it)
    from axoneme.l7.http._native import engine_binary

    proxy = cl.agent.json("status")["components"]["l7_proxy"]
    assert proxy["http_engine"] == ("native" if engine_binary() else "python"), proxy
    assert not engine_binary() or proxy["engines"][0]["pid"] > 0, proxy


def test_scenario2_method_get_allowed_post_denied(cl: Cluster) -> None:
    shop = cl.ips["shop"]
    cl.apply("discount", _l7_ingress("shop-discount", "{app: shop}", "{id: app2}",
                                     '[{method: GET, path: "/discount"}]'))
    rc, code, body = cl.curl("app2", f"http://{shop}/discount")
    assert (rc, code, body) == (0, "200", "GET /discount ok\n")
    tag = secrets.token_hex(4)
    rc, code, body = cl.curl("app2", f"http://{shop}/discount", "-X", "POST",
                             "-d", f"coupon={tag}")
    assert code == "403" and body == "Access denied", (rc, code, body, _redirect_rules())
    assert "POST /discount" not in cl.logs("shop")
    # without a policy POST is answered: the 403 came from the policy, not the server
    cl.clear()
    rc, code, body = cl.curl("app2", f"http://{shop}/discount", "-X", "POST", "-d", "x=1")
    assert (code, body) == ("200", "POST /discount ok\n")


def test_scenario3_label_selected_clients(cl: Cluster) -> None:
    flights = cl.ips["flights"]
    cl.apply("flights", _l7_ingress("flights-board", "{app: flights}",
                                    "{env: prod, app: flights_board}",
                                    '[{method: GET, path: "/flights"}]'))
    rc, code, body = cl.curl("board", f"http://{flights}/flights")
    assert (rc, code, body) == (0, "200", "GET /flights ok\n")
    rc, code, body = cl.curl("board", f"http://{flights}/flights", "-X", "POST", "-d", "seat=1")
    assert code == "403" and body == "Access denied", (rc, code, body, _redirect_rules())
    # env=dev is not selected by any rule: dropped at L3/L4, no HTTP answer at all
    rc, code, _ = cl.curl("devboard", f"http://{flights}/flights")
    assert rc in (7, 28), f"dev pod got curl exit {rc}, HTTP {code}"
    assert code == "000"
    # the unselected app2 is dropped too
    rc, code, _ = cl.curl("app2", f"http://{flights}/flights")
    assert rc in (7, 28) and code == "000"


def test_egress_l7_to_outside_host(cl: Cluster, outside: Outside) -> None:
    route = _sh("ip", "route", "get", outside.ip).stdout
    assert f"dev {outside.host_if}" in route, route
    url = f"http://{outside.ip}"
    # reachable before any policy (the outside server may still be binding)
    assert _wait_code(cl, "egc", f"{url}/private", "200") == "200"
    cl.apply("egress", """\
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: egc-outside, namespace: default}
        spec:
          endpointSelector: {matchLabels: {id: egc}}
          egress:
          - toCIDR: [198.51.100.0/24]
            toPorts:
            - ports: [{port: "80", protocol: TCP}]
              rules:
                http: [{method: GET, path: "/public"}]
        """)
    before = outside.log.read_text(errors="replace").count("/private")
    rc, code, body = cl.curl("egc", f"{url}/public")
    assert (rc, code, body) == (0, "200", "outside public\n")
    rc, code, body = cl.curl("egc", f"{url}/private")
    assert code == "403" and body == "Access denied", (rc, code, body)
    assert outside.log.read_text(errors="replace").count("/private") == before
    # egress is enforced on egc: a pod address is not in the allowed CIDR
    rc, code, _ = cl.curl("egc", f"http://{cl.ips['app1']}/public")
    assert rc != 0 and code == "000"


def test_l4_rule_on_same_port_makes_l7_moot(cl: Cluster) -> None:
    app1 = cl.ips["app1"]
    cl.apply("public-only", PUBLIC_ONLY)
    assert cl.code("app2", f"http://{app1}/private") == "403"
    cl.apply("l4-allow", """\
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: app1-l4, namespace: default}
        spec:
          endpointSelector: {matchLabels: {id: app1}}
          ingress:
          - fromEndpoints: [{matchLabels: {id: app2}}]
            toPorts:
            - ports: [{port: "80", protocol: TCP}]
        """)
    rc, code, body = cl.curl("app2", f"http://{app1}/private")
    assert (rc, code, body) == (0, "200", "secret data\n")
    assert cl.code("app2", f"http://{app1}/public") == "200"


def test_deny_wins_over_l7_allow(cl: Cluster) -> None:
    app1 = cl.ips["app1"]
    cl.apply("public-only", PUBLIC_ONLY)
    assert cl.code("app2", f"http://{app1}/public") == "200"
    cl.apply("deny", """\
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: app1-deny-app2, namespace: default}
        spec:
          endpointSelector: {matchLabels: {id: app1}}
          ingressDeny:
          - fromEndpoints: [{matchLabels: {id: app2}}]
            toPorts:
            - ports: [{port: "80", protocol: TCP}]
        """)
    rc, code, _ = cl.curl("app2", f"http://{app1}/public")
    assert rc in (7, 28) and code == "000", f"curl exit {rc}, HTTP {code}"


def _http_flows(cl: Cluster) -> list[dict[str, Any]]:
    out = cl.agent.cli("observe", "--protocol", "http", "-o", "json", "--last", "1000",
                       check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_observe_shows_l7_http_flows(cl: Cluster) -> None:
    app1 = cl.ips["app1"]
    cl.apply("public-only", PUBLIC_ONLY)
    tag = secrets.token_hex(4)
    assert cl.code("app2", f"http://{app1}/public?{tag}=1") == "403"  # path must match whole
    assert cl.code("app2", f"http://{app1}/public") == "200"
    assert cl.code("app2", f"http://{app1}/private?{tag}=2") == "403"

    def find() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        pair = {app1, cl.ips["app2"]}
        flows = [f for f in _http_flows(cl)
                 if {f["IP"]["source"], f["IP"]["destination"]} == pair]
        priv = [f for f in flows if f"/private?{tag}=2" in f["l7"]["http"].get("url", "")]
        pub = [f for f in flows if f["l7"]["http"].get("url", "").endswith("/public")]
        return priv, pub

    priv, pub = find()
    for _ in range(30):
        if priv and pub:
            break
        time.sleep(0.1)
        priv, pub = find()
    assert priv and pub, f"no L7 flows: {_http_flows(cl)[-6:]}"
    for f in priv + pub:
        assert f["Type"] == "L7"
        assert f["l7"]["http"]["method"] == "GET"
        ends = (f["source"].get("pod_name"), f["destination"].get("pod_name"))
        if f["l7"]["type"] == "REQUEST":
            assert ends == ("app2", "app1") and f["traffic_direction"] == "INGRESS", f
        else:
            assert set(ends) == {"app1", "app2"}, f
    assert any(f["l7"]["type"] == "REQUEST" for f in priv), priv
    assert {f["verdict"] for f in priv} == {"DROPPED"}
    assert any(f["l7"]["http"].get("code") == 403 for f in priv), priv
    assert "FORWARDED" in {f["verdict"] for f in pub}
    assert "DROPPED" not in {f["verdict"] for f in pub}
    assert any(f["l7"]["http"].get("code") == 200 for f in pub), pub
    # the verdict filter selects the denied request
    out = cl.agent.cli("observe", "--protocol", "http", "--verdict", "DROPPED", "-o", "json",
                       "--last", "1000", check=True).stdout
    assert f"/private?{tag}=2" in out and all(
        json.loads(line)["verdict"] == "DROPPED" for line in out.splitlines() if line.strip())


def test_policy_change_applies_to_open_keepalive_connection(cl: Cluster) -> None:
    shop = cl.ips["shop"]
    cl.apply("ka", _l7_ingress("shop-ka", "{app: shop}", "{id: app2}",
                               '[{method: GET, path: "/public"}]'))
    ready, go = cl.tmp / f"ready-{secrets.token_hex(3)}", cl.tmp / f"go-{secrets.token_hex(3)}"
    client = cl.agent.workdir / "keepalive_client.py"
    proc = subprocess.Popen([_testnet.conftest_module().AXONEME, "pod", "exec", "app2", "--", PYTHON, "-u", str(client),
                             shop, str(ready), str(go)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cl.agent.env())
    try:
        deadline = time.monotonic() + 20
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), f"the client did not get its first answer: {proc.poll()}"
        cl.apply("ka", _l7_ingress("shop-ka", "{app: shop}", "{id: app2}",
                                   '[{method: GET, path: "/private"}]'))
        go.touch()
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert res["first_public"] == [200, "GET /public ok\n"]
    assert res["second_public"] == [403, "Access denied"]
    assert res["second_private"] == [200, "GET /private ok\n"]
    assert res["same_connection"] is True, res
