"""The agent in Kubernetes mode against a real control plane (no kubelet).

The agent runs with ``--k8s-kubeconfig`` on the datapaths of
AXONEME_E2E_DATAPATHS. Policies come from ``kubectl apply``; endpoints are
made with ``axoneme pod run NAME -n NS`` for pods that also exist as API Pod
objects (``spec.nodeName`` set to the agent's own, unused, node name, so the
scheduler leaves them alone and no kubelet runs them): their identities come
from the API objects, never from the ``pod run`` flags.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _testnet  # tests/ is on sys.path (tests/conftest.py)
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.privileged]

REPO = Path(__file__).resolve().parents[2]
NON_ENFORCING = {"noop"}  # DESIGN.md: computes policy, enforces nothing


# -- fixtures and helpers ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def crds(control_plane: Any) -> Any:
    """deploy/'s CRDs, established (the API server validates the policies with them)."""
    control_plane.kubectl("apply", "-f", str(REPO / "deploy" / "crds"))
    path = '{.status.conditions[?(@.type=="Established")].status}'

    def established() -> bool:
        return all(control_plane.kubectl("get", f"crd/{c}.cilium.io", "-o", f"jsonpath={path}",
                                         check=False).stdout == "True"
                   for c in ("ciliumnetworkpolicies", "ciliumclusterwidenetworkpolicies",
                             "ciliumidentities"))

    assert wait(established, 60, 0.2), "the CRDs are not Established"
    return control_plane


@pytest.fixture
def ns(crds: Any) -> Iterator[str]:
    """A namespace of the test's own; its objects deleted at once afterwards."""
    name = f"axk-{secrets.token_hex(3)}"
    crds.kubectl("create", "namespace", name)
    # pods need its "default" ServiceAccount, which the controller-manager makes
    # (more than 20 s once under a loaded CI run)
    assert wait(lambda: crds.kubectl("-n", name, "get", "serviceaccount", "default",
                                     check=False).returncode == 0 or None, 120, 0.5), \
        f"no default ServiceAccount in {name} after 120 s"
    try:
        yield name
    finally:
        crds.kubectl("-n", name, "delete", "cnp,networkpolicy", "--all", check=False)
        # no kubelet confirms a graceful delete of these pods: force it
        crds.kubectl("-n", name, "delete", "pods", "--all", "--grace-period=0", "--force",
                     check=False)
        crds.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def k8s_agent(agent_factory: Any, crds: Any) -> Iterator[Any]:
    """``make(datapath, *extra_args, kubeconfig=None)``: an agent in Kubernetes mode
    with a node name of its own, and a Node object of that name (without one the
    pod garbage collector deletes the pods bound to it after 40 s)."""
    nodes: list[str] = []

    def make(datapath: str, *extra: str, kubeconfig: Path | None = None) -> Any:
        node = f"axk-node-{secrets.token_hex(3)}"
        crds.kubectl("create", "-f", "-", input=f"apiVersion: v1\nkind: Node\n"
                                                 f"metadata: {{name: {node}}}\n")
        nodes.append(node)
        ap = agent_factory(datapath, extra_args=["--k8s-kubeconfig",
                                                 str(kubeconfig or crds.kubeconfig),
                                                 "--k8s-node-name", node, *extra])
        ap.node = node
        return ap

    try:
        yield make
    finally:
        for node in nodes:
            crds.kubectl("delete", "node", node, "--wait=false", check=False)


def apply(cp: Any, text: str) -> None:
    cp.kubectl("apply", "-f", "-", input=text)


def policies(ap: Any) -> set[tuple[str, str, str]]:
    return {(p["kind"], p["namespace"], p["name"]) for p in ap.json("policy", "list")}


def wait(pred: Any, timeout: float = 10.0, interval: float = 0.05) -> Any:
    return _testnet.poll(pred, timeout, interval)


def k8s_status(ap: Any) -> dict[str, Any]:
    return ap.json("status")["components"]["kubernetes"]


def cnp(name: str, ns: str, port: str = "80", extra: str = "") -> str:
    return (f"apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\n"
            f"metadata: {{name: {name}, namespace: {ns}}}\n"
            f"spec:\n  endpointSelector: {{matchLabels: {{app: web}}}}\n"
            f"  ingress:\n  - fromEndpoints: [{{matchLabels: {{app: client}}}}]\n"
            f"    toPorts: [{{ports: [{{port: \"{port}\", protocol: TCP}}]{extra}}}]\n")


