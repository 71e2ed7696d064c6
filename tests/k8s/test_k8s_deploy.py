"""deploy/: the manifests a user applies (`kubectl apply -k deploy/`), against a real API server.

The CRDs' schemas accept every seed policy verbatim and reject a mistyped field
naming its path (kubectl's default strict field validation, never
--validate=false); the ClusterRole grants exactly what the agent uses (checked by
impersonating its service account and with a real token of it); the DaemonSet is
created with the fields that matter (no kubelet here: it stays unscheduled).
The first tests read the files only and need no cluster.
"""

from __future__ import annotations

import json
import os
import re
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
SA = "system:serviceaccount:kube-system:axoneme"
CILIUM_KINDS = ("CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy")
POLICY_KINDS = (*CILIUM_KINDS, "NetworkPolicy")

# The shared contract (issue 15): the agent's API access, nothing more.
CONTRACT_RULES = {
    ("", "namespaces", "get"), ("", "namespaces", "list"), ("", "namespaces", "watch"),
    ("", "pods", "get"), ("", "pods", "list"), ("", "pods", "watch"),
    ("", "nodes", "get"), ("", "nodes", "list"), ("", "nodes", "watch"),
    ("networking.k8s.io", "networkpolicies", "get"), ("networking.k8s.io", "networkpolicies", "list"),
    ("networking.k8s.io", "networkpolicies", "watch"),
    ("", "services", "get"), ("", "services", "list"), ("", "services", "watch"),
    ("discovery.k8s.io", "endpointslices", "get"), ("discovery.k8s.io", "endpointslices", "list"),
    ("discovery.k8s.io", "endpointslices", "watch"),
    ("cilium.io", "ciliumnetworkpolicies", "get"), ("cilium.io", "ciliumnetworkpolicies", "list"),
    ("cilium.io", "ciliumnetworkpolicies", "watch"),
    ("cilium.io", "ciliumclusterwidenetworkpolicies", "get"),
    ("cilium.io", "ciliumclusterwidenetworkpolicies", "list"),
    ("cilium.io", "ciliumclusterwidenetworkpolicies", "watch"),
    # cluster-wide identities (CRD mode): created, watched, marked and collected by the agents
    ("cilium.io", "ciliumidentities", "get"), ("cilium.io", "ciliumidentities", "list"),
    ("cilium.io", "ciliumidentities", "watch"), ("cilium.io", "ciliumidentities", "create"),
    ("cilium.io", "ciliumidentities", "patch"), ("cilium.io", "ciliumidentities", "delete"),
    ("cilium.io", "ciliumnetworkpolicies/status", "patch"),
    ("cilium.io", "ciliumnetworkpolicies/status", "update"),
    ("cilium.io", "ciliumclusterwidenetworkpolicies/status", "patch"),
    ("cilium.io", "ciliumclusterwidenetworkpolicies/status", "update"),
    ("", "events", "create"), ("", "events", "patch"),
    ("events.k8s.io", "events", "create"), ("events.k8s.io", "events", "patch"),
}

# the Role in kube-system: the identity collector's leader election (agent/_identitylease.py);
# (group, resource, verb, resourceName: None for any)
LEASE = "axoneme-identity-gc"
ROLE_RULES = {("coordination.k8s.io", "leases", "create", None),
              ("coordination.k8s.io", "leases", "get", LEASE),
              ("coordination.k8s.io", "leases", "update", LEASE)}

# verbs the agent does not need: each must be forbidden to its service account
FORBIDDEN = [
    ("get", "leases.coordination.k8s.io/kube-scheduler", "-n", "kube-system"),
    ("update", "leases.coordination.k8s.io/kube-controller-manager", "-n", "kube-system"),
    ("patch", f"leases.coordination.k8s.io/{LEASE}", "-n", "kube-system"),
    ("delete", f"leases.coordination.k8s.io/{LEASE}", "-n", "kube-system"),
    ("list", "leases.coordination.k8s.io", "-n", "kube-system"),
    ("watch", "leases.coordination.k8s.io", "-n", "kube-system"),
    ("create", "leases.coordination.k8s.io", "-n", "default"),
    ("update", f"leases.coordination.k8s.io/{LEASE}", "-n", "default"),
    ("delete", "pods", "-n", "default"),
    ("create", "pods", "-n", "default"),
    ("patch", "pods", "-n", "default"),
    ("create", "pods", "--subresource=exec", "-n", "default"),
    ("update", "nodes"),
    ("delete", "namespaces"),
    ("create", "networkpolicies.networking.k8s.io", "-n", "default"),
    ("get", "secrets", "-n", "kube-system"),
    ("list", "secrets", "-A"),
    ("list", "configmaps", "-A"),
    ("get", "configmaps", "-n", "kube-system"),
    ("update", "ciliumnetworkpolicies.cilium.io", "-n", "default"),
    ("patch", "ciliumnetworkpolicies.cilium.io", "-n", "default"),
    ("create", "ciliumnetworkpolicies.cilium.io", "-n", "default"),
    ("delete", "ciliumclusterwidenetworkpolicies.cilium.io"),
    ("update", "ciliumidentities.cilium.io"),
    ("deletecollection", "ciliumidentities.cilium.io"),
    ("update", "ciliumclusterwidenetworkpolicies.cilium.io"),
    ("list", "events", "-A"),
    ("delete", "events", "-n", "default"),
    ("create", "serviceaccounts", "--subresource=token", "-n", "kube-system"),
    ("create", "customresourcedefinitions.apiextensions.k8s.io"),
    ("list", "daemonsets.apps", "-n", "kube-system"),
    ("escalate", "clusterroles.rbac.authorization.k8s.io"),
]


