"""``axoneme ui``: the map, edge flows and validation (pure), and the server's JSON API
against a fake agent (no socket, no root): read-only refusal, same-origin guard, what-if
and recommendations through ``policy diff``/``recommend``'s code, and --listen checks."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer
from axoneme.agent.cli import UsageError, main
from axoneme.agent.cli import _whatif as whatif_cli
from axoneme.agent.cli._ui import parse_listen
from axoneme.agent.ui import bundle_problem
from axoneme.agent.ui._model import check_text, edge_flows, policy_text, service_map
from axoneme.agent.ui._server import UIServer

NOW = "2026-12-04T16:00:00.000000Z"


def _flow(src: tuple[int, str], dst: tuple[int, str], verdict: str, port: int = 80, *,
          direction: str = "INGRESS", reply: bool = False, **extra: Any) -> dict[str, Any]:
    def side(ident: int, pod: str) -> dict[str, Any]:
        if not pod:
            return {"identity": ident, "labels": ["reserved:world"]}
        return {"identity": ident, "namespace": "shop", "pod_name": pod,
                "labels": [f"k8s:app={pod.split('-')[0]}"]}

    return {"time": NOW, "verdict": verdict, "Type": "L3_L4", "traffic_direction": direction,
            "IP": {"source": f"10.244.0.{src[0] % 250}", "destination": f"10.244.0.{dst[0] % 250}",
                   "ipVersion": "IPv4"},
            "l4": {"TCP": {"source_port": 40000, "destination_port": port}},
            "source": side(*src), "destination": side(*dst), "is_reply": reply, **extra}


def _pol(name: str, default_deny: bool = False) -> dict[str, Any]:
    labels = ["k8s:io.cilium.k8s.policy.derived-from=NetworkPolicy",
              f"k8s:io.cilium.k8s.policy.name={name}", "k8s:io.cilium.k8s.policy.namespace=shop"]
    if default_deny:
        labels.append("k8s:io.axoneme.policy.default-deny=true")
    return {"name": name, "namespace": "shop", "kind": "NetworkPolicy", "labels": labels}


ENDPOINTS = [
    {"id": 1, "identity": 300, "labels": ["k8s:app=client", "k8s:io.kubernetes.pod.namespace=shop"],
     "ipv4": "10.244.0.50", "pod": "shop/client"},
    {"id": 2, "identity": 301, "labels": ["k8s:app=web", "k8s:io.kubernetes.pod.namespace=shop"],
     "ipv4": "10.244.0.51", "pod": "shop/web-1"},
    {"id": 3, "identity": 301, "labels": ["k8s:app=web", "k8s:io.kubernetes.pod.namespace=shop"],
     "ipv4": "10.244.0.52", "pod": "shop/web-2"},
]
IDENTITIES = [{"id": 2, "labels": ["reserved:world"], "reserved": True},
              {"id": 300, "labels": ["k8s:app=client"], "reserved": False}]
CLIENT, WEB, WORLD = (300, "client"), (301, "web-1"), (2, "")
FLOWS = [
    _flow(CLIENT, WEB, "FORWARDED", ingress_allowed_by=[_pol("allow-web")]),
    _flow(CLIENT, WEB, "FORWARDED", direction="EGRESS"),
    _flow(WEB, CLIENT, "FORWARDED", reply=True),  # a reply: no edge web -> client
    _flow(CLIENT, WEB, "DROPPED", 8080, drop_reason_desc="POLICY_DENIED",
          ingress_denied_by=[_pol("allow-web", default_deny=True)]),
    _flow(CLIENT, WORLD, "AUDIT", 443, direction="EGRESS", egress_denied_by=[_pol("deny-all")]),
]


def test_service_map_nodes_by_identity_and_edges_by_verdict() -> None:
    m = service_map(ENDPOINTS, IDENTITIES, FLOWS)
    nodes = {n["id"]: n for n in m["nodes"]}
    assert set(nodes) == {"id:300", "id:301", "id:2"}
    assert nodes["id:301"]["pods"] == ["shop/web-1", "shop/web-2"]  # one workload, two pods
    assert nodes["id:301"]["label"] == "web" and nodes["id:301"]["kind"] == "workload"
    assert nodes["id:2"]["kind"] == "reserved" and nodes["id:2"]["label"] == "world"
    edges = {e["id"]: e for e in m["edges"]}
    assert set(edges) == {"id:300>id:301", "id:300>id:2"}  # the reply made no edge
    web = edges["id:300>id:301"]
    assert web["counts"]["FORWARDED"] == 2 and web["counts"]["DROPPED"] == 1
    assert web["verdict"] == "DROPPED"  # the worst verdict colours the edge
    assert web["ports"] == ["80/TCP", "8080/TCP"]
    assert edges["id:300>id:2"]["verdict"] == "AUDIT"


def test_edge_flows_name_the_deciding_policy() -> None:
    flows = edge_flows(FLOWS, "id:300", "id:301")
    assert len(flows) == 3 and all(f["source"] == "shop/client" for f in flows)
    by = {(f["verdict"], f["direction"]): f["policy"] for f in flows}
    assert by[("FORWARDED", "INGRESS")] == "allowed by NetworkPolicy shop/allow-web"
    assert by[("FORWARDED", "EGRESS")] == "allowed: no policy selects the endpoint for egress"
    assert by[("DROPPED", "INGRESS")] == "default deny of NetworkPolicy shop/allow-web"
    assert policy_text(FLOWS[-1]) == "would be dropped by NetworkPolicy shop/deny-all"
    assert edge_flows(FLOWS, "id:301", "id:300") == []


NP_OK = """apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-web, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress: [{ports: [{port: 80}]}]
"""


def test_check_text_problems_at_their_field() -> None:
    assert check_text(NP_OK).to_json() == {"valid": True, "problems": [], "policies": [
        {"kind": "NetworkPolicy", "namespace": "shop", "name": "allow-web"}]}
    bad = check_text(NP_OK + "---\n" + NP_OK.replace("port: 80", "port: 99999"))
    assert [(p["document"], p["field"]) for p in bad.problems] == [
        (1, "spec.ingress[0].ports[0].port")]
    assert "99999" in bad.problems[0]["message"] or "65535" in bad.problems[0]["message"]
    syntax = check_text("kind: [")
    assert len(syntax.problems) == 1 and syntax.problems[0]["field"] == ""
    assert check_text("").problems[0]["message"] == "no policy in the editor"
    listed = check_text(json.dumps({"kind": "List", "items": [check_text(NP_OK).documents[0]]}))
    assert not listed.problems and len(listed.policies) == 1


# -- the server, against a fake agent ----------------------------------------------------

class FakeAgent:
    """The agent API's GET/POST routes the UI reads, with canned answers."""

    def __init__(self, flows: list[dict[str, Any]], policies: list[dict[str, Any]]) -> None:
        self.flows = flows
        self.policies = policies
        self.posted: list[tuple[str, Any]] = []
        self.socket_path = "/fake.sock"

    def get(self, path: str, **query: Any) -> Any:
        if path == "/v1/flows":
            return "\n".join(json.dumps(f) for f in self.flows)
        return {"/v1/endpoints": ENDPOINTS, "/v1/identities": IDENTITIES,
                "/v1/namespaces": [{"name": "shop", "labels": {"kubernetes.io/metadata.name": "shop"}}],
                "/v1/policies": {"policies": self.policies},
                "/v1/status": {"datapath": {"name": "ebpf"}, "policy_revision": 3, "endpoints": 3},
                }[path]

    def post(self, path: str, body: Any = None) -> Any:
        self.posted.append((path, body))
        return {"applied": [{"kind": "NetworkPolicy", "namespace": "shop", "name": "x"}], "revision": 4}