def api_pod(cp: Any, ns: str, name: str, node: str, labels: dict[str, str],
            sa: str = "default", ports: str = "") -> None:
    """A Pod object bound to ``node`` (no kubelet there: it stays Pending)."""
    lab = ", ".join(f'{k}: "{v}"' for k, v in labels.items())
    text = (f"apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, "
            f"labels: {{{lab}}}}}\nspec:\n  nodeName: {node}\n  serviceAccountName: {sa}\n"
            f"  automountServiceAccountToken: false\n"
            f"  containers: [{{name: c, image: registry.k8s.io/pause:3.10.2{ports}}}]\n")
    # a new namespace's "default" ServiceAccount comes from the controller-manager
    res = wait(lambda: cp.kubectl("apply", "-f", "-", input=text, check=False)
               .returncode == 0 or None, 20, 0.3)
    assert res, cp.kubectl("apply", "-f", "-", input=text, check=False).stderr


def service_account(cp: Any, ns: str, name: str) -> None:
    cp.kubectl("-n", ns, "create", "serviceaccount", name)


def endpoint(ap: Any, pod: str) -> dict[str, Any]:
    return next(e for e in ap.json("endpoint", "list") if e["pod"] == pod)


def events(cp: Any, ns: str, name: str) -> list[dict[str, Any]]:
    out = cp.kubectl("-n", ns, "get", "events", "-o", "json",
                     "--field-selector", f"involvedObject.name={name}").stdout
    return json.loads(out)["items"]


def node_status(cp: Any, ns: str, name: str, node: str) -> dict[str, Any]:
    out = cp.kubectl("-n", ns, "get", "cnp", name, "-o", "json").stdout
    return ((json.loads(out).get("status") or {}).get("nodes") or {}).get(node) or {}


# -- policies ------------------------------------------------------------------------------------

def test_policies_follow_kubectl_and_a_refused_cnp_reports_its_field(
        k8s_agent: Any, datapath_name: str, crds: Any, ns: str) -> None:
    cp = crds
    ap = k8s_agent(datapath_name)
    ccnp_name = f"{ns}-ccnp"
    apply(cp, cnp("good", ns))
    apply(cp, f"apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n"
              f"metadata: {{name: np1, namespace: {ns}}}\n"
              f"spec: {{podSelector: {{matchLabels: {{app: db}}}}, policyTypes: [Ingress]}}\n")
    apply(cp, f"apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\n"
              f"metadata: {{name: {ccnp_name}}}\n"
              f"spec:\n  endpointSelector: {{matchLabels: {{axk-test: {ns}}}}}\n"
              f"  egress: [{{toEntities: [world]}}]\n")
    # the API server accepts it (a string field); the agent has no such L7 parser
    apply(cp, cnp("bad", ns, extra=", rules: {l7proto: nosuchparser, l7: [{a: b}]}"))
    try:
        want = {("CiliumNetworkPolicy", ns, "good"), ("NetworkPolicy", ns, "np1"),
                ("CiliumClusterwideNetworkPolicy", "", ccnp_name)}
        assert wait(lambda: want <= policies(ap)), (policies(ap), ap.log())
        assert ("CiliumNetworkPolicy", ns, "bad") not in policies(ap)
        assert all(p["source"] == "k8s" for p in ap.json("policy", "list"))

        # the refused one says why, with the field path, in its status and an Event
        bad = wait(lambda: node_status(cp, ns, "bad", ap.node))
        assert bad["ok"] is False and bad["enforcing"] is False, bad
        assert "spec.ingress[0].toPorts[0].rules.l7proto" in bad["error"], bad
        refused = wait(lambda: [e for e in events(cp, ns, "bad") if e["reason"] == "PolicyRefused"])
        assert refused and "l7proto" in refused[0]["message"] and refused[0]["type"] == "Warning"
        good = wait(lambda: node_status(cp, ns, "good", ap.node))
        assert good["ok"] is True and good["enforcing"] is True and good["error"] == ""
        assert wait(lambda: [e for e in events(cp, ns, "good") if e["reason"] == "PolicyEnforced"])

        def ccnp_status() -> dict[str, Any]:
            out = json.loads(cp.kubectl("get", "ccnp", ccnp_name, "-o", "json").stdout)
            return ((out.get("status") or {}).get("nodes") or {}).get(ap.node) or {}

        assert wait(lambda: ccnp_status().get("ok") is True), ccnp_status()
        k8s = k8s_status(ap)
        assert k8s["connected"] and k8s["synced"], k8s
        assert all(r["synced"] for r in k8s["resources"].values())
        assert f"CiliumNetworkPolicy/{ns}/bad" in k8s["refused_policies"]
        assert ap.cli("status", check=True).stdout.count("Kubernetes:") == 1

        # the API is the source of truth: policy apply through the socket is refused
        mine = Path(ap.workdir) / "p.yaml"
        mine.write_text(cnp("local", ns))
        res = ap.cli("policy", "apply", "-f", str(mine))
        assert res.returncode != 0 and "Kubernetes mode" in res.stderr, res

        # fixing the refused one makes it enforced; deletes drop them
        apply(cp, cnp("bad", ns, port="8080"))
        assert wait(lambda: ("CiliumNetworkPolicy", ns, "bad") in policies(ap)), ap.log()
        assert wait(lambda: node_status(cp, ns, "bad", ap.node).get("ok") is True)
        cp.kubectl("-n", ns, "delete", "cnp", "good", "bad")
        cp.kubectl("-n", ns, "delete", "networkpolicy", "np1")
        cp.kubectl("delete", "ccnp", ccnp_name)
        assert wait(lambda: not policies(ap)), policies(ap)
        assert not k8s_status(ap)["refused_policies"]
    finally:
        cp.kubectl("delete", "ccnp", ccnp_name, "--ignore-not-found", check=False)


