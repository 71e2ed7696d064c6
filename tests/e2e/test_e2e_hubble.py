"""e2e: the real `hubble` CLI observes axoneme's flows, and flows name their policies.

The `hubble` CLI is built from its Go module (scripts/hubble-build, cached under
~/.cache/axoneme) and talks to the agent's Observer gRPC API on the unix socket
beside the API socket. One agent per kernel datapath, with pods and policies:
an L7 HTTP rule on the web pod's ingress, a DNS rule on the client's egress,
and probes that each datapath drops by default deny in either direction. The
test checks what `hubble observe` prints (JSON and compact), Hubble's filters
through the API, `hubble status` / `hubble list nodes`, and that `axoneme
observe` names the policy that put the endpoint into default deny.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _capability  # tests/ is on sys.path (tests/conftest.py)
import _testnet
import pytest
from axoneme.testing.tlscerts import make_certs

pytestmark = [pytest.mark.e2e, pytest.mark.privileged]

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable  # has dnslib (the DNS server and client below)
KERNEL_DATAPATHS = [("ebpf", ""), ("iptables", "plain")]

DNS_SERVER = textwrap.dedent("""
    import sys, threading
    from dnslib import RR, A, QTYPE, RCODE
    from dnslib.server import BaseResolver, DNSServer
    class Zone(BaseResolver):
        def resolve(self, request, handler):
            reply = request.reply()
            if str(request.q.qname).rstrip(".") == "api.example.com" and request.q.qtype == QTYPE.A:
                reply.add_answer(RR(request.q.qname, QTYPE.A, ttl=60, rdata=A("198.51.100.7")))
            else:
                reply.header.rcode = RCODE.NXDOMAIN
            return reply
    DNSServer(Zone(), address="0.0.0.0", port=53).start_thread()
    threading.Event().wait()
""")
RESOLVE = textwrap.dedent("""
    import sys
    from dnslib import DNSRecord, RCODE
    r = DNSRecord.parse(DNSRecord.question(sys.argv[1]).send(sys.argv[2], 53, timeout=2))
    print(RCODE[r.header.rcode], " ".join(str(a.rdata) for a in r.rr))
""")
POLICIES = textwrap.dedent("""
    apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {name: web-ingress, namespace: default}
    spec:
      endpointSelector: {matchLabels: {app: web}}
      ingress:
      - fromEndpoints: [{matchLabels: {app: client}}]
        toPorts:
        - ports: [{port: "80", protocol: TCP}]
          rules: {http: [{method: GET, path: "/public"}]}
    ---
    apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {name: client-egress, namespace: default}
    spec:
      endpointSelector: {matchLabels: {app: client}}
      egress:
      - toEndpoints: [{matchLabels: {app: web}}]
        toPorts: [{ports: [{port: "80", protocol: TCP}]}]
      - toEndpoints: [{matchLabels: {app: dns}}]
        toPorts:
        - ports: [{port: "53", protocol: UDP}]
          rules: {dns: [{matchPattern: "*"}]}
