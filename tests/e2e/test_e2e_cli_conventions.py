"""CLI conventions against a real agent (issue 18): -l selectors and -o wide|yaml on the
listings, and `policy get -o yaml` round-tripping through `policy apply`.

Real pods (netns + axoneme-cni + a process), real policies; the agent's resolved policy of an
endpoint is compared before a delete and after the re-apply of what `policy get` printed."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = [pytest.mark.e2e, pytest.mark.privileged]

POLICIES = """\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: web-from-db
  namespace: shop
  labels: {team: a}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from:
    - podSelector: {matchLabels: {app: db}}
    ports:
    - {port: 80, protocol: TCP}
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: db-rules
  namespace: shop
  labels: {team: b}
specs:
- endpointSelector: {matchLabels: {app: db}}
  egress:
  - toEndpoints:
    - matchLabels: {app: web}
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
- endpointSelector: {matchLabels: {app: db}}
  ingressDeny:
  - fromEntities: [world]
---
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata:
  name: dns-everywhere
spec:
  endpointSelector: {}
  egress:
  - toEntities: [world]
    toPorts:
    - ports: [{port: "53", protocol: UDP}]
"""


def _ok(agent: Any, *args: str) -> str:
    return str(agent.cli(*args, check=True).stdout)


def _endpoint(agent: Any, pod: str) -> dict[str, Any]:
    (ep,) = [e for e in agent.json("endpoint", "list") if e["pod"] == pod]
    return dict(ep)


def _resolved(agent: Any, ep_id: int) -> list[tuple[str, str]]:
    policy = agent.json("endpoint", "get", str(ep_id))["policy"]
    return sorted((e["key"], e["entry"]) for e in policy)


def test_listings_select_and_print_wide_and_yaml(agent: Any) -> None:
    _ok(agent, "namespace", "create", "shop", "--labels", "env=prod")
    _ok(agent, "namespace", "create", "dev", "--labels", "env=dev")
    agent.pod_run("web", "sleep", "300", namespace="shop", labels="app=web,tier=front")
    agent.pod_run("db", "sleep", "300", namespace="shop", labels="app=db")
    agent.pod_run("tool", "sleep", "300", namespace="dev", labels="app=tool")

    web = _endpoint(agent, "shop/web")
    got = json.loads(_ok(agent, "endpoint", "list", "-o", "json", "-l", "app=web"))
    assert got == [web]
    got = yaml.safe_load(_ok(agent, "endpoint", "list", "-o", "yaml",
                             "-l", "k8s:io.kubernetes.pod.namespace=shop,app notin (web)"))
    assert [e["pod"] for e in got] == ["shop/db"]
    wide = _ok(agent, "endpoint", "list", "-o", "wide", "-l", "tier")
    assert "POD" in wide.splitlines()[0] and "shop/web" in wide and "shop/db" not in wide

    pods = yaml.safe_load(_ok(agent, "pod", "list", "-o", "yaml", "-l", "app in (web,db,tool),!tier"))
    assert sorted(p["name"] for p in pods) == ["db", "tool"]
    pods = json.loads(_ok(agent, "pod", "list", "-n", "shop", "-o", "json", "-l", "app"))
    assert sorted(p["name"] for p in pods) == ["db", "web"]
    wide = _ok(agent, "pod", "list", "-o", "wide", "-l", "app=tool")
    assert "NETNS" in wide.splitlines()[0] and len(wide.splitlines()) == 2

    idents = json.loads(_ok(agent, "identity", "list", "-o", "json", "-l", "app=web"))
    assert [i["id"] for i in idents] == [web["identity"]]
    reserved = json.loads(_ok(agent, "identity", "list", "-o", "json", "-l", "reserved:host"))
    assert [i["id"] for i in reserved] == [1]

    nss = json.loads(_ok(agent, "namespace", "list", "-o", "json", "-l", "env in (prod)"))
    assert [n["name"] for n in nss] == ["shop"]

    res = agent.cli("pod", "list", "-l", "app in web")
    assert res.returncode == 2 and "-l/--selector" in res.stderr

    # shell completion asks this agent for names
    assert _complete(agent, "axoneme pod delete -n shop ") == ["db", "web"]
    assert _complete(agent, "axoneme pod exec t") == []  # -n default: tool is in dev
    assert _complete(agent, "axoneme pod logs -n dev t") == ["tool"]
    assert _complete(agent, "axoneme namespace delete ") == ["default", "dev", "shop"]
    assert _complete(agent, "axoneme pod list -n s") == ["shop"]
    assert _complete(agent, "axoneme endpoint get ") == sorted(
        str(e["id"]) for e in agent.json("endpoint", "list"))


def _complete(agent: Any, line: str) -> list[str]:
    """What `axoneme` answers bash asking to complete ``line`` (argcomplete's protocol)."""
    import os
    import subprocess
    import tempfile

    with tempfile.NamedTemporaryFile("r") as out:
        env = {**agent.env(), "_ARGCOMPLETE": "1", "_ARGCOMPLETE_IFS": "\n", "COMP_LINE": line,
               "COMP_POINT": str(len(line)), "_ARGCOMPLETE_STDOUT_FILENAME": out.name,
               "_ARGCOMPLETE_SHELL": "bash"}
        res = subprocess.run([os.path.join(os.path.dirname(sys.executable), "axoneme")], env=env,
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        # with nothing typed yet, flags are offered too: the names are what is checked
        return sorted(w.strip() for w in out.read().split("\n") if w.strip() and w[0] != "-")


def test_policy_get_yaml_round_trips_through_apply(agent: Any, tmp_path: Path) -> None:
    _ok(agent, "namespace", "create", "shop")
    agent.pod_run("web", "sleep", "300", namespace="shop", labels="app=web")
    agent.pod_run("db", "sleep", "300", namespace="shop", labels="app=db")
    src = tmp_path / "policies.yaml"
    src.write_text(POLICIES)
    _ok(agent, "policy", "apply", "-f", str(src))
    originals = list(yaml.safe_load_all(POLICIES))
    web, db = _endpoint(agent, "shop/web")["id"], _endpoint(agent, "shop/db")["id"]
    before = {ep: _resolved(agent, ep) for ep in (web, db)}

    # one policy: its document as applied; selectors on policy labels
    one = yaml.safe_load(_ok(agent, "policy", "get", "cnp/db-rules", "-n", "shop", "-o", "yaml"))
    assert one == originals[1]
    assert json.loads(_ok(agent, "policy", "get", "dns-everywhere", "-o", "json")) == originals[2]
    listed = json.loads(_ok(agent, "policy", "list", "-o", "json", "-l", "team in (a,b)"))
    assert sorted(p["name"] for p in listed) == ["db-rules", "web-from-db"]
    assert {p["name"]: p["labels"] for p in listed}["web-from-db"] == {"team": "a"}

    # everything: a List that policy apply takes
    saved = tmp_path / "saved.yaml"
    saved.write_text(_ok(agent, "policy", "get", "-o", "yaml"))
    doc = yaml.safe_load(saved.read_text())
    assert doc["kind"] == "List"
    assert sorted(map(json.dumps, doc["items"])) == sorted(map(json.dumps, originals))

    _ok(agent, "policy", "delete", "-f", str(src))
    assert json.loads(_ok(agent, "policy", "list", "-o", "json")) == []
    assert _resolved(agent, db) != before[db]
    _ok(agent, "policy", "apply", "-f", str(saved))
    assert {ep: _resolved(agent, ep) for ep in (web, db)} == before
    again = yaml.safe_load(_ok(agent, "policy", "get", "-o", "yaml"))
    assert sorted(map(json.dumps, again["items"])) == sorted(map(json.dumps, originals))

    res = agent.cli("policy", "get", "nope", "-n", "shop", "-o", "yaml")
    assert res.returncode == 2 and "not found in namespace shop" in res.stderr