# -- endpoints: identities from the API, relabel latency, real traffic ----------------------------

def _curl_code(ap: Any, pod: str, ns: str, ip: str) -> int:
    return ap.pod_exec(pod, "curl", "-s", "-m", "1", "-o", "/dev/null", f"http://{ip}/",
                       namespace=ns).returncode


def test_endpoint_identity_from_api_pod_follows_kubectl_label_within_1s(
        k8s_agent: Any, datapath_name: str, crds: Any, ns: str, tmp_path: Path) -> None:
    cp = crds
    ap = k8s_agent(datapath_name)
    cp.kubectl("label", "namespace", ns, "team=blue")
    service_account(cp, ns, "web-sa")
    service_account(cp, ns, "client-sa")
    api_pod(cp, ns, "web", ap.node, {"app": "web"}, sa="web-sa",
            ports=", ports: [{name: http, containerPort: 80}]")
    api_pod(cp, ns, "client", ap.node, {"app": "client"}, sa="client-sa")
    (tmp_path / "index.html").write_text("hello\n")
    # the `pod run` labels are ignored in Kubernetes mode: the API pod's win
    web_ip = ap.pod_run("web", "python3", *_testnet.http_server_argv("0.0.0.0", 80, str(tmp_path)),
                        namespace=ns, labels="app=wrong")
    ap.pod_run("client", "sleep", "infinity", namespace=ns)
    web = endpoint(ap, f"{ns}/web")
    assert "k8s:app=web" in web["labels"] and "k8s:app=wrong" not in web["labels"]
    assert "k8s:io.cilium.k8s.policy.serviceaccount=web-sa" in web["labels"]
    assert "k8s:io.cilium.k8s.namespace.labels.team=blue" in web["labels"]
    assert "k8s:io.kubernetes.pod.namespace=" + ns in web["labels"]

    # ingress to web only from app=client, on its named port (from the API pod spec)
    apply(cp, f"apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n"
              f"metadata: {{name: web-in, namespace: {ns}}}\n"
              f"spec:\n  podSelector: {{matchLabels: {{app: web}}}}\n  policyTypes: [Ingress]\n"
              f"  ingress:\n  - from: [{{podSelector: {{matchLabels: {{app: client}}}}}}]\n"
              f"    ports: [{{port: http, protocol: TCP}}]\n")
    assert wait(lambda: endpoint(ap, f"{ns}/web")["policy_enforcement"]["ingress"]), ap.log()
    enforcing = datapath_name not in NON_ENFORCING
    assert wait(lambda: _curl_code(ap, "client", ns, web_ip) == 0, 15), ap.log()

    # kubectl label: the client's identity changes within 1 s, and with it the verdict
    old = endpoint(ap, f"{ns}/client")["identity"]
    cp.kubectl("-n", ns, "label", "pod", "client", "app=other", "--overwrite")
    t0 = time.monotonic()
    assert wait(lambda: "k8s:app=other" in endpoint(ap, f"{ns}/client")["labels"], 5, 0.02)
    took = time.monotonic() - t0
    assert took < 1.0, f"pod relabel took {took:.3f}s"
    assert endpoint(ap, f"{ns}/client")["identity"] != old
    if enforcing:
        assert wait(lambda: _curl_code(ap, "client", ns, web_ip) != 0, 5), "relabelled client still allowed"
    else:
        assert _curl_code(ap, "client", ns, web_ip) == 0  # computed, not enforced

    # a namespace label change reaches the endpoints' identities as fast
    cp.kubectl("label", "namespace", ns, "team=red", "--overwrite")
    t0 = time.monotonic()
    assert wait(lambda: "k8s:io.cilium.k8s.namespace.labels.team=red"
                in endpoint(ap, f"{ns}/web")["labels"], 5, 0.02)
    took = time.monotonic() - t0
    assert took < 1.0, f"namespace relabel took {took:.3f}s"

    cp.kubectl("-n", ns, "label", "pod", "client", "app=client", "--overwrite")
    assert wait(lambda: _curl_code(ap, "client", ns, web_ip) == 0, 5), ap.log()

    # the Pod object deleted and made again (other labels) before any CNI DEL: no stale identity
    cp.kubectl("-n", ns, "delete", "pod", "client", "--grace-period=0", "--force")
    api_pod(cp, ns, "client", ap.node, {"app": "remade"}, sa="client-sa")
    t0 = time.monotonic()
    assert wait(lambda: "k8s:app=remade" in endpoint(ap, f"{ns}/client")["labels"], 5, 0.02)
    assert time.monotonic() - t0 < 1.0
    if enforcing:
        assert wait(lambda: _curl_code(ap, "client", ns, web_ip) != 0, 5), "stale identity allowed"