def _docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _by_kind(kind: str) -> list[dict[str, Any]]:
    out = []
    for name in ("rbac.yaml", "configmap.yaml", "daemonset.yaml"):
        out += [d for d in _docs(DEPLOY / name) if d.get("kind") == kind]
    return out


def _crd(name: str) -> dict[str, Any]:
    (doc,) = _docs(DEPLOY / "crds" / f"{name}.yaml")
    return doc


# -- the files ---------------------------------------------------------------------------------

def test_crds_are_generated_from_scripts_gen_crds():
    res = subprocess.run([str(REPO / "scripts" / "gen-crds"), "--check"], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr


def _walk(schema: dict[str, Any], path: str):
    yield path, schema
    for name, sub in schema.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if "items" in schema:
        yield from _walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _walk(schema["additionalProperties"], f"{path}{{}}")


@pytest.mark.parametrize("name", ["ciliumnetworkpolicies", "ciliumclusterwidenetworkpolicies"])
def test_crd_schema_is_structural_and_closed(name):
    """Every level typed; unknown fields kept only under status (the agents' per-node status)."""
    version = _crd(name)["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    root = version["schema"]["openAPIV3Schema"]
    preserved = []
    for path, node in _walk(root, ""):
        assert node.get("type") or node.get("x-kubernetes-int-or-string"), f"untyped: {path}"
        if node.get("x-kubernetes-preserve-unknown-fields"):
            preserved.append(path)
        if node.get("type") == "object" and path not in (".metadata", ".status"):
            assert "properties" in node or "additionalProperties" in node, f"open object: {path}"
    assert preserved == [".status"]


def test_crd_entities_are_the_parsers():
    from axoneme.core.policy.api import ENTITIES

    root = _crd("ciliumnetworkpolicies")["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for field, rules in (("fromEntities", "ingress"), ("toEntities", "egressDeny")):
        enum = root["properties"]["spec"]["properties"][rules]["items"]["properties"][field]
        assert set(enum["items"]["enum"]) == set(ENTITIES)


def test_crd_names_are_the_contract():
    cnp = _crd("ciliumnetworkpolicies")["spec"]
    ccnp = _crd("ciliumclusterwidenetworkpolicies")["spec"]
    assert (cnp["group"], cnp["scope"], cnp["names"]["kind"]) == ("cilium.io", "Namespaced",
                                                                  "CiliumNetworkPolicy")
    assert cnp["names"]["shortNames"] == ["cnp", "ciliumnp"]
    assert (ccnp["scope"], ccnp["names"]["kind"]) == ("Cluster", "CiliumClusterwideNetworkPolicy")
    assert ccnp["names"]["plural"] == "ciliumclusterwidenetworkpolicies"
    assert ccnp["names"]["shortNames"] == ["ccnp"]
    assert [v["name"] for v in cnp["versions"]] == ["v2"]


def test_clusterrole_is_exactly_the_contract():
    (role,) = _by_kind("ClusterRole")
    granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"]
               for r in rule["resources"] for v in rule["verbs"]}
    assert granted == CONTRACT_RULES
    assert not any("resourceNames" in rule or "nonResourceURLs" in rule for rule in role["rules"])
    (binding,) = _by_kind("ClusterRoleBinding")
    assert binding["roleRef"]["name"] == "axoneme"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "axoneme",
                                    "namespace": "kube-system"}]


def test_role_is_exactly_the_lease_contract():
    (role,) = _by_kind("Role")
    assert (role["metadata"]["name"], role["metadata"]["namespace"]) == (LEASE, "kube-system")
    granted = {(g, r, v, n) for rule in role["rules"] for g in rule["apiGroups"]
               for r in rule["resources"] for v in rule["verbs"]
               for n in rule.get("resourceNames") or [None]}
    assert granted == ROLE_RULES
    (binding,) = _by_kind("RoleBinding")
    assert binding["metadata"]["namespace"] == "kube-system"
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": LEASE}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "axoneme",
                                    "namespace": "kube-system"}]


