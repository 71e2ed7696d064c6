"""`axoneme policy diff` / `policy recommend` offline: output, exit codes, bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from axoneme.agent.cli import main

CLUSTER = """
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web, pod-template-hash: abc}}
spec: {containers: [{name: c, ports: [{name: http, containerPort: 80}]}]}
status: {podIP: 10.244.0.10}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop, labels: {app: client}}
status: {podIP: 10.244.0.12}
"""
DENY = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny, namespace: shop}
spec: {podSelector: {}, policyTypes: [Ingress]}
"""
ALLOW = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress: [{from: [{podSelector: {matchLabels: {app: client}}}], ports: [{port: http}]}]
"""


def _flow(src: tuple[str, str], dst: tuple[str, str], port: int, verdict: str = "FORWARDED",
          **extra: Any) -> dict[str, Any]:
    def ep(name: str) -> dict[str, Any]:
        if not name:
            return {"identity": 2}
        return {"identity": 300, "namespace": "shop", "pod_name": name,
                "labels": [f"k8s:app={name.split('-')[0]}", "k8s:io.kubernetes.pod.namespace=shop"]}
    return {"time": "2026-12-04T15:00:00Z", "verdict": verdict, "Type": "L3_L4", "is_reply": False,
            "traffic_direction": "EGRESS", "IP": {"source": src[1], "destination": dst[1]},
            "l4": {"TCP": {"source_port": 40000, "destination_port": port}},
            "source": ep(src[0]), "destination": ep(dst[0]), **extra}


CLIENT, WEB = ("client", "10.244.0.12"), ("web-1", "10.244.0.10")


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    out = {}
    for name, text in (("cluster", CLUSTER), ("deny", DENY), ("allow", ALLOW)):
        (tmp_path / f"{name}.yaml").write_text(text)
        out[name] = str(tmp_path / f"{name}.yaml")
    flows = [_flow(CLIENT, WEB, 80), _flow(CLIENT, WEB, 80, traffic_direction="INGRESS"),
             _flow(WEB, ("", "198.51.100.7"), 443)]
    (tmp_path / "flows.json").write_text("".join(json.dumps(f) + "\n" for f in flows))
    out["flows"] = str(tmp_path / "flows.json")
    out["dir"] = str(tmp_path)
    return out


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_diff_exit_codes_table_and_json(capsys: pytest.CaptureFixture[str], files: dict[str, str]) -> None:
    base = ("policy", "diff", "--cluster", files["cluster"])
    # same set: nothing flips
    code, out, _ = run(capsys, *base, "--old", files["deny"], "-f", files["deny"])
    assert code == 0 and out.rstrip().endswith("Result: nothing flips")
    assert "Candidate: 0 added, 1 replaced, 0 removed (1 policies)" in out
    # deny on top of nothing: pairs flip to denied, with why
    code, out, _ = run(capsys, *base, "-f", files["deny"])
    assert code == 1
    # no rule names a port: one port stands for all of them
    assert "shop/client -> shop/web-1 1024/TCP (any other port): ALLOWED -> DENIED" in out
    assert "ingress denied (default deny: no rule allows)" in out
    # allow on top of deny, as JSON: only client -> web flips back (on the number of
    # web's named port), naming the rule
    code, out, _ = run(capsys, *base, "--old", files["deny"], "-f", files["allow"], "-o", "json")
    assert code == 1
    res = json.loads(out)
    assert {(f["from"], f["to"], f["port"], f["before"], f["after"]) for f in res["flips"]} == {
        ("shop/client", "shop/web-1", 80, "denied", "allowed")}
    flip = res["flips"][0]
    assert flip["after_trace"]["ingress"]["rules"] == ["NetworkPolicy shop/web spec.ingress[0]"]
    assert flip["before_trace"]["ingress"]["reason"] == "default deny: no rule allows"
    assert res["summary"] == {"flips": 1, "allowed_to_denied": 0, "denied_to_allowed": 1,
                              "observed_connections": 0, "observed_flips": 0}
    assert "flows" not in res
    # --remove: taking the deny away flips the rest back
    code, out, _ = run(capsys, *base, "--old", files["deny"], "--remove", "netpol/shop/deny", "-o", "json")
    assert code == 1 and {f["after"] for f in json.loads(out)["flips"]} == {"allowed"}
    # --promote: the staged deny, enforced
    staged = Path(files["dir"]) / "staged.yaml"
    staged.write_text(DENY.replace("namespace: shop}", "namespace: shop, annotations: "
                                   "{policy.axoneme.io/mode: audit}}"))
    code, out, _ = run(capsys, *base, "--old", str(staged), "--promote", "netpol/shop/deny")
    assert code == 1 and "1 replaced, 0 removed, 1 promoted" in out
    assert "shop/client -> shop/web-1 1024/TCP (any other port): ALLOWED -> DENIED" in out
    # --replace with the same set: nothing flips
    code, _, _ = run(capsys, *base, "--old", files["deny"], "--replace", "-f", files["deny"])
    assert code == 0


def test_diff_observed_flows(capsys: pytest.CaptureFixture[str], files: dict[str, str]) -> None:
    base = ("policy", "diff", "--cluster", files["cluster"], "--flows", files["flows"])
    code, out, _ = run(capsys, *base, "-f", files["deny"], "-o", "json")
    assert code == 1
    flows = json.loads(out)["flows"]
    assert flows["connections"] == 2
    assert [(f["from"], f["to"], f["port"], f["observed"], f["after"], f["change"], f["flows"])
            for f in flows["flips"]] == [("shop/client", "shop/web-1", 80, "FORWARDED", "denied",
                                          "would drop", 2)]
    # deny + the allow: the truth table still flips (web -> client on other ports is
    # ingress-denied to client), but no observed flow does
    code, out, _ = run(capsys, *base, "-f", files["deny"], "-f", files["allow"], "--only-observed")
    assert code == 0, out
    assert "Observed flows: 2 connections, 0 flip" in out  # the whole file
    code, out, _ = run(capsys, *base, "-f", files["deny"], "-f", files["allow"], "--only-observed",
                       "--since", "2026-12-04T00:00:00Z")
    assert code == 0 and "Observed flows since 2026-12-04T00:00:00Z: 2 connections, 0 flip" in out
    assert out.rstrip().endswith("Result: no observed flow flips")
    code, _, _ = run(capsys, *base, "-f", files["deny"], "-f", files["allow"])
    assert code == 1


@pytest.mark.parametrize(("args", "message"), [
    (("--cluster", "{cluster}"), "-f PATH"),
    (("--cluster", "{cluster}", "-f", "{deny}", "--against", "live"), "(--against)"),
    (("-f", "{deny}", "--old", "{deny}"), "(--old)"),
    (("--cluster", "{cluster}", "--remove", "netpol/shop/nope"), "is not in force"),
    (("--cluster", "{cluster}", "--remove", "bogus"), "(--remove)"),
    (("--cluster", "{cluster}", "--old", "{deny}", "--promote", "netpol/shop/deny"), "not staged"),
    (("--cluster", "{cluster}", "-f", "{deny}", "--port", "http"), "(--port)"),
    (("--cluster", "{cluster}", "-f", "{deny}", "--flows", "{dir}/none.json"), "(--flows)"),
    (("--cluster", "{cluster}", "-f", "{deny}", "--flows", "{cluster}"), "line 2: not JSON"),
    (("--cluster", "{cluster}", "-f", "{deny}", "--flows", "{flows}", "--since", "ten"), "invalid time"),
    (("--cluster", "{cluster}", "-f", "{cluster}"), "kind"),
])
def test_diff_bad_input_exit_2(capsys: pytest.CaptureFixture[str], files: dict[str, str],
                               args: tuple[str, ...], message: str) -> None:
    code, out, err = run(capsys, "policy", "diff", *(a.format(**files) for a in args))
    assert code == 2, (out, err)
    assert message in err and err.startswith("error: ")


def test_recommend_offline_validates_and_flips_nothing_observed(
        capsys: pytest.CaptureFixture[str], files: dict[str, str], tmp_path: Path) -> None:
    code, out, err = run(capsys, "policy", "recommend", "--flows", files["flows"], "--since", "0")
    assert code == 0, err
    assert out.startswith("# axoneme policy recommend: 2 forwarded connections (all flows)")
    docs = [d for d in yaml.safe_load_all(out) if d]
    assert {d["metadata"]["name"] for d in docs} == {"recommend-client", "recommend-web"}
    web = next(d for d in docs if d["metadata"]["name"] == "recommend-web")["spec"]
    assert web["podSelector"] == {"matchLabels": {"app": "web"}}
    assert web["ingress"] == [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                               "ports": [{"protocol": "TCP", "port": 80}]}]
    rec = tmp_path / "rec.yaml"
    rec.write_text(out)
    assert run(capsys, "policy", "validate", "-f", str(rec))[0] == 0
    code, out, _ = run(capsys, "policy", "diff", "--cluster", files["cluster"], "-f", str(rec),
                       "--flows", files["flows"], "--only-observed")
    assert code == 0, out
    # -o json is a kind: List that validates too; --kind cnp
    code, out, _ = run(capsys, "policy", "recommend", "--flows", files["flows"], "--since", "0",
                       "--kind", "cnp", "-o", "json", "-n", "shop")
    assert code == 0
    listing = json.loads(out)
    assert listing["kind"] == "List" and {d["kind"] for d in listing["items"]} == {"CiliumNetworkPolicy"}
    rec.write_text(out)
    assert run(capsys, "policy", "validate", "-f", str(rec))[0] == 0
    # a window with nothing in it: nothing recommended, said on stderr
    code, out, err = run(capsys, "policy", "recommend", "--flows", files["flows"], "--since", "1m")
    assert code == 0 and "nothing to recommend" in err and "kind:" not in out
    code, _, err = run(capsys, "policy", "recommend", "--flows", files["flows"], "--since", "1y")
    assert code == 2 and "(--since)" in err


def test_diff_table_shows_the_first_flips_json_all(capsys: pytest.CaptureFixture[str],
                                                   files: dict[str, str], tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text("".join(
        f"---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p{i}, namespace: shop}}\n" for i in range(12)))
    base = ("policy", "diff", "--cluster", str(big), "-f", files["deny"])
    code, out, _ = run(capsys, *base)
    assert code == 1
    assert "Truth table: 264 of 288 probes flip" in out  # 12 x 11 pairs x (TCP, UDP)
    assert "  ... and 64 more (-o json lists every one)" in out
    code, out, _ = run(capsys, *base, "-o", "json")
    assert len(json.loads(out)["flips"]) == 264


def test_identity_labels_split_back_into_a_pod() -> None:
    from axoneme.agent.cli._whatif import _IdentityLabels

    got = _IdentityLabels.split([
        "k8s:app=web", "k8s:io.kubernetes.pod.namespace=shop", "k8s:io.cilium.k8s.policy.cluster=c1",
        "k8s:io.cilium.k8s.policy.serviceaccount=sa1", "k8s:io.cilium.k8s.namespace.labels.team=shop",
        "container:ignored=1"])
    assert got == _IdentityLabels({"app": "web"}, "sa1", {"team": "shop"}, "c1")


def test_diff_pods_carry_the_default_cluster_name(capsys: pytest.CaptureFixture[str],
                                                  files: dict[str, str], tmp_path: Path) -> None:
    cnp = tmp_path / "by-cluster.yaml"
    cnp.write_text("""apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: by-cluster, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {k8s:io.cilium.k8s.policy.cluster: default}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