def test_cni_add_of_a_pod_the_api_does_not_know_fails_with_try_again(
        k8s_agent: Any, crds: Any, ns: str, tmp_path: Path) -> None:
    cp = crds
    conf = tmp_path / "agent.yaml"
    conf.write_text("k8s_pod_wait: 1\n")
    ap = k8s_agent("noop", "--config", str(conf))
    t0 = time.monotonic()
    res = ap.cli("pod", "run", "ghost", "-n", ns, "--", "sleep", "infinity")
    took = time.monotonic() - t0
    assert res.returncode != 0
    assert "code 11" in res.stderr and f"{ns}/ghost" in res.stderr, res.stderr
    assert 1.0 <= took < 10, took
    assert not ap.json("endpoint", "list")
    # created meanwhile: the next ADD (kubelet's retry) works
    api_pod(cp, ns, "ghost", ap.node, {"app": "ghost"})
    ap.cli("pod", "delete", "ghost", "-n", ns)
    ap.pod_run("ghost", "sleep", "infinity", namespace=ns)
    assert "k8s:app=ghost" in endpoint(ap, f"{ns}/ghost")["labels"]


# -- informer robustness: the API server and etcd killed during churn ----------------------------

def _expected_labels(cp: Any, ns: str, pod: str) -> set[str]:
    obj = json.loads(cp.kubectl("-n", ns, "get", "pod", pod, "-o", "json").stdout)
    return {f"k8s:{k}={v}" for k, v in (obj["metadata"].get("labels") or {}).items()}


def _api_policies(cp: Any, ns: str) -> set[tuple[str, str, str]]:
    out = json.loads(cp.kubectl("-n", ns, "get", "cnp,networkpolicy", "-o", "json").stdout)
    return {(o["kind"], ns, o["metadata"]["name"]) for o in out["items"]}


