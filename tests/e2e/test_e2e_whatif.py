"""What-if and recommendations against a live agent with real pods and traffic (issue 19).

The seed scenario (CLI side): a default deny staged (policy.axoneme.io/mode: audit)
drops nothing while traffic runs between three pods; `policy diff --promote` shows the
observed flows it would drop; `policy recommend` writes the allow policies; `policy
diff --promote ... -f recommended` flips no observed flow but does flip an unobserved
pair; after applying both (the deny now enforced) the observed traffic still flows while
that unobserved connection is dropped, as predicted.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _testnet  # tests/ is on sys.path (tests/conftest.py)
import pytest
import yaml

pytestmark = [pytest.mark.e2e, pytest.mark.privileged]

DENY = """apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny, namespace: shop}
spec: {podSelector: {}, policyTypes: [Ingress, Egress]}
"""
STAGED = DENY.replace("namespace: shop}", "namespace: shop, annotations: {policy.axoneme.io/mode: audit}}")
# verdicts of traffic that went through (AUDIT: the staged deny would have dropped it)
PASSED = ("FORWARDED", "AUDIT")


def _fqdn_suite() -> Any:
    """tests/e2e/test_e2e_fqdn.py: its outside world (DNS + HTTP on 198.51.100.x)."""
    path = Path(__file__).with_name("test_e2e_fqdn.py")
    spec = importlib.util.spec_from_file_location("axoneme_e2e_fqdn_world", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_FQDN = _fqdn_suite()
world = _FQDN.world  # the module-scoped fixture, reused as is


@pytest.fixture
def iptables_turn(request: pytest.FixtureRequest) -> Iterator[None]:
    """The iptables datapath's chains are host-wide: one iptables agent at a time among
    the tests that take this lock (as test_e2e_fqdn's agents do)."""
    lock = open("/tmp/axoneme-iptables-datapath.lock", "w")  # noqa: SIM115
    try:
        if request.node.callspec.params.get("datapath") == "iptables":
            fcntl.flock(lock, fcntl.LOCK_EX)
            _FQDN.wait_for_iptables_quiet()
        yield
    finally:
        lock.close()  # releases the flock


def _server(port: int, www: Path) -> list[str]:
    return ["python3", *_testnet.http_server_argv("0.0.0.0", port, str(www))]


def _curl(agent: Any, pod: str, url: str, timeout: str = "2") -> subprocess.CompletedProcess[str]:
    return agent.pod_exec(pod, "curl", "-s", "-m", timeout, "-o", "/dev/null", "-w", "%{http_code}",
                          url, namespace="shop")


def _reach(agent: Any, pod: str, url: str) -> bool:
    """Whether ``pod`` gets a 200 from ``url`` (retried: a fresh server may still bind)."""
    return bool(_testnet.poll(lambda: _curl(agent, pod, url).stdout == "200", timeout=10))


@pytest.mark.parametrize("datapath", ["ebpf", "iptables"])
def test_recommend_then_diff_flips_nothing_observed_and_enforces(
        iptables_turn: None, agent_factory: Any, datapath_probe: Any, tmp_path: Path,
        datapath: str) -> None:
    reason = datapath_probe(datapath)
    if reason is not None:
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    ap = agent_factory(datapath)
    (tmp_path / "index.html").write_text("ok\n")
    ap.cli("namespace", "create", "shop", "--labels", "team=shop", check=True)
    web = ap.pod_run("web-5f7d-abcde", *_server(80, tmp_path), namespace="shop",
                     labels="app=web,pod-template-hash=5f7d", extra=["--port", "http:80/TCP"])
    api = ap.pod_run("api-0", *_server(8080, tmp_path), namespace="shop",
                     labels="app=api,statefulset.kubernetes.io/pod-name=api-0")
    ap.pod_run("client", "sleep", "infinity", namespace="shop", labels="app=client")
    deny, staged = tmp_path / "deny.yaml", tmp_path / "staged.yaml"
    deny.write_text(DENY)
    staged.write_text(STAGED)
    ap.cli("policy", "apply", "-f", str(staged), check=True)

    # the observed traffic, which the staged deny lets through: client -> web:80, web -> api:8080
    assert _reach(ap, "client", f"http://{web}/"), ap.log()
    assert _reach(ap, "web-5f7d-abcde", f"http://{api}:8080/"), ap.log()

    def observed() -> list[dict[str, Any]]:
        lines = ap.cli("observe", "--last", "1000", "-o", "json", check=True).stdout.splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def seen(src: str, dst: str, port: int) -> bool:
        return any(f.get("verdict") in PASSED and f.get("source", {}).get("pod_name") == src
                   and f.get("destination", {}).get("pod_name") == dst
                   and f.get("l4", {}).get("TCP", {}).get("destination_port") == port
                   for f in observed())
    assert _testnet.poll(lambda: seen("client", "web-5f7d-abcde", 80) and
                         seen("web-5f7d-abcde", "api-0", 8080), timeout=10), observed()

    # 1. what promoting the staged deny would break: exactly the observed connections
    promote = ("--promote", "netpol/shop/default-deny")
    res = ap.cli("policy", "diff", *promote, "--since", "10m", "-o", "json")
    assert res.returncode == 1, res.stderr
    out = json.loads(res.stdout)
    would_drop = {(f["from"], f["to"], f["port"]) for f in out["flows"]["flips"]}
    assert would_drop == {("shop/client", "shop/web-5f7d-abcde", 80),
                          ("shop/web-5f7d-abcde", "shop/api-0", 8080)}, out["flows"]
    assert all(f["change"] == "would drop" and f["observed"] in PASSED
               for f in out["flows"]["flips"])
    assert out["candidate"]["promoted"] == [{"kind": "NetworkPolicy", "namespace": "shop",
                                             "name": "default-deny"}]
    flip = next(f for f in out["flows"]["flips"] if f["port"] == 80)
    assert flip["after_trace"]["ingress"]["reason"] == "default deny: no rule allows"

    # 2. the recommended allow policies, valid
    res = ap.cli("policy", "recommend", "-n", "shop", "--since", "10m", check=True)
    rec = tmp_path / "recommended.yaml"
    rec.write_text(res.stdout)
    docs = {d["metadata"]["name"]: d for d in yaml.safe_load_all(res.stdout) if d}
    assert set(docs) == {"recommend-api", "recommend-client", "recommend-web"}, res.stdout
    assert docs["recommend-web"]["spec"]["podSelector"] == {"matchLabels": {"app": "web"}}
    assert docs["recommend-api"]["spec"]["podSelector"] == {"matchLabels": {"app": "api"}}
    ap.cli("policy", "validate", "-f", str(rec), check=True)

    # 3. deny + recommended: no observed flow flips; the unobserved client -> api does
    res = ap.cli("policy", "diff", *promote, "-f", str(rec), "--since", "10m",
                 "--only-observed", "-o", "json")
    assert res.returncode == 0, res.stdout + res.stderr
    out = json.loads(res.stdout)
    assert out["flows"]["flips"] == [] and out["flows"]["connections"] >= 2
    predicted = {(f["from"], f["to"], f["port"]): f["after"] for f in out["flips"]}
    assert predicted[("shop/client", "shop/api-0", 8080)] == "denied", predicted
    assert ("shop/client", "shop/web-5f7d-abcde", 80) not in predicted
    # the human form says the same
    res = ap.cli("policy", "diff", "-f", str(deny), "-f", str(rec), "--since", "10m", "--only-observed")
    assert "1 replaced" in res.stdout  # the enforced deny replaces the staged one
    assert res.returncode == 0 and res.stdout.rstrip().endswith("Result: no observed flow flips")

    # 4. apply both (the deny enforced now): the observed traffic still flows, the
    # unexpected connection drops
    ap.cli("policy", "apply", "-f", str(deny), "-f", str(rec), check=True)
    assert _reach(ap, "client", f"http://{web}/"), ap.log()
    assert _reach(ap, "web-5f7d-abcde", f"http://{api}:8080/"), ap.log()
    start = time.time()
    assert _curl(ap, "client", f"http://{api}:8080/", "1").stdout != "200"
    dropped = _testnet.poll(lambda: [
        f for f in observed() if f.get("verdict") == "DROPPED"
        and f.get("source", {}).get("pod_name") == "client"
        and f.get("destination", {}).get("pod_name") == "api-0"], timeout=5)
    assert dropped, observed()
    # and now, against the live set, the same candidate flips nothing at all observed
    res = ap.cli("policy", "diff", "-f", str(rec), "--since", f"{int(time.time() - start) + 5}s",
                 "-o", "json")
    assert res.returncode == 0, res.stdout + res.stderr
    assert json.loads(res.stdout)["candidate"]["replaced"]


BROAD = """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: broad, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toCIDR: [DNS_IP/32]
    toPorts: [{ports: [{port: "53", protocol: UDP}], rules: {dns: [{matchPattern: "*"}]}}]
  - toEntities: [world]
""".replace("DNS_IP", _FQDN.DNS_IP)


def test_recommend_cnp_to_fqdns_keeps_resolved_names_working(
        agent_factory: Any, world: dict[str, str], tmp_path: Path, datapath_probe: Any) -> None:
    """A broad egress policy (DNS through the proxy, any world address); the client
    reaches api.twitter.com; `recommend --kind cnp` says toFQDNs matchName
    api.twitter.com (+ the DNS rule); `diff --remove` of the broad policy plus the
    recommendation flips no observed flow; applied, the name still works and
    another name does not."""
    reason = datapath_probe("ebpf")
    if reason is not None:
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    conf = tmp_path / "agent.yaml"
    conf.write_text(f"dns_server: {_FQDN.DNS_IP}\n")
    ap = agent_factory("ebpf", extra_args=["--config", str(conf), "--tofqdns-min-ttl", "0"])
    plugins = json.loads(ap.cli("plugins", "-o", "json", check=True).stdout)
    if "dns" not in plugins.get("l7", {}):
        pytest.skip("the dns L7 parser is not installed")
    broad = tmp_path / "broad.yaml"
    broad.write_text(BROAD)
    ap.cli("policy", "apply", "-f", str(broad), check=True)
    ap.pod_run("client", "sleep", "infinity", labels="app=client,pod-template-hash=77")

    def curl(url: str) -> subprocess.CompletedProcess[str]:
        return _FQDN.curl(ap, url)
    assert curl("http://api.twitter.com/").stdout == "200", ap.log()
    assert _testnet.poll(lambda: "api.twitter.com" in ap.cli(
        "observe", "--last", "200", "-o", "json").stdout, timeout=5)

    res = ap.cli("policy", "recommend", "--kind", "cnp", "-n", "default", "--since", "10m", check=True)
    rec = tmp_path / "rec.yaml"
    rec.write_text(res.stdout)
    ap.cli("policy", "validate", "-f", str(rec), check=True)
    docs = [d for d in yaml.safe_load_all(res.stdout) if d]
    assert [d["metadata"]["name"] for d in docs] == ["recommend-client"], res.stdout
    egress = docs[0]["spec"]["egress"]
    assert {"toFQDNs": [{"matchName": "api.twitter.com"}],
            "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}]} in egress, egress
    dns = next(r for r in egress if r.get("toCIDR") == [f"{_FQDN.DNS_IP}/32"])
    assert dns["toPorts"][0]["rules"] == {"dns": [{"matchPattern": "*"}]}
    twitter_ip = _FQDN.ZONE["api.twitter.com"][0]
    assert not any(f"{twitter_ip}/32" in json.dumps(r) for r in egress)  # the name, not the IP

    res = ap.cli("policy", "diff", "--remove", "cnp/default/broad", "-f", str(rec),
                 "--since", "10m", "--only-observed", "-o", "json")
    assert res.returncode == 0, res.stdout + res.stderr
    out = json.loads(res.stdout)
    assert out["flows"]["flips"] == [] and out["flows"]["connections"] >= 2

    ap.cli("policy", "apply", "-f", str(rec), check=True)
    ap.cli("policy", "delete", "cnp/broad", "-n", "default", check=True)
    assert curl("http://api.twitter.com/").stdout == "200", ap.log()
    other = curl("http://kubernetes.io/")
    assert other.returncode in (7, 28), f"kubernetes.io reachable: {other}"