def test_configmap_config_is_a_valid_agent_config(tmp_path):
    from axoneme.agent.cli._agentconfig import load_config

    (cm,) = _by_kind("ConfigMap")
    assert (cm["metadata"]["name"], cm["metadata"]["namespace"]) == ("axoneme-config", "kube-system")
    path = tmp_path / "config.yaml"
    path.write_text(cm["data"]["config.yaml"])
    conf = load_config(str(path))  # refuses an unknown key or a mistyped value
    assert conf["datapath"] == "ebpf"
    assert conf["pod_cidr"] == "10.244.0.0/16"  # the cluster's: IPs from the Node's podCIDR
    assert (cm["data"]["k8sServiceHost"], cm["data"]["k8sServicePort"]) == ("10.255.254.1", "6443")


# -- against the API server --------------------------------------------------------------------

@pytest.fixture(scope="module")
def deployed(control_plane):
    """`kubectl apply -k deploy/` (server-side validation, strict), CRDs established."""
    cp = control_plane
    res = cp.kubectl("apply", "-k", str(DEPLOY), "--validate=strict")
    for obj in ("customresourcedefinition.apiextensions.k8s.io/ciliumnetworkpolicies.cilium.io",
                "serviceaccount/axoneme", "clusterrole.rbac.authorization.k8s.io/axoneme",
                "clusterrolebinding.rbac.authorization.k8s.io/axoneme", "configmap/axoneme-config",
                f"role.rbac.authorization.k8s.io/{LEASE}",
                f"rolebinding.rbac.authorization.k8s.io/{LEASE}", "daemonset.apps/axoneme"):
        assert obj in res.stdout, res.stdout
    cp.kubectl("wait", "--for", "condition=established", "--timeout=60s",
               "crd/ciliumnetworkpolicies.cilium.io", "crd/ciliumclusterwidenetworkpolicies.cilium.io")
    return cp


def test_apply_k_is_idempotent_and_renders_with_kubectls_kustomize(deployed):
    res = deployed.kubectl("apply", "-k", str(DEPLOY))
    assert "created" not in res.stdout and "configured" not in res.stdout, res.stdout
    kinds = [d["kind"] for d in yaml.safe_load_all(deployed.kubectl("kustomize", str(DEPLOY)).stdout)]
    assert sorted(kinds) == sorted(["CustomResourceDefinition", "CustomResourceDefinition",
                                    "CustomResourceDefinition", "ServiceAccount", "ClusterRole", "ClusterRoleBinding",
                                    "Role", "RoleBinding", "ConfigMap", "DaemonSet"])


def _yaml_blocks(md: Path) -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", md.read_text(), re.S)


def _seed_documents() -> list[tuple[str, dict[str, Any]]]:
    """Every policy document of the repository's seed scenarios: examples/ (but
    examples/invalid) and the YAML blocks of docs/."""
    out: list[tuple[str, dict[str, Any]]] = []
    for path in sorted((REPO / "examples").rglob("*.yaml")):
        if "invalid" in path.relative_to(REPO / "examples").parts:
            continue
        for i, doc in enumerate(_docs(path)):
            if doc.get("kind") in POLICY_KINDS:
                out.append((f"{path.relative_to(REPO)}#{i}", doc))
    # (a docs/ block may use a parser that is not installed here: the server's check only)
    for md in sorted((REPO / "docs").glob("*.md")):
        for i, block in enumerate(_yaml_blocks(md)):
            for doc in yaml.safe_load_all(block):
                if isinstance(doc, dict) and doc.get("kind") in CILIUM_KINDS:
                    out.append((f"{md.relative_to(REPO)}[{i}]", doc))
    return out