def test_informers_survive_apiserver_and_etcd_restart_during_churn(
        k8s_agent: Any, datapath_name: str, crds: Any, ns: str) -> None:
    cp = crds
    ap = k8s_agent(datapath_name)
    pods = ["p0", "p1", "p2"]
    for p in pods:
        api_pod(cp, ns, p, ap.node, {"app": "web", "gen": "0"})
        ap.pod_run(p, "sleep", "infinity", namespace=ns)

    rev0 = ap.json("status")["policy_revision"]
    changes = 0
    errors: list[str] = []

    def kubectl(*args: str, input: str | None = None) -> None:
        for _ in range(100):  # the API server is down for a while: retry until it answers
            res = cp.kubectl(*args, check=False, input=input, timeout=20)
            if res.returncode == 0:
                return
            time.sleep(0.2)
        errors.append(f"kubectl {' '.join(args)}: {res.stderr}")

    def churn() -> None:
        nonlocal changes
        for i in range(24):
            name = f"c{i % 6}"
            if i % 4 == 3:
                kubectl("-n", ns, "delete", "cnp", f"c{(i - 3) % 6}", "--ignore-not-found")
            else:
                kubectl("apply", "-f", "-", input=cnp(name, ns, port=str(1000 + i)))
            changes += 1
            kubectl("-n", ns, "label", "pod", pods[i % 3], f"gen={i + 1}", "--overwrite")
            kubectl("label", "namespace", ns, f"round={i}", "--overwrite")

    t = threading.Thread(target=churn)
    t.start()
    time.sleep(1.0)
    cp.restart("etcd", "kube-apiserver")
    time.sleep(0.5)
    cp.restart("etcd", "kube-apiserver")
    t.join(300)
    assert not t.is_alive() and not errors, errors

    def converged() -> bool:
        k8s = k8s_status(ap)
        if not (k8s["connected"] and k8s["synced"]):
            return False
        if {p for p in policies(ap) if p[1] == ns} != _api_policies(cp, ns):
            return False
        return all(_expected_labels(cp, ns, p) <= set(endpoint(ap, f"{ns}/{p}")["labels"])
                   and not {x for x in endpoint(ap, f"{ns}/{p}")["labels"]
                            if x.startswith("k8s:gen=")} - _expected_labels(cp, ns, p)
                   for p in pods)

    assert wait(converged, 60, 0.2), (k8s_status(ap), policies(ap), _api_policies(cp, ns), ap.log())
    k8s = k8s_status(ap)
    assert sum(r["errors"] for r in k8s["resources"].values()) > 0, "the restart went unnoticed"
    round_label = "k8s:io.cilium.k8s.namespace.labels.round=23"
    assert all(round_label in endpoint(ap, f"{ns}/{p}")["labels"] for p in pods)
    # nothing applied twice: one policy revision per policy change at most
    revision = ap.json("status")["policy_revision"] - rev0
    assert revision <= changes, (revision, changes)

    # a fresh agent started now agrees on every policy, and the first one's
    # datapath holds exactly the policy it resolves
    fresh = k8s_agent("noop")
    assert {p for p in policies(fresh) if p[1] == ns} == _api_policies(cp, ns)
    for p in pods:
        ep = endpoint(ap, f"{ns}/{p}")
        got = ap.json("endpoint", "get", str(ep["id"]))
        if datapath_name not in NON_ENFORCING:
            assert got["in_sync"], got


# -- RBAC: the ServiceAccount bound by deploy/rbac.yaml is enough ---------------------------------