""")
    code, out, _ = run(capsys, "policy", "diff", "--cluster", files["cluster"], "--old", files["deny"],
                       "-f", str(cnp), "-o", "json")
    assert code == 1
    assert {(f["from"], f["to"], f["port"], f["after"]) for f in json.loads(out)["flips"]} == {
        ("shop/client", "shop/web-1", 80, "allowed")}


def test_diff_cluster_dump_policies_are_in_force(capsys: pytest.CaptureFixture[str],
                                                 files: dict[str, str], tmp_path: Path) -> None:
    """A Kubernetes dump (`kubectl get ns,pods,netpol,cnp -A -o yaml`: one List) holds
    the policies in force with the pods: they are in force (and --old adds or replaces),
    never silently skipped (the candidate would look like it adds what is there)."""
    dump = {"apiVersion": "v1", "kind": "List", "items": [
        *yaml.safe_load_all(CLUSTER), {**yaml.safe_load(DENY), "status": {}}]}
    dump["items"][-1]["metadata"].update(uid="0b0b", resourceVersion="7", managedFields=[
        {"manager": "kubectl", "operation": "Update"}])
    path = tmp_path / "dump.yaml"
    path.write_text(yaml.safe_dump(dump))
    base = ("policy", "diff", "--cluster", str(path))
    code, out, _ = run(capsys, *base, "-f", files["deny"])
    assert code == 0 and "Candidate: 0 added, 1 replaced, 0 removed (1 policies)" in out, out
    code, out, _ = run(capsys, *base, "--remove", "netpol/shop/deny", "-o", "json")
    assert code == 1 and {f["after"] for f in json.loads(out)["flips"]} == {"allowed"}
    # --old is in force too, and replaces the dump's policy of the same kind/ns/name
    code, out, _ = run(capsys, *base, "--old", files["allow"], "-f", files["deny"], "-o", "json")
    assert code == 0 and json.loads(out)["candidate"]["replaced"] == [
        {"kind": "NetworkPolicy", "namespace": "shop", "name": "deny"}]
    staged = DENY.replace("namespace: shop}", "namespace: shop, annotations: "
                          "{policy.axoneme.io/mode: audit}}")
    (tmp_path / "staged.yaml").write_text(staged)
    code, out, _ = run(capsys, *base, "--old", str(tmp_path / "staged.yaml"), "--promote",
                       "netpol/shop/deny")
    assert code == 1 and "1 promoted" in out, out
    # a bad policy in the dump: exit 2 naming the file and field
    dump["items"][-1]["spec"]["policyTypes"] = ["Sideways"]
    path.write_text(yaml.safe_dump(dump))
    code, _, err = run(capsys, *base, "-f", files["deny"])
    assert code == 2 and str(path) in err and "spec.policyTypes[0]" in err, err


class _FakeAgent:
    """The agent API answers `policy diff`/`recommend` read (a unit-test fake; the e2e
    tests run the real agent)."""

    def __init__(self, policies: list[dict[str, Any]], flows: list[dict[str, Any]]) -> None:
        self.policies, self.flows = policies, flows

    def get(self, path: str, **query: Any) -> Any:
        if path == "/v1/namespaces":
            return [{"name": "shop", "labels": {"kubernetes.io/metadata.name": "shop"}}]
        if path == "/v1/endpoints":
            def ep(name: str, ip: str, app: str, ports: list[dict[str, Any]]) -> dict[str, Any]:
                return {"pod": f"shop/{name}", "ipv4": ip, "named_ports": ports,
                        "labels": [f"k8s:app={app}", "k8s:io.kubernetes.pod.namespace=shop",
                                   "k8s:io.cilium.k8s.policy.cluster=default",
                                   "k8s:io.cilium.k8s.policy.serviceaccount=default",
                                   "k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=shop"]}
            return [ep("web-1", "10.244.0.10", "web", [{"name": "http", "port": 80, "protocol": "TCP"}]),
                    ep("client", "10.244.0.12", "client", [])]
        if path == "/v1/policies":
            assert query == {"documents": "1"}
            return {"revision": 3, "policies": self.policies}
        raise AssertionError(path)

    def stream_lines(self, path: str, query: dict[str, Any]) -> Any:
        assert path == "/v1/flows" and query["last"] >= 4095
        return iter(json.dumps(f) for f in self.flows)


def test_diff_and_recommend_live_through_the_api(capsys: pytest.CaptureFixture[str],
                                                 files: dict[str, str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from axoneme.agent.cli import _whatif

    now = "2999-01-01T00:00:00Z"  # inside any --since window
    flows = [_flow(CLIENT, WEB, 80, time=now), _flow(CLIENT, WEB, 80, time=now)]
    deny = yaml.safe_load(DENY)
    agent = _FakeAgent([{"kind": "NetworkPolicy", "namespace": "shop", "name": "deny",
                         "document": deny}], flows)
    monkeypatch.setattr(_whatif, "client", lambda args: agent)
    code, out, err = run(capsys, "policy", "diff", "-f", files["allow"], "-o", "json")
    assert code == 1, err
    res = json.loads(out)
    # the named port `http` of the live endpoint resolves to 80: client -> web flips back
    assert {(f["from"], f["to"], f["port"], f["after"]) for f in res["flips"]} == {
        ("shop/client", "shop/web-1", 80, "allowed")}
    # the observed connection was forwarded (before the deny) and stays allowed
    assert res["flows"]["connections"] == 1 and res["flows"]["flips"] == []
    code, out, _ = run(capsys, "policy", "recommend")
    assert code == 0 and "recommend-web" in out
    agent.policies[0]["document"] = None  # an agent that does not say: a runtime failure
    code, _, err = run(capsys, "policy", "diff", "-f", files["allow"])
    assert code == 1 and "does not give the document of NetworkPolicy shop/deny" in err