def _apply_file(cp, path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return cp.kubectl("apply", "-f", str(path), *args, check=False)


def test_star_wars_policies_apply_verbatim(deployed):
    cp = deployed
    files = [REPO / "examples" / "starwars" / f"{name}.yaml"
             for name in ("sw_l3_l4_policy", "sw_l3_l4_l7_policy")]
    try:
        for path in files:  # the L3/L4 then the L7 rule1, as the tutorial does
            res = _apply_file(cp, path)
            assert res.returncode == 0, f"{path.name}: {res.stderr}"
        got = json.loads(cp.kubectl("get", "cnp", "rule1", "-o", "json").stdout)
        http = got["spec"]["ingress"][0]["toPorts"][0]["rules"]["http"]
        assert http == [{"method": "POST", "path": "/v1/request-landing"}]
        assert got["spec"]["ingress"][0]["toPorts"][0]["ports"] == [{"port": "80", "protocol": "TCP"}]
    finally:
        cp.kubectl("delete", "cnp", "rule1", "--ignore-not-found", check=False)


def test_every_seed_policy_is_accepted_by_the_server(deployed, tmp_path):
    from axoneme.core.policy.parse import parse_policy_obj

    cp = deployed
    seeds = _seed_documents()
    assert sum(d["kind"] in CILIUM_KINDS for _, d in seeds) >= 8, [w for w, _ in seeds]
    namespaces = {d["metadata"].get("namespace") for _, d in seeds} - {None, "default"}
    for ns in sorted(namespaces):
        cp.kubectl("create", "namespace", ns, check=False)
    try:
        for where, doc in seeds:
            if where.startswith("examples/"):  # the agent's parser accepts it too
                parse_policy_obj(doc, file=where)
            path = tmp_path / "seed.yaml"
            path.write_text(json.dumps(doc))  # (PyYAML writes a bare y, YAML 1.1's true)
            res = _apply_file(cp, path, "--dry-run=server")
            assert res.returncode == 0, f"{where}: {res.stderr}"
        # and the files themselves, verbatim (quoting, flow style, comments as written)
        for path in sorted((REPO / "examples").rglob("*.yaml")):
            if "invalid" in path.parts or not any(d.get("kind") in POLICY_KINDS for d in _docs(path)):
                continue
            res = _apply_file(cp, path, "--dry-run=server")
            assert res.returncode == 0, f"{path.relative_to(REPO)}: {res.stderr}"
    finally:
        for ns in sorted(namespaces):
            cp.kubectl("delete", "namespace", ns, "--wait=false", check=False)


L7_POLICY = (REPO / "examples" / "starwars" / "sw_l3_l4_l7_policy.yaml").read_text()


@pytest.mark.parametrize("old,new,error", [
    ("    toPorts:", "    toPort:", 'unknown field "spec.ingress[0].toPort"'),
    ("  endpointSelector:", "  endpointselector:", 'unknown field "spec.endpointselector"'),
    ("      rules:", "      rule:", 'unknown field "spec.ingress[0].toPorts[0].rule"'),
    ("        http:", "        htpp:", 'unknown field "spec.ingress[0].toPorts[0].rules.htpp"'),
    ('        - method: "POST"', '        - methods: "POST"',
     'unknown field "spec.ingress[0].toPorts[0].rules.http[0].methods"'),
    ("  - fromEndpoints:", "  - fromEndpoint:", 'unknown field "spec.ingress[0].fromEndpoint"'),
    ("    - matchLabels:\n        org", "    - matchlabels:\n        org",
     'unknown field "spec.ingress[0].fromEndpoints[0].matchlabels"'),
    # Cilium's old tutorial file put description outside spec
    ('spec:\n  description: "L7 policy to restrict access to specific HTTP call"\n',
     'description: "L7 policy to restrict access to specific HTTP call"\nspec:\n',
     'unknown field "description"'),
    ("        protocol: TCP", "        protocol: tcp",
     'spec.ingress[0].toPorts[0].ports[0].protocol: Unsupported value: "tcp"'),
    ("        protocol: TCP", "        protocol: TCP\n        endPort: \"81\"",
     "spec.ingress[0].toPorts[0].ports[0].endPort: Invalid value"),
    ('      - port: "80"', '      - port: "80000"', "spec.ingress[0].toPorts[0].ports[0].port"),
    ("      - port: \"80\"", "      - port: 99999", "spec.ingress[0].toPorts[0].ports[0].port"),
    ("        org: empire\n    toPorts", "        org: true\n    toPorts",
     "spec.ingress[0].fromEndpoints[0].matchLabels.org: Invalid value"),
    ("  ingress:", "  ingressDeny:\n  - toPorts:\n    - rules: {}\n  ingress:",
     'unknown field "spec.ingressDeny[0].toPorts[0].rules"'),
    ("  ingress:", "  nodeSelector: {}\n  ingress:", 'unknown field "spec.nodeSelector"'),
    ("  endpointSelector:\n    matchLabels:\n      org: empire\n      class: deathstar\n", "",
     "spec.endpointSelector: Required value"),
])
def test_mistyped_field_is_rejected_naming_its_path(deployed, tmp_path, old, new, error):
    assert old in L7_POLICY
    path = tmp_path / "bad.yaml"
    path.write_text(L7_POLICY.replace(old, new, 1))
    try:
        res = _apply_file(deployed, path)
        assert res.returncode != 0, f"accepted: {path.read_text()}"
        assert error in res.stderr, res.stderr
    finally:
        deployed.kubectl("delete", "cnp", "rule1", "--ignore-not-found", check=False)


@pytest.mark.parametrize("spec,error", [
    ({"ingress": [{"fromEntities": ["world"]}]},
     "exactly one of endpointSelector or nodeSelector is required"),
    ({"endpointSelector": {}, "nodeSelector": {}, "ingress": [{}]},
     "exactly one of endpointSelector or nodeSelector is required"),
    ({"nodeSelector": {}, "ingressDeny": [{"fromEntities": ["wrld"]}]},
     'spec.ingressDeny[0].fromEntities[0]: Unsupported value: "wrld"'),
    ({"endpointSelector": {"matchExpressions": [{"key": "a", "operator": "in"}]}},
     "spec.endpointSelector.matchExpressions[0].operator: Unsupported value"),
    ({"endpointSelector": {}, "egress": [{"toFQDNs": [{"matchname": "x.io"}]}]},
     'unknown field "spec.egress[0].toFQDNs[0].matchname"'),
    ({"endpointSelector": {}, "egressDeny": [{"toFQDNs": [{"matchName": "x.io"}]}]},
     'unknown field "spec.egressDeny[0].toFQDNs"'),
    ({"endpointSelector": {}, "ingress": [{"icmps": [{"fields": [{"type": 8, "family": "IPv5"}]}]}]},
     'spec.ingress[0].icmps[0].fields[0].family: Unsupported value: "IPv5"'),
])
def test_ccnp_schema_errors_name_the_field(deployed, tmp_path, spec, error):
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps({"apiVersion": "cilium.io/v2", "kind": "CiliumClusterwideNetworkPolicy",
                                "metadata": {"name": "bad"}, "spec": spec}))
    res = _apply_file(deployed, path)
    assert res.returncode != 0 and error in res.stderr, res.stderr