def _now_flows() -> list[dict[str, Any]]:
    import datetime as dt

    now = dt.datetime.now(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    return [dict(f, time=now) for f in FLOWS]


def _serve(fake: FakeAgent, allow_apply: bool, monkeypatch: pytest.MonkeyPatch,
           test: Callable[[TestClient], Any], static: Path | None = None) -> None:
    server = UIServer("/fake.sock", allow_apply=allow_apply,
                      **({"static_dir": static} if static else {}))
    server.client = fake  # type: ignore[assignment]
    monkeypatch.setattr(whatif_cli, "client", lambda args: fake)

    async def run() -> None:
        async with TestClient(TestServer(server.app())) as client:
            await test(client)

    asyncio.run(run())


def test_server_map_edge_validate_and_read_only(monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    fake = FakeAgent(_now_flows(), [])
    (tmp_path / "index.html").write_text("<div id=app></div>")

    async def test(c: TestClient) -> None:
        r = await c.get("/")
        assert r.status == 200 and "app" in await r.text()
        info = await (await c.get("/api/info")).json()
        assert info == {"allow_apply": False, "socket": "/fake.sock", "datapath": "ebpf",
                        "policy_revision": 3, "endpoints": 3}
        m = await (await c.get("/api/map", params={"window": "600"})).json()
        assert {e["id"] for e in m["edges"]} == {"id:300>id:301", "id:300>id:2"}
        e = await (await c.get("/api/edge", params={"source": "id:300", "target": "id:301"})).json()
        assert len(e["flows"]) == 3
        assert (await c.get("/api/edge", params={"source": "id:300"})).status == 400
        assert (await c.get("/api/map", params={"window": "-1"})).status == 400
        v = await (await c.post("/api/validate", json={"yaml": NP_OK.replace("80", "99999")})).json()
        assert not v["valid"] and v["problems"][0]["field"] == "spec.ingress[0].ports[0].port"
        # read-only: apply refused, nothing sent to the agent
        r = await c.post("/api/apply", json={"yaml": NP_OK})
        assert r.status == 403 and "--allow-apply" in (await r.json())["error"]
        assert fake.posted == []
        # the same-origin guard: another origin, or a POST that is not JSON
        r = await c.post("/api/validate", json={"yaml": NP_OK},
                         headers={"Origin": "http://evil.example"})
        assert r.status == 403
        r = await c.post("/api/validate", data="yaml=x",
                         headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert r.status == 415
        assert (await c.post("/api/validate", json=["x"])).status == 400

    _serve(fake, False, monkeypatch, test, tmp_path)


DENY = """apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny, namespace: shop}
spec: {podSelector: {}, policyTypes: [Ingress, Egress]}
"""


def test_server_whatif_recommend_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    staged = {"kind": "NetworkPolicy", "namespace": "shop", "name": "default-deny",
              "document": yaml.safe_load(DENY.replace(
                  "namespace: shop}", "namespace: shop, annotations: "
                  "{policy.axoneme.io/mode: audit}}"))}
    fake = FakeAgent(_now_flows(), [staged])

    async def test(c: TestClient) -> None:
        live = (await (await c.get("/api/policies")).json())["policies"]
        assert [(p["name"], yaml.safe_load(p["yaml"])) for p in live] == [
            ("default-deny", staged["document"])]
        d = await (await c.post("/api/whatif", json={"yaml": DENY, "window": 600})).json()
        # the default deny would drop the observed client -> web:80 (policy diff's result)
        flips = {(f["from"], f["to"], f["port"], f["change"]) for f in d["flows"]["flips"]}
        assert ("shop/client", "shop/web-1", 80, "would drop") in flips, d["flows"]
        # the draft replaces the staged policy of the same name: enforced in the candidate
        assert d["candidate"]["replaced"] == [{"kind": "NetworkPolicy", "namespace": "shop",
                                               "name": "default-deny"}]
        r = await c.post("/api/whatif", json={"yaml": NP_OK.replace("80", "99999")})
        assert r.status == 422 and (await r.json())["problems"][0]["field"].endswith("port")
        rec = await (await c.get("/api/recommend", params={"window": "600"})).json()
        names = {d["name"] for d in rec["drafts"]}
        assert names == {"recommend-client", "recommend-web"}, rec
        assert all(check_text(d["yaml"]).problems == [] for d in rec["drafts"])
        assert (await c.get("/api/recommend", params={"kind": "x"})).status == 400
        # --allow-apply: the drafts go to the agent as `policy apply` sends them
        r = await c.post("/api/apply", json={"yaml": DENY})
        assert r.status == 200 and (await r.json())["revision"] == 4
        (path, body), = fake.posted
        assert path == "/v1/policies" and body["documents"][0]["obj"]["metadata"]["name"] == \
            "default-deny"

    _serve(fake, True, monkeypatch, test)


@pytest.mark.parametrize("text,want", [
    ("127.0.0.1:12000", ("127.0.0.1", 12000, True)),
    ("localhost:0", ("localhost", 0, True)),
    ("[::1]:8080", ("::1", 8080, True)),
    ("0.0.0.0:12000", ("0.0.0.0", 12000, False)),
    ("192.0.2.7:80", ("192.0.2.7", 80, False)),
])
def test_parse_listen(text: str, want: tuple[str, int, bool]) -> None:
    assert parse_listen(text) == want


@pytest.mark.parametrize("text,message", [
    ("12000", "expected HOST:PORT"), ("127.0.0.1:http", "port must be a number"),
    ("127.0.0.1:70000", "port must be 0-65535"), ("example.com:80", "IP address or localhost"),
])
def test_bad_listen_exit_2_naming_the_flag(text: str, message: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UsageError, match=message):
        parse_listen(text)
    assert main(["ui", "--listen", text]) == 2
    err = capsys.readouterr().err
    assert message in err and "(--listen)" in err


def test_missing_bundle_is_named(tmp_path: Path) -> None:
    problem = bundle_problem(tmp_path)
    assert problem is not None and "scripts/bootstrap" in problem and str(tmp_path) in problem
    (tmp_path / "index.html").write_text("x")
    assert bundle_problem(tmp_path) is None


def _no_bundle_check(monkeypatch: pytest.MonkeyPatch) -> None:
    import axoneme.agent.ui as ui_pkg

    monkeypatch.setattr(ui_pkg, "bundle_problem", lambda static_dir=None: None)


def test_non_loopback_listen_is_warned(monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    import axoneme.agent.ui._server as server_mod

    _no_bundle_check(monkeypatch)
    seen: list[tuple[str, int]] = []

    async def fake_serve(server: UIServer, host: str, port: int, started: Any) -> None:
        seen.append((host, port))
        started(host, 12345)

    monkeypatch.setattr(server_mod, "serve", fake_serve)
    assert main(["ui", "--listen", "0.0.0.0:12000", "--api-socket", "/x.sock"]) == 0
    out, err = capsys.readouterr()
    assert seen == [("0.0.0.0", 12000)]
    assert err.startswith("warning: serving the UI on 0.0.0.0, not loopback") and "(--listen)" in err
    assert "can apply" not in err  # read-only
    assert out == "axoneme ui: serving http://0.0.0.0:12345/ (read-only; agent /x.sock)\n"
    assert main(["ui", "--api-socket", "/x.sock", "--allow-apply"]) == 0
    out, err = capsys.readouterr()
    assert seen[-1] == ("127.0.0.1", 12000) and err == ""  # the default: loopback, no warning
    assert "(policies can be applied;" in out


def test_port_in_use_exit_1_naming_the_flag(monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    _no_bundle_check(monkeypatch)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["ui", "--listen", f"127.0.0.1:{port}", "--api-socket", "/x.sock"]) == 1
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "(--listen)" in err