""")


@pytest.fixture(scope="session")
def hubble_cli() -> str:
    """The real hubble CLI, built (or found in the cache) by scripts/hubble-build."""
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "hubble-build")],
                         capture_output=True, text=True, timeout=3600)
    assert res.returncode == 0, f"scripts/hubble-build failed:\n{res.stderr[-3000:]}"
    path = res.stdout.strip().splitlines()[-1]
    assert os.access(path, os.X_OK), path
    return path


class Hubble:
    def __init__(self, cli: str, server: str, home: Path, *tls: str) -> None:
        self.cli, self.server, self.home, self.tls = cli, server, home, tls

    def run(self, *args: str) -> str:
        env = dict(os.environ, HOME=str(self.home))  # no user config
        res = subprocess.run([self.cli, *args, "--server", self.server, *self.tls],
                             capture_output=True, text=True, timeout=60, env=env)
        assert res.returncode == 0, f"hubble {' '.join(args)}: {res.stderr}"
        return res.stdout

    def flows(self, *args: str) -> list[dict[str, Any]]:
        out = self.run("observe", "-o", "json", "--last", "4000", *args)
        return [json.loads(line)["flow"] for line in out.splitlines() if line.strip()]


@pytest.fixture(scope="module", params=KERNEL_DATAPATHS,
                ids=lambda d: f"{d[0]}-{d[1]}" if d[1] else d[0])
def node(request: pytest.FixtureRequest, guard: str) -> Iterator[Any]:
    """An agent on the datapath with pods web, client, other, dns and the two policies."""
    name, mode = request.param
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, veth, kernel datapaths)")
    reason = _capability.probe_datapath(name, mode)
    if reason:
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    cf = _testnet.conftest_module()
    with _testnet.kernel_agent_lock():
        workdir = Path(tempfile.mkdtemp(prefix="axhub-", dir="/tmp"))
        certs = make_certs(workdir / "certs")
        with socket.socket() as s:  # a free port for the TLS listener
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        tls = ["--hubble-listen-address", f"127.0.0.1:{port}",
               "--hubble-tls-cert-file", str(certs.server_cert),
               "--hubble-tls-key-file", str(certs.server_key),
               "--hubble-tls-client-ca-files", str(certs.ca)]
        ap = cf.AgentProcess(workdir, name, cf.free_pod_cidr(),
                             (["--iptables-mode", mode] if mode else []) + tls)
        try:
            ap.start()
            plugins = json.loads(ap.cli("plugins", "-o", "json", check=True).stdout)
            missing = {"http", "dns"} - set(plugins.get("l7", {}))
            assert not missing, f"L7 parsers not installed: {missing}"
            www = workdir / "www"
            www.mkdir()
            (www / "public").write_text("public data\n")
            (www / "private").write_text("secret data\n")
            (workdir / "dns_server.py").write_text(DNS_SERVER)
            (workdir / "resolve.py").write_text(RESOLVE)
            ips = {
                "web": ap.pod_run("web", "python3", *_testnet.http_server_argv("0.0.0.0", 80, str(www)),
                                  labels="app=web"),
                "dns": ap.pod_run("dns", PYTHON, str(workdir / "dns_server.py"), labels="app=dns"),
                "client": ap.pod_run("client", "sleep", "infinity", labels="app=client"),
                "other": ap.pod_run("other", "sleep", "infinity", labels="app=other"),
            }
            served = _testnet.poll(lambda: _curl(ap, "client", f"http://{ips['web']}/public") == "200",
                                   timeout=15)
            assert served, f"web is not serving:\n{ap.log()}"
            policies = workdir / "policies.yaml"
            policies.write_text(POLICIES)
            ap.cli("policy", "apply", "-f", str(policies), check=True)
            yield ap, ips, workdir, (port, certs)
        finally:
            try:
                ap.cleanup()
            finally:
                shutil.rmtree(workdir, ignore_errors=True)


def _curl(ap: Any, pod: str, url: str) -> str:
    res = ap.pod_exec(pod, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", "2", url)
    return res.stdout.strip() if res.returncode == 0 else f"exit {res.returncode}"


def _named(flows: list[dict[str, Any]], field: str, policy: str) -> list[dict[str, Any]]:
    return [f for f in flows if any(p.get("name") == policy for p in f.get(field, ()))]


def test_hubble_observes_axoneme(node: Any, hubble_cli: str) -> None:
    ap, ips, workdir, (tls_port, certs) = node
    web = ips["web"]
    # the probes: L7 allowed and refused, a DNS query through the proxy, and one
    # default-deny drop in each direction
    assert _curl(ap, "client", f"http://{web}/public") == "200"
    assert _curl(ap, "client", f"http://{web}/private") == "403"
    dns = _testnet.poll(lambda: ap.pod_exec("client", PYTHON, str(workdir / "resolve.py"),
                                            "api.example.com", ips["dns"]).stdout.strip(),
                        timeout=10)
    assert dns == "NOERROR 198.51.100.7", f"{dns!r}\n{ap.log()}"
    assert _curl(ap, "client", f"http://{web}:8080/") == "exit 28"  # client's egress: default deny
    assert _curl(ap, "other", f"http://{web}/public") == "exit 28"  # web's ingress: default deny

    hubble = Hubble(hubble_cli, f"unix://{workdir / 'hubble.sock'}", workdir)

    def settled() -> list[dict[str, Any]] | None:
        flows = hubble.flows()
        eg = [f for f in _named(flows, "egress_denied_by", "client-egress")
              if f["l4"].get("TCP", {}).get("destination_port") == 8080]
        ing = [f for f in _named(flows, "ingress_denied_by", "web-ingress")
               if f.get("drop_reason_desc") == "POLICY_DENIED"]
        dns_flows = [f for f in flows if f.get("l7", {}).get("dns")]
        return flows if eg and ing and dns_flows else None

    flows = _testnet.poll(settled, timeout=15, interval=0.5)
    assert flows, f"hubble never showed both default-deny drops and DNS:\n{hubble.flows()}"
    assert all(f.get("uuid") and f.get("node_name") for f in flows)

    # L7 HTTP: the allowed request and the refused one, with Hubble's l7.http
    http = [f for f in flows if f.get("l7", {}).get("http")]
    public = [f for f in http if f["l7"]["http"].get("url", "").endswith("/public")
              and f["verdict"] == "FORWARDED"]
    private = [f for f in http if f["l7"]["http"].get("url", "").endswith("/private")
               and f["verdict"] == "DROPPED"]
    assert public and private, http
    assert public[0]["l7"]["http"]["method"] == "GET" and public[0]["Type"] == "L7"
    assert public[0]["event_type"]["type"] == 129
    assert private[0]["ingress_denied_by"][0]["name"] == "web-ingress"  # its L7 rules refused
    # DNS through the proxy: query and answer
    dns_flows = [f for f in flows if f.get("l7", {}).get("dns")]
    assert any(f["l7"]["dns"]["query"] == "api.example.com." for f in dns_flows), dns_flows
    assert any("198.51.100.7" in f["l7"]["dns"].get("ips", []) for f in dns_flows), dns_flows

    # default deny, named: the policy that selected the endpoint in that direction
    eg = [f for f in _named(flows, "egress_denied_by", "client-egress")
          if f["l4"].get("TCP", {}).get("destination_port") == 8080][0]
    assert eg["verdict"] == "DROPPED" and eg["drop_reason_desc"] == "POLICY_DENIED"
    # where it was seen: leaving the client's pod, on its host-side veth
    assert eg["trace_observation_point"] == "FROM_ENDPOINT", eg
    assert eg["interface"]["name"].startswith("lxc") and eg["interface"]["index"] > 0, eg
    assert eg["ethernet"]["source"] and eg["ethernet"]["destination"], eg
    assert eg["traffic_direction"] == "EGRESS" and eg["source"]["pod_name"] == "client"
    pol = eg["egress_denied_by"][0]
    assert pol["kind"] == "CiliumNetworkPolicy" and pol["namespace"] == "default"
    assert "axoneme:default-deny=true" in pol["labels"] and "axoneme:rule=spec.egress" in pol["labels"]
    ing_all = [f for f in _named(flows, "ingress_denied_by", "web-ingress")
               if f.get("drop_reason_desc") == "POLICY_DENIED"]
    ing = [f for f in ing_all if f["event_type"] == {"type": 1, "sub_type": 133}][0]
    assert ing["source"]["pod_name"] == "other" and ing["traffic_direction"] == "INGRESS"
    # and its policy-verdict twin (Cilium reports a policy drop as both events)
    assert [f for f in ing_all if f["event_type"] == {"type": 5}
            and f["l4"] == ing["l4"] and f["uuid"] != ing["uuid"]]
    allowed = _named(flows, "ingress_allowed_by", "web-ingress")
    assert allowed, "no flow names web-ingress as the policy that allowed it"

    # Hubble's filters, evaluated by the agent
    drops = hubble.flows("--verdict", "DROPPED")
    assert drops and all(f["verdict"] == "DROPPED" for f in drops)
    only_dns = hubble.flows("--protocol", "dns")
    assert only_dns and all("dns" in f["l7"] for f in only_dns)
    from_other = hubble.flows("--from-pod", "default/other", "--type", "drop")
    assert from_other and all(f["source"]["pod_name"] == "other" for f in from_other)
    assert not [f for f in hubble.flows("--not", "--verdict", "DROPPED") if f["verdict"] == "DROPPED"]

    # compact, as a person reads it
    compact = hubble.run("observe", "--last", "4000", "--print-policy-names")
    assert "http-request FORWARDED" in compact and "http-request DROPPED" in compact, compact
    assert "dns-request proxy FORWARDED" in compact, compact
    assert "Policy denied DROPPED" in compact, compact
    # as Cilium, a policy drop is also a policy-verdict event, whose compact line
    # names the policy that put the endpoint into default deny
    assert "policy-verdict:none EGRESS DENIED BY client-egress (CiliumNetworkPolicy)" in compact
    assert "policy-verdict:none INGRESS DENIED BY web-ingress (CiliumNetworkPolicy)" in compact
    verdicts = hubble.flows("--type", "policy-verdict", "--verdict", "DROPPED")
    assert verdicts and all(f["event_type"]["type"] == 5 for f in verdicts)
    status = hubble.run("status")
    assert "Current/Max Flows" in status and "Healthcheck (via" in status, status
    nodes = hubble.run("list", "nodes").splitlines()
    assert nodes[1].split()[:2] == [socket.gethostname(), "Connected"], nodes

    # the same over TCP with mutual TLS (--hubble-listen-address)
    over_tls = Hubble(hubble_cli, f"127.0.0.1:{tls_port}", workdir, "--tls",
                      "--tls-ca-cert-files", str(certs.ca), "--tls-server-name", certs.server_name,
                      "--tls-client-cert-file", str(certs.client_cert),
                      "--tls-client-key-file", str(certs.client_key))
    tls_drops = over_tls.flows("--verdict", "DROPPED")
    assert {f["uuid"] for f in drops} <= {f["uuid"] for f in tls_drops}
    assert "Current/Max Flows" in over_tls.run("status")

    # our own compact output names the policies of a default-deny drop
    ours = ap.cli("observe", "--last", "4000", "--verdict", "DROPPED", check=True).stdout
    assert "DROPPED BY client-egress (CiliumNetworkPolicy)" in ours, ours
    assert "DROPPED BY web-ingress (CiliumNetworkPolicy)" in ours, ours
    # and so does its JSON (the same flow.Flow fields as over Hubble's API)
    ours_json = [json.loads(line) for line in ap.cli(
        "observe", "--last", "4000", "--verdict", "DROPPED", "-o", "json",
        check=True).stdout.splitlines() if line.strip()]
    ours_eg = [f for f in _named(ours_json, "egress_denied_by", "client-egress")
               if f.get("drop_reason_desc") == "POLICY_DENIED"]
    assert ours_eg and "axoneme:default-deny=true" in ours_eg[0]["egress_denied_by"][0]["labels"]
    assert _named(ours_json, "ingress_denied_by", "web-ingress"), ours_json
    # Hubble's filters and outputs in axoneme observe, through the agent
    table = ap.cli("observe", "-o", "table", "--since", "10m", "--verdict", "DROPPED",
                   "--to-ip", f"{web}/32", "--not", "--from-ip", ips["client"],
                   check=True).stdout.splitlines()
    assert table[0].split() == ["TIMESTAMP", "SOURCE", "DESTINATION", "TYPE", "VERDICT", "SUMMARY"]
    assert len(table) > 1 and all("default/other" in row for row in table[1:]), table
    assert any("DROPPED BY web-ingress (CiliumNetworkPolicy)" in row for row in table[1:]), table
    blocks = ap.cli("observe", "-o", "dict", "--last", "5", "-n", "default", "--http-status", "403",
                    check=True).stdout
    assert "    VERDICT: DROPPED BY web-ingress" in blocks and "       TYPE: http-" in blocks, blocks