def test_without_spec_is_rejected(deployed, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: e}\n")
    res = _apply_file(deployed, path)
    assert res.returncode != 0 and "one of spec or specs is required" in res.stderr, res.stderr


def test_everything_cilium_has_is_accepted(deployed, tmp_path):
    """Fields of Cilium's language the agent refuses (it reports them in the policy's
    status) still pass the server: a Cilium user's YAML is not refused as malformed."""
    doc = {
        "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "everything", "namespace": "default"},
        "specs": [{
            "description": "all of it", "labels": [{"key": "k", "value": "v", "source": "s"}],
            "enableDefaultDeny": {"ingress": True, "egress": False},
            "endpointSelector": {"matchLabels": {"app": "x", "k8s:io.kubernetes.pod.namespace": "default"},
                                 "matchExpressions": [{"key": "t", "operator": "NotIn", "values": ["a"]},
                                                      {"key": "u", "operator": "Exists"}]},
            "ingress": [{
                "fromEndpoints": [{}], "fromRequires": [{"matchLabels": {"env": "prod"}}],
                "fromEntities": ["world", "cluster"], "fromCIDR": ["192.0.2.0/24", "2001:db8::1"],
                "fromCIDRSet": [{"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]},
                                {"cidrGroupRef": "group"}],
                "fromNodes": [{"matchLabels": {"n": "1"}}],
                "authentication": {"mode": "required"},
                "toPorts": [{"ports": [{"port": "8080", "endPort": 8090, "protocol": "TCP"},
                                       {"port": 53, "protocol": "ANY"}, {"port": "http"}],
                             "rules": {"http": [{"method": "GET", "path": "/.*", "host": "a.io",
                                                 "headers": ["X-A: 1"],
                                                 "headerMatches": [{"name": "X-B", "value": "2",
                                                                    "mismatch": "LOG"}]}]},
                             "serverNames": ["a.io"],
                             "terminatingTLS": {"secret": {"name": "s", "namespace": "n"}}},
                            {"ports": [{"port": "9092"}],
                             "rules": {"kafka": [{"role": "produce", "topic": "t"},
                                                 {"apiKey": "fetch", "apiVersion": 3, "clientID": "c"}]}},
                            {"ports": [{"port": "7000"}],
                             "rules": {"l7proto": "echo", "l7": [{"verb": "GET"}]}}],
                "icmps": [{"fields": [{"type": 8}, {"family": "IPv6", "type": "EchoRequest"}]}],
            }],
            "ingressDeny": [{"fromEntities": ["host"], "toPorts": [{"ports": [{"port": "22"}]}]}],
            "egress": [{"toFQDNs": [{"matchName": "api.twitter.com"}, {"matchPattern": "*.io"}],
                        "toPorts": [{"ports": [{"port": "53", "protocol": "UDP"}],
                                     "rules": {"dns": [{"matchPattern": "*"}]}}]},
                       {"toServices": [{"k8sService": {"serviceName": "s", "namespace": "n"}},
                                       {"k8sServiceSelector": {"selector": {"matchLabels": {"a": "b"}}}}]},
                       {"toRequires": [{}], "toGroups": [{"aws": {"securityGroupsIds": ["sg-1"]}}],
                        "toEndpoints": [{}], "icmps": [{"fields": [{"type": "0"}]}]}],
            "egressDeny": [{"toCIDRSet": [{"cidr": "0.0.0.0/0"}], "toEntities": ["world"],
                            "toServices": [{"k8sService": {"serviceName": "s"}}]}],
        }],
    }
    path = tmp_path / "all.json"
    path.write_text(json.dumps(doc))
    try:
        deployed.kubectl("apply", "-f", str(path))
        got = json.loads(deployed.kubectl("-n", "default", "get", "cnp", "everything", "-o", "json").stdout)
        assert got["specs"] == doc["specs"]  # nothing pruned
    finally:
        deployed.kubectl("-n", "default", "delete", "cnp", "everything", "--ignore-not-found", check=False)


NODE_STATUS = {"nodes": {"node-1": {"ok": True, "enforcing": True, "error": "",
                                    "lastUpdated": "2026-12-04T10:00:00Z", "localPolicyRevision": 7}},
               "conditions": [{"type": "Valid", "status": "True", "reason": "Parsed",
                               "message": "", "lastTransitionTime": "2026-12-04T10:00:00Z"}]}


class _AsAgent:
    """Requests as the agent's service account: a real token of it, no admin credentials."""

    def __init__(self, cp) -> None:
        self.cp = cp
        self.server = cp.kubectl("config", "view", "--minify",
                                 "-o", "jsonpath={.clusters[0].cluster.server}").stdout
        self.token = cp.kubectl("-n", "kube-system", "create", "token", "axoneme",
                                "--duration=10m").stdout.strip()

    def kubectl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.cp.kubectl_bin, "--server", self.server, "--token", self.token,
                               "--insecure-skip-tls-verify", "--kubeconfig", os.devnull, *args],
                              capture_output=True, text=True, timeout=60)

    def merge_patch(self, path: str, body: dict[str, Any]) -> int:
        """PATCH as the agent's client does (no GET first); the HTTP status."""
        req = urllib.request.Request(self.server + path, data=json.dumps(body).encode(), method="PATCH",
                                     headers={"Authorization": f"Bearer {self.token}",
                                              "Content-Type": "application/merge-patch+json"})
        ctx = ssl.create_default_context(cafile=str(self.cp.dir / "pki" / "ca.crt"))
        ctx.check_hostname = False
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=30) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as e:
            return int(e.code)