def _sa_kubeconfig(cp: Any, path: Path) -> Path:
    cp.kubectl("apply", "-f", str(REPO / "deploy" / "rbac.yaml"))
    token = cp.kubectl("-n", "kube-system", "create", "token", "axoneme",
                       "--duration", "1h").stdout.strip()
    admin = json.loads(cp.kubectl("config", "view", "--raw", "--minify", "-o", "json").stdout)
    cluster = admin["clusters"][0]["cluster"]
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "sa",
        "clusters": [{"name": "c", "cluster": cluster}],
        "users": [{"name": "axoneme", "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "c", "user": "axoneme"}}]}))
    return path


def test_agent_with_the_deploy_clusterrole_syncs_and_writes_status_without_403(
        k8s_agent: Any, crds: Any, ns: str, tmp_path: Path) -> None:
    cp = crds
    if not (REPO / "deploy" / "rbac.yaml").exists():
        raise AssertionError("deploy/rbac.yaml is missing")
    kubeconfig = _sa_kubeconfig(cp, tmp_path / "sa.kubeconfig")
    # the token is not the admin's: this kubeconfig cannot create namespaces
    denied = subprocess.run([cp.kubectl_bin, "--kubeconfig", str(kubeconfig), "create",
                             "namespace", f"{ns}-x"], capture_output=True, text=True)
    assert denied.returncode != 0 and "forbidden" in denied.stderr.lower(), denied
    ap = k8s_agent("noop", kubeconfig=kubeconfig)
    apply(cp, cnp("good", ns))
    apply(cp, cnp("bad", ns, extra=", rules: {l7proto: nosuchparser, l7: [{a: b}]}"))
    assert wait(lambda: node_status(cp, ns, "good", ap.node).get("ok") is True), ap.log()
    assert wait(lambda: node_status(cp, ns, "bad", ap.node).get("ok") is False), ap.log()
    assert wait(lambda: [e for e in events(cp, ns, "bad") if e["reason"] == "PolicyRefused"])
    k8s = k8s_status(ap)
    assert k8s["synced"] and k8s["connected"], k8s
    assert all(r["errors"] == 0 for r in k8s["resources"].values()), k8s
    assert k8s["status_writes"]["errors"] == 0, k8s
    assert "HTTP 403" not in ap.log() and "Forbidden" not in ap.log(), ap.log()


# -- a restarted agent keeps enforcing ----------------------------------------------------------

HOLD = ("import socket, sys\n"
        "s = socket.create_connection((sys.argv[1], 80), timeout=5)\n"
        "print('connected', flush=True)\n"
        "sys.stdin.readline()\n"
        "s.settimeout(5)\n"
        "s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n')\n"
        "print(s.recv(100).split(b'\\r\\n')[0].decode(), flush=True)\n")


def _probe(netns: str, ip: str) -> int:
    return subprocess.run(["ip", "netns", "exec", netns, "curl", "-s", "-m", "1", "-o",
                           "/dev/null", f"http://{ip}/"], capture_output=True).returncode


def test_restart_keeps_policy_identities_and_established_connections(
        k8s_agent: Any, datapath_name: str, crds: Any, ns: str, tmp_path: Path) -> None:
    cp = crds
    ap = k8s_agent(datapath_name)
    for name, app in (("web", "web"), ("client", "client"), ("intruder", "intruder")):
        api_pod(cp, ns, name, ap.node, {"app": app})
    (tmp_path / "index.html").write_text("hello\n")
    web_ip = ap.pod_run("web", "python3", *_testnet.http_server_argv("0.0.0.0", 80, str(tmp_path)),
                        namespace=ns)
    ap.pod_run("client", "sleep", "infinity", namespace=ns)
    ap.pod_run("intruder", "sleep", "infinity", namespace=ns)
    apply(cp, f"apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n"
              f"metadata: {{name: web-in, namespace: {ns}}}\n"
              f"spec:\n  podSelector: {{matchLabels: {{app: web}}}}\n  policyTypes: [Ingress]\n"
              f"  ingress:\n  - from: [{{podSelector: {{matchLabels: {{app: client}}}}}}]\n"
              f"    ports: [{{port: 80, protocol: TCP}}]\n")
    netns = {p["name"]: p["netns"] for p in ap.json("pod", "list")}
    enforcing = datapath_name not in NON_ENFORCING
    assert wait(lambda: _probe(netns["client"], web_ip) == 0, 15), ap.log()
    if enforcing:
        assert wait(lambda: _probe(netns["intruder"], web_ip) != 0, 10), ap.log()
    endpoints, pols = ap.json("endpoint", "list"), policies(ap)

    holder = subprocess.Popen(["ip", "netns", "exec", netns["client"], "python3", "-c", HOLD,
                               web_ip], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline().strip() == "connected"
        probes: list[tuple[int, int]] = []
        done = threading.Event()

        def probe() -> None:
            while not done.is_set():
                probes.append((_probe(netns["intruder"], web_ip), _probe(netns["client"], web_ip)))

        t = threading.Thread(target=probe)
        t.start()
        try:
            ap.stop()  # SIGTERM, as kubelet stops the agent's pod
            time.sleep(1.0)
            ap.start()
            time.sleep(1.0)
        finally:
            done.set()
            t.join(30)
        assert ap.json("endpoint", "list") == endpoints
        assert policies(ap) == pols
        assert probes, "no probe ran"
        if enforcing:
            assert all(intruder != 0 for intruder, _ in probes), f"denied packets went through: {probes}"
        assert all(client == 0 for _, client in probes), f"allowed traffic cut: {probes}"
        holder.stdin.write("go\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip().startswith("HTTP/1.0 200"), "established connection cut"
    finally:
        holder.kill()
        holder.wait(10)


# -- the installed plugin, run as containerd runs it --------------------------------------------

def _cni(plugin: Path, command: str, netns: str, container: str, ns: str, pod: str,
         socket: Path) -> tuple[int, dict[str, Any]]:
    """The plugin with the host's python3 and a runtime's bare environment."""
    conf = {"cniVersion": "1.0.0", "name": "axoneme", "type": "axoneme-cni",
            "agentSocket": str(socket)}
    env = {"PATH": "/usr/bin:/bin", "CNI_COMMAND": command, "CNI_CONTAINERID": container,
           "CNI_NETNS": f"/var/run/netns/{netns}", "CNI_IFNAME": "eth0",
           "CNI_PATH": str(plugin.parent),
           "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={pod};"
                       f"K8S_POD_INFRA_CONTAINER_ID={container}"}
    res = subprocess.run([str(plugin)], input=json.dumps(conf), capture_output=True, text=True,
                         env=env, cwd="/", timeout=60)
    return res.returncode, json.loads(res.stdout) if res.stdout.strip() else {}


def test_installed_zipapp_plugin_adds_kubelet_pods_with_their_api_identity(
        k8s_agent: Any, crds: Any, ns: str, tmp_path: Path, netns_factory: Any) -> None:
    cp = crds
    conf_dir, bin_dir = tmp_path / "net.d", tmp_path / "bin"
    cfg = tmp_path / "agent.yaml"
    cfg.write_text("k8s_pod_wait: 1\n")
    ap = k8s_agent("noop", "--install-cni", "--cni-conf-dir", str(conf_dir),
                   "--cni-bin-dir", str(bin_dir), "--config", str(cfg))
    conflist = json.loads((conf_dir / "05-axoneme.conflist").read_text())
    assert conflist["plugins"][0]["agentSocket"] == str(ap.socket)
    plugin = bin_dir / "axoneme-cni"
    # the native fast path when this venv has it (scripts/cni-build), the zipapp beside it
    native = (Path(sys.executable).parent / "axoneme-cni-native").exists()
    zipapp = bin_dir / ("axoneme-cni-python" if native else "axoneme-cni")
    assert zipapp.read_bytes().startswith(b"#!/usr/bin/env python3\n")
    if native:
        assert plugin.read_bytes()[:4] == b"\x7fELF"

    api_pod(cp, ns, "kpod", ap.node, {"app": "kpod"},
            ports=", ports: [{name: metrics, containerPort: 9090}]")
    netns = netns_factory("axk")
    container = secrets.token_hex(32)
    code, out = _cni(plugin, "ADD", netns, container, ns, "kpod", ap.socket)
    assert code == 0, out
    assert out["ips"][0]["address"].endswith("/32")
    ep = endpoint(ap, f"{ns}/kpod")
    assert "k8s:app=kpod" in ep["labels"] and ep["status"] == "ready"
    code, out = _cni(plugin, "DEL", netns, container, ns, "kpod", ap.socket)
    assert code == 0, out
    assert not ap.json("endpoint", "list")

    # a pod the API server does not know: kubelet is told to try again (CNI error 11)
    code, out = _cni(plugin, "ADD", netns, secrets.token_hex(32), ns, "unknown", ap.socket)
    assert code != 0 and out["code"] == 11, out
    assert f"{ns}/unknown" in out.get("details", ""), out
    assert not ap.json("endpoint", "list")