RULE1 = "/apis/cilium.io/v2/namespaces/default/ciliumnetworkpolicies/rule1"


def test_agent_role_writes_status_only(deployed, tmp_path):
    """As the agent: list the policies, write their status (Cilium's per-node status, kept
    as written) by PATCH and by PUT of the status subresource, never their spec."""
    cp = deployed
    cp.kubectl("apply", "-f", str(REPO / "examples" / "starwars" / "sw_l3_l4_policy.yaml"))
    try:
        agent = _AsAgent(cp)
        assert agent.kubectl("get", "cnp", "-A", "-o", "name").stdout.strip() == \
            "ciliumnetworkpolicy.cilium.io/rule1"
        res = agent.kubectl("get", "pods,nodes,namespaces,networkpolicies,ccnp", "-A")
        assert res.returncode == 0, res.stderr
        assert agent.merge_patch(RULE1 + "/status", {"status": NODE_STATUS}) == 200
        got = json.loads(cp.kubectl("-n", "default", "get", "cnp", "rule1", "-o", "json").stdout)
        assert got["status"] == NODE_STATUS
        # update (PUT) of the status subresource, with the object the agent watched
        got["status"]["nodes"]["node-1"]["localPolicyRevision"] = 8
        (tmp_path / "status.json").write_text(json.dumps(got))
        res = agent.kubectl("replace", "--raw", RULE1 + "/status", "-f", str(tmp_path / "status.json"))
        assert res.returncode == 0, res.stderr
        got = json.loads(cp.kubectl("-n", "default", "get", "cnp", "rule1", "-o", "json").stdout)
        assert got["status"]["nodes"]["node-1"]["localPolicyRevision"] == 8
        assert "changed" not in json.dumps(got["spec"])
        # the spec: forbidden, by PATCH or through the status subresource's sibling
        assert agent.merge_patch(RULE1, {"spec": {"description": "changed"}}) == 403
        for verb in (("-n", "kube-system", "get", "secrets"), ("-n", "default", "delete", "cnp", "rule1"),
                     ("-n", "kube-system", "get", "configmap", "axoneme-config"),
                     ("-n", "default", "delete", "pod", "tiefighter")):
            res = agent.kubectl(*verb)
            assert res.returncode != 0 and "forbidden" in res.stderr.lower(), (verb, res.stderr)
    finally:
        cp.kubectl("-n", "default", "delete", "cnp", "rule1", "--ignore-not-found", check=False)


def _can_i(cp, verb: str, resource: str, *args: str) -> bool:
    res = cp.kubectl("auth", "can-i", verb, resource, *args, "--as", SA, check=False)
    assert res.stdout.strip() in ("yes", "no"), res.stderr
    return res.stdout.strip() == "yes"


def test_agent_role_allows_every_contract_verb(deployed):
    for group, resource, verb in sorted(CONTRACT_RULES):
        name, _, sub = resource.partition("/")
        target = f"{name}.{group}" if group else name
        extra = ("--subresource", sub) if sub else ()
        assert _can_i(deployed, verb, target, "-A", *extra), (verb, resource, group)
    for group, resource, verb, name in sorted(ROLE_RULES, key=str):
        target = f"{resource}.{group}" + (f"/{name}" if name else "")
        assert _can_i(deployed, verb, target, "-n", "kube-system"), (verb, resource, name)


def test_agent_elects_its_collector_with_its_own_token(deployed):
    """Two electors (agent/_identitylease.py) over the real API as the agent's service account:
    the first creates the Lease, the second cannot take it while fresh, a renew is an update,
    a stale resourceVersion loses with 409, a release lets the second take it at once."""
    from axoneme.agent._identitylease import KubernetesLeaseAPI, LeaseElector
    from kubernetes import client

    agent = _AsAgent(deployed)
    cfg = client.Configuration()
    cfg.host, cfg.api_key = agent.server, {"authorization": f"Bearer {agent.token}"}
    cfg.ssl_ca_cert = str(deployed.dir / "pki" / "ca.crt")
    cfg.assert_hostname = False
    api = KubernetesLeaseAPI(client.ApiClient(cfg), "kube-system")
    a, b = (LeaseElector(api, node, "kube-system") for node in ("node-a", "node-b"))
    deployed.kubectl("-n", "kube-system", "delete", "lease", LEASE, "--ignore-not-found")
    try:
        assert a.attempt() and a.leading() and a.acquired == 1  # created
        assert not b.attempt() and b.holder() == "node-a"  # held, fresh
        stale = api.get()
        assert a.attempt() and a.leading()  # renewed: an update
        with pytest.raises(client.exceptions.ApiException) as e:
            api.update(dict(stale, spec=dict(stale["spec"], holderIdentity="node-b")))
        assert e.value.status == 409
        assert a.release() and not a.leading()
        assert b.attempt() and b.leading()  # released: taken at once
        spec = api.get()["spec"]
        assert spec["holderIdentity"] == "node-b" and spec["leaseTransitions"] == 1, spec
        assert agent.kubectl("-n", "kube-system", "delete", "lease", LEASE).returncode != 0
    finally:
        deployed.kubectl("-n", "kube-system", "delete", "lease", LEASE, "--ignore-not-found")


@pytest.mark.parametrize("verb", FORBIDDEN, ids=lambda v: " ".join(v))
def test_agent_role_forbids_what_it_does_not_need(deployed, verb):
    assert not _can_i(deployed, *verb)


def test_daemonset_fields(deployed):
    ds = json.loads(deployed.kubectl("-n", "kube-system", "get", "ds", "axoneme", "-o", "json").stdout)
    assert ds["spec"]["updateStrategy"] == {"type": "RollingUpdate",
                                            "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}}
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and not pod.get("hostPID")
    assert pod["serviceAccountName"] == "axoneme"
    assert pod["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in pod["tolerations"]
    assert pod["terminationGracePeriodSeconds"] >= 10
    (c,) = pod["containers"]
    assert (c["image"], c["imagePullPolicy"]) == ("localhost/axoneme:dev", "Never")
    assert c["securityContext"]["privileged"] is True
    cmd = c["command"] + c["args"]
    assert cmd[:5] == ["axoneme", "agent", "run", "--config", "/etc/axoneme/config.yaml"]
    for flag, value in (("--k8s-api-server", "https://$(KUBERNETES_SERVICE_HOST):$(KUBERNETES_SERVICE_PORT)"),
                        ("--cni-conf-dir", "/host/etc/cni/net.d"), ("--cni-bin-dir", "/host/opt/cni/bin"),
                        ("--state-dir", "$(AXONEME_STATE_DIR)")):
        assert cmd[cmd.index(flag) + 1] == value
    assert "--install-cni" in cmd
    for probe in ("startupProbe", "readinessProbe"):
        assert c[probe]["exec"]["command"] == ["axoneme", "status", "--brief"], probe
    assert c["livenessProbe"]["exec"]["command"] == ["axoneme", "status"]
    # a cold start compiles BPF: the startup probe allows minutes before liveness counts
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 300
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["KUBERNETES_SERVICE_HOST"]["valueFrom"]["configMapKeyRef"] == {
        "name": "axoneme-config", "key": "k8sServiceHost"}
    assert env["KUBERNETES_SERVICE_PORT"]["valueFrom"]["configMapKeyRef"] == {
        "name": "axoneme-config", "key": "k8sServicePort"}
    assert env["AXONEME_STATE_DIR"]["value"] == "/var/run/axoneme"
    assert env["AXONEME_API_SOCKET"]["value"] == "/var/run/axoneme/axoneme.sock"
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    host = {mounts[n]["mountPath"]: volumes[n]["hostPath"]["path"] for n in mounts if "hostPath" in volumes[n]}
    assert host == {"/sys/fs/bpf": "/sys/fs/bpf", "/var/run/axoneme": "/var/run/axoneme",
                    "/var/run/netns": "/var/run/netns", "/lib/modules": "/lib/modules",
                    "/usr/src": "/usr/src", "/host/etc/cni/net.d": "/etc/cni/net.d",
                    "/host/opt/cni/bin": "/opt/cni/bin", "/run/xtables.lock": "/run/xtables.lock"}
    assert mounts["netns"]["mountPropagation"] == "HostToContainer"
    assert mounts["lib-modules"]["readOnly"] and mounts["usr-src"]["readOnly"]
    assert volumes["config"]["configMap"]["name"] == "axoneme-config"
    assert mounts["config"]["mountPath"] == "/etc/axoneme"
    # no kubelet in this control plane: created, nothing scheduled
    assert ds["status"].get("desiredNumberScheduled", 0) == 0


def _documented_overlay() -> str:
    """The overlay docs/kubernetes.md shows ("Overlays: another datapath, other host paths")."""
    (block,) = [b for b in _yaml_blocks(REPO / "docs" / "kubernetes.md")
                if b.startswith("# overlay/kustomization.yaml")]
    return block


def test_overlay_switches_the_datapath(deployed, tmp_path):
    """The overlay docs/kubernetes.md documents (what scripts/cluster does): it replaces
    config.yaml, the API server address and the host paths; the result passes the server."""
    (tmp_path / "config.yaml").write_text("datapath: iptables\niptables_mode: ipset\n"
                                          "pod_cidr: 10.244.0.0/24\n")
    overlay = _documented_overlay()
    assert "- ../deploy " in overlay
    (tmp_path / "kustomization.yaml").write_text(
        overlay.replace("- ../deploy ", f"- {os.path.relpath(DEPLOY, tmp_path)} ", 1))
    out = deployed.kubectl("kustomize", str(tmp_path)).stdout
    docs = {d["kind"]: d for d in yaml.safe_load_all(out)}
    cm = docs["ConfigMap"]
    assert cm["metadata"]["name"] == "axoneme-config"
    assert yaml.safe_load(cm["data"]["config.yaml"])["datapath"] == "iptables"
    assert cm["data"]["k8sServiceHost"] == "192.0.2.10" and cm["data"]["k8sServicePort"] == "6443"
    (vol,) = [v for v in docs["DaemonSet"]["spec"]["template"]["spec"]["volumes"]
              if v["name"] == "cni-conf"]
    assert vol == {"name": "cni-conf", "hostPath": {"path": "/srv/cluster/cni/net.d",
                                                    "type": "DirectoryOrCreate"}}
    # the state dir moved, at the same path on both sides
    pod = docs["DaemonSet"]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert (env["AXONEME_STATE_DIR"], env["AXONEME_API_SOCKET"]) == ("/srv/cluster/state",
                                                                    "/srv/cluster/state/axoneme.sock")
    assert {m["mountPath"] for m in c["volumeMounts"] if m["name"] == "state"} == {"/srv/cluster/state"}
    assert {v["hostPath"]["path"] for v in pod["volumes"] if v["name"] == "state"} == {"/srv/cluster/state"}
    deployed.kubectl("apply", "-k", str(tmp_path), "--dry-run=server")


def test_host_wide_locks_are_in_a_directory_the_daemonset_shares_with_the_host():
    """The iptables one-agent-per-netns lock and the guard/proxy rule locks must be
    the same files for the DaemonSet's agent and for anything run on the host (a
    standalone agent, `agent cleanup`): a lock in the container's own /run would let
    a host agent take "its" lock and its cleanup remove the DaemonSet agent's chains."""
    from axoneme.agent import guard
    from axoneme.agent.proxy import _rules
    from axoneme.datapath.iptables._datapath import HOST_LOCK_DIR

    ds = yaml.safe_load((DEPLOY / "daemonset.yaml").read_text())
    pod = ds["spec"]["template"]["spec"]
    host_paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    shared = {m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])
              if host_paths.get(m["name"]) == m["mountPath"]}
    for path in (HOST_LOCK_DIR, os.path.dirname(guard.LOCK_PATH), os.path.dirname(_rules.LOCK_PATH)):
        assert path in shared, f"{path} is not a hostPath mounted at the same path: {sorted(shared)}"
