"""axoneme-cni executed exactly as a runtime runs it (env + stdin), against a fake agent."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from axoneme.cni.plugin import CNIError, parse_cni_args
from axoneme.testing.cni import KINDS, build_native_without_fallback, plugin_executable

PLUGIN = str(Path(sys.executable).parent / "axoneme-cni")
NETNS = "/proc/self/ns/net"  # exists everywhere; the fake agent never touches it
_in_use = [PLUGIN]


@pytest.fixture(autouse=True, params=KINDS)
def plugin(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test runs against both: the executable run_plugin() runs: the Python plugin, or the native one
    (which answers plain ADD/DEL itself and hands the rest to the Python one)."""
    exe = plugin_executable(request.param)
    _in_use[0] = exe
    yield exe
    _in_use[0] = PLUGIN


class _UnixHTTPServer(HTTPServer):
    address_family = socket.AF_UNIX

    def server_bind(self) -> None:
        self.socket.bind(self.server_address)

    def get_request(self):  # type: ignore[no-untyped-def]
        conn, _ = self.socket.accept()
        return conn, ("local", 0)


class FakeAgent:
    """Records requests; answers with canned responses per path."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.responses: dict[str, tuple[int, dict[str, Any]]] = {}
        agent = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else {}
                agent.requests.append((self.path, body))
                status, payload = agent.responses.get(self.path, (200, {}))
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = _answer
            do_POST = _answer

        self.server = _UnixHTTPServer(path, Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_agent() -> Iterator[FakeAgent]:
    d = tempfile.mkdtemp(prefix="axcni-")
    agent = FakeAgent(os.path.join(d, "agent.sock"))
    try:
        yield agent
    finally:
        agent.close()
        os.unlink(agent.path)
        os.rmdir(d)


def run_plugin(command: str, config: Any, env: dict[str, str] | None = None,
               raw: str | None = None) -> tuple[int, Any]:
    full = {"CNI_COMMAND": command, "CNI_PATH": os.path.dirname(PLUGIN), "PATH": "/usr/bin:/bin"}
    full.update(env or {})
    stdin = raw if raw is not None else json.dumps(config)
    res = subprocess.run([_in_use[0]], input=stdin, capture_output=True, text=True, env=full,
                         timeout=60)
    out = json.loads(res.stdout) if res.stdout.strip() else None
    return res.returncode, out


def conf(sock: str, version: str = "1.0.0", **extra: Any) -> dict[str, Any]:
    return {"cniVersion": version, "name": "axnet", "type": "axoneme-cni", "agentSocket": sock,
            **extra}


def add_env(cid: str = "c" * 64, args: str = "") -> dict[str, str]:
    return {"CNI_CONTAINERID": cid, "CNI_NETNS": NETNS, "CNI_IFNAME": "eth0", "CNI_ARGS": args}


def test_parse_cni_args_any_order() -> None:
    a = parse_cni_args("K8S_POD_NAME=web;IgnoreUnknown=1;K8S_POD_NAMESPACE=prod;"
                       "K8S_POD_INFRA_CONTAINER_ID=abc")
    b = parse_cni_args("IgnoreUnknown=1;K8S_POD_NAMESPACE=prod;K8S_POD_NAME=web")
    assert a["K8S_POD_NAME"] == b["K8S_POD_NAME"] == "web"
    assert a["K8S_POD_NAMESPACE"] == b["K8S_POD_NAMESPACE"] == "prod"
    assert parse_cni_args("") == {}
    with pytest.raises(CNIError) as e:
        parse_cni_args("novalue")
    assert e.value.code == 4


@pytest.mark.parametrize("version", ["1.0.0", "1.1.0"])
def test_version(version: str) -> None:
    code, out = run_plugin("VERSION", {"cniVersion": version})
    assert code == 0
    assert out["cniVersion"] == version
    assert "1.0.0" in out["supportedVersions"] and "1.1.0" in out["supportedVersions"]
    # podman probes VERSION with a dummy config
    code, out = run_plugin("VERSION", None, raw="")
    assert code == 0 and out["supportedVersions"]


@pytest.mark.parametrize("command", ["ADD", "DEL", "CHECK", "STATUS", "GC"])
def test_wrong_cni_version_is_code_1(command: str, fake_agent: FakeAgent) -> None:
    code, out = run_plugin(command, conf(fake_agent.path, "0.2.0"), add_env())
    assert code != 0
    assert out["code"] == 1
    assert "0.2.0" in out["details"]
    assert fake_agent.requests == []


def test_invalid_input_codes(fake_agent: FakeAgent) -> None:
    code, out = run_plugin("ADD", None, add_env(), raw="{not json")
    assert code != 0 and out["code"] == 6
    code, out = run_plugin("ADD", conf(fake_agent.path), {"CNI_NETNS": NETNS, "CNI_IFNAME": "eth0"})
    assert code != 0 and out["code"] == 4 and "CNI_CONTAINERID" in out["details"]
    code, out = run_plugin("ADD", conf(fake_agent.path), {**add_env(), "CNI_NETNS": "/no/such/ns"})
    assert code != 0 and out["code"] == 4 and "/no/such/ns" in out["details"]
    code, out = run_plugin("FROB", conf(fake_agent.path), add_env())
    assert code != 0 and out["code"] == 4
    bad = conf(fake_agent.path)
    del bad["name"]
    code, out = run_plugin("ADD", bad, add_env())
    assert code != 0 and out["code"] == 7
    code, out = run_plugin("ADD", conf(fake_agent.path, mtu="big"), add_env())
    assert code != 0 and out["code"] == 7
    assert fake_agent.requests == []


def test_agent_unreachable_is_try_again_later(tmp_path: Path) -> None:
    sock = str(tmp_path / "missing.sock")
    for command in ("ADD", "DEL"):
        code, out = run_plugin(command, conf(sock), add_env())
        assert code != 0
        assert out["code"] == 11, out
        assert sock in out["details"]
        assert out["cniVersion"] == "1.0.0"
    code, out = run_plugin("STATUS", conf(sock, "1.1.0"), {})
    assert code != 0 and out["code"] == 50


def test_add_sends_pod_identity_and_prints_result(fake_agent: FakeAgent) -> None:
    fake_agent.responses["/v1/cni/add"] = (200, {
        "interfaces": [{"name": "lxcabc", "mac": "aa:bb:cc:dd:ee:ff"},
                       {"name": "eth0", "mac": "11:22:33:44:55:66", "sandbox": NETNS}],
        "ips": [{"address": "10.244.0.5/32", "gateway": "169.254.1.1", "interface": 1}],
        "routes": [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}],
        "dns": {"nameservers": ["198.51.100.53"]}, "endpoint_id": 3})
    args = "K8S_POD_NAME=web;IgnoreUnknown=1;K8S_POD_UID=u;K8S_POD_NAMESPACE=prod"
    code, out = run_plugin("ADD", conf(fake_agent.path, "1.1.0"), add_env("d" * 64, args))
    assert code == 0, out
    assert out["cniVersion"] == "1.1.0"
    assert out["ips"][0]["address"] == "10.244.0.5/32"
    assert out["interfaces"][1]["sandbox"] == NETNS
    assert "endpoint_id" not in out  # only spec fields in the result
    path, body = fake_agent.requests[-1]
    assert path == "/v1/cni/add"
    assert body["namespace"] == "prod" and body["pod_name"] == "web"
    assert body["container_id"] == "d" * 64 and body["network"] == "axnet"


def test_agent_conflict_and_refusal_codes(fake_agent: FakeAgent) -> None:
    fake_agent.responses["/v1/cni/add"] = (409, {"error": "container already has an endpoint"})
    code, out = run_plugin("ADD", conf(fake_agent.path), add_env())
    assert code != 0 and out["code"] == 4
    assert "already has an endpoint" in out["details"]
    fake_agent.responses["/v1/cni/add"] = (500, {"error": "pod CIDR exhausted"})
    code, out = run_plugin("ADD", conf(fake_agent.path), add_env())
    assert code != 0 and out["code"] >= 100 and "exhausted" in out["details"]


def test_del_without_netns_and_gc(fake_agent: FakeAgent) -> None:
    fake_agent.responses["/v1/cni/del"] = (200, {"deleted": False})
    code, out = run_plugin("DEL", conf(fake_agent.path), {"CNI_CONTAINERID": "e" * 64,
                                                          "CNI_NETNS": "", "CNI_IFNAME": "eth0"})
    assert code == 0 and out is None
    assert fake_agent.requests[-1][1]["container_id"] == "e" * 64
    valid = [{"containerID": "f" * 64, "ifname": "eth0"}]
    code, out = run_plugin("GC", conf(fake_agent.path, "1.1.0", **{"cni.dev/valid-attachments": valid}), {})
    assert code == 0
    path, body = fake_agent.requests[-1]
    assert path == "/v1/cni/gc" and body["valid_attachments"] == valid and body["network"] == "axnet"
    code, out = run_plugin("STATUS", conf(fake_agent.path, "1.1.0"), {})
    assert code == 0
    assert fake_agent.requests[-1][0] == "/v1/healthz"


def test_check_compares_prev_result(fake_agent: FakeAgent) -> None:
    fake_agent.responses["/v1/cni/check"] = (200, {"ips": [{"address": "10.244.0.5/32"}]})
    prev = {"cniVersion": "1.0.0", "ips": [{"address": "10.244.0.5/32"}]}
    code, _ = run_plugin("CHECK", conf(fake_agent.path, prevResult=prev), add_env())
    assert code == 0
    prev["ips"] = [{"address": "10.244.0.9/32"}]
    code, out = run_plugin("CHECK", conf(fake_agent.path, prevResult=prev), add_env())
    assert code != 0 and "10.244.0.9/32" in out["details"]
    fake_agent.responses["/v1/cni/check"] = (404, {"error": "container has no endpoint"})
    code, out = run_plugin("CHECK", conf(fake_agent.path, prevResult=prev), add_env())
    assert code != 0 and out["code"] == 3


@pytest.mark.parametrize(("var", "value", "args"), [
    ("K8S_POD_NAMESPACE", "", "K8S_POD_NAMESPACE=Prod;K8S_POD_NAME=web"),
    ("K8S_POD_NAMESPACE", "", "K8S_POD_NAMESPACE=a/b;K8S_POD_NAME=web"),
    ("K8S_POD_NAMESPACE", "", "K8S_POD_NAMESPACE=" + "n" * 64 + ";K8S_POD_NAME=web"),
    ("K8S_POD_NAME", "", "K8S_POD_NAMESPACE=prod;K8S_POD_NAME=web\x01x"),
    ("K8S_POD_NAME", "", "K8S_POD_NAMESPACE=prod;K8S_POD_NAME=../../etc"),
    ("K8S_POD_NAME", "", "K8S_POD_NAMESPACE=prod;K8S_POD_NAME=" + "p" * 254),
    ("K8S_POD_NAME", "", "K8S_POD_NAMESPACE=prod;K8S_POD_NAME=wéb"),
    ("CNI_CONTAINERID", "-abc", ""),
    ("CNI_CONTAINERID", "abc/def", ""),
    ("CNI_IFNAME", "eth0/x", ""),
    ("CNI_IFNAME", "a" * 16, ""),
    ("CNI_IFNAME", "..", ""),
])
def test_add_refuses_names_kubernetes_and_the_spec_refuse(
        fake_agent: FakeAgent, var: str, value: str, args: str) -> None:
    """CNI_ARGS names are Kubernetes names; container id and ifname as the CNI spec says."""
    env = add_env(args=args)
    if value:
        env[var] = value
    code, out = run_plugin("ADD", conf(fake_agent.path), env)
    assert code != 0 and out["code"] == 4, out
    assert var in out["details"]
    assert len(out["details"]) < 400  # a hostile value is cut in the message
    assert fake_agent.requests == []


def test_add_accepts_kubernetes_names(fake_agent: FakeAgent) -> None:
    fake_agent.responses["/v1/cni/add"] = (200, {"ips": []})
    args = "K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns-5d78c9869d-x2x7q.v1"
    code, out = run_plugin("ADD", conf(fake_agent.path), add_env("Abc_1.2-3", args))
    assert code == 0, out
    assert fake_agent.requests[-1][1]["pod_name"] == "coredns-5d78c9869d-x2x7q.v1"


def test_add_accepts_a_container_runtimes_container_name(fake_agent: FakeAgent) -> None:
    """podman sends only K8S_POD_NAME, holding its container's name, which may
    have '_' and upper case (``elastic_meninsky``); the earlier Kubernetes-only
    check refused every podman container."""
    fake_agent.responses["/v1/cni/add"] = (200, {"ips": []})
    code, out = run_plugin("ADD", conf(fake_agent.path),
                           add_env("c0ffee", "IgnoreUnknown=1;K8S_POD_NAME=elastic_Meninsky.2"))
    assert code == 0, out
    assert fake_agent.requests[-1][1]["pod_name"] == "elastic_Meninsky.2"
    assert fake_agent.requests[-1][1]["namespace"] == "default"


@pytest.mark.parametrize("plugin", ["native"], indirect=True)
def test_native_answers_plain_add_and_del_and_hands_over_the_rest(
        fake_agent: FakeAgent, plugin: str, tmp_path: Path) -> None:
    """The native plugin answers a plainly valid ADD/DEL with one agent request
    and no Python start-up; anything else (other commands, input it does not
    accept outright, an agent it cannot connect to) goes, stdin included, to
    the Python plugin, which stays the one definition of the error cases."""
    marker = tmp_path / "handed-over"
    stand_in = tmp_path / "python-plugin"
    stand_in.write_text(f"#!/bin/sh\ncat > {marker}\necho '{{}}'\n")
    stand_in.chmod(0o755)
    fake_agent.responses["/v1/cni/add"] = (200, {"ips": [{"address": "10.244.0.7/32"}],
                                                 "endpoint_id": 9})
    env = {"AXONEME_CNI_FALLBACK": str(stand_in)}
    args = "IgnoreUnknown=1;K8S_POD_NAMESPACE=prod;K8S_POD_NAME=web-1"
    code, out = run_plugin("ADD", conf(fake_agent.path, "1.1.0"), {**add_env("a" * 64, args), **env})
    assert code == 0 and not marker.exists()
    assert out == {"cniVersion": "1.1.0", "interfaces": [], "ips": [{"address": "10.244.0.7/32"}],
                   "routes": [], "dns": {}}
    assert fake_agent.requests[-1] == ("/v1/cni/add", {
        "container_id": "a" * 64, "netns": NETNS, "ifname": "eth0", "network": "axnet",
        "cni_version": "1.1.0", "namespace": "prod", "pod_name": "web-1"})
    code, out = run_plugin("DEL", conf(fake_agent.path), {"CNI_CONTAINERID": "a" * 64, **env})
    assert code == 0 and out is None and not marker.exists()
    assert fake_agent.requests[-1] == ("/v1/cni/del", {
        "container_id": "a" * 64, "netns": "", "ifname": "eth0", "network": "axnet"})
    # the agent's refusal is mapped here too (the request is never sent twice)
    fake_agent.responses["/v1/cni/add"] = (503, {"error": "pod not in the cache yet"})
    n = len(fake_agent.requests)
    code, out = run_plugin("ADD", conf(fake_agent.path), {**add_env(), **env})
    assert code == 1 and out["code"] == 11 and out["details"] == "pod not in the cache yet"
    assert len(fake_agent.requests) == n + 1 and not marker.exists()
    handed = [
        ("CHECK", conf(fake_agent.path, prevResult={}), add_env()),
        ("VERSION", conf(fake_agent.path), {}),
        ("ADD", conf(fake_agent.path, "0.4.0"), add_env()),
        ("ADD", conf(fake_agent.path, mtu=1500.0), add_env()),
        ("ADD", conf(fake_agent.path), add_env(args="K8S_POD_NAME= web")),
        ("ADD", conf(fake_agent.path), {**add_env(), "CNI_IFNAME": "é0"}),
        ("DEL", conf(str(tmp_path / "nobody.sock")), add_env()),
    ]
    for command, config, extra in handed:
        n = len(fake_agent.requests)
        code, out = run_plugin(command, config, {**extra, **env})
        assert code == 0 and out == {}, (command, config, extra)
        assert json.loads(marker.read_text()) == config  # stdin given again, as it came
        assert len(fake_agent.requests) == n  # nothing sent before handing over
        marker.unlink()


@pytest.mark.parametrize("plugin", ["native"], indirect=True)
def test_native_without_a_compiled_in_fallback_runs_the_python_plugin_beside_it(
        fake_agent: FakeAgent, plugin: str, tmp_path: Path) -> None:
    """As the agent's image builds it (main.fallback empty) and installs it on a node: the
    native plugin hands over to axoneme-cni-python in its own directory; AXONEME_CNI_FALLBACK
    still overrides; a plain ADD is still answered without it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    native = build_native_without_fallback(str(Path(__file__).parents[1] / "native"),
                                           str(bin_dir / "axoneme-cni"))
    sibling, other = bin_dir / "axoneme-cni-python", tmp_path / "other-plugin"
    for stand_in in (sibling, other):
        stand_in.write_text(f"#!/bin/sh\ncat > {stand_in}.stdin\necho '{{\"by\": \"{stand_in.name}\"}}'\n")
        stand_in.chmod(0o755)
    config = conf(fake_agent.path)
    _in_use[0] = native
    code, out = run_plugin("VERSION", config)
    assert (code, out) == (0, {"by": "axoneme-cni-python"})
    assert json.loads(Path(f"{sibling}.stdin").read_text()) == config  # stdin handed over as it came
    code, out = run_plugin("VERSION", config, {"AXONEME_CNI_FALLBACK": str(other)})
    assert (code, out) == (0, {"by": "other-plugin"})
    fake_agent.responses["/v1/cni/add"] = (200, {"ips": [{"address": "10.244.0.9/32"}]})
    Path(f"{sibling}.stdin").unlink()
    code, out = run_plugin("ADD", config, add_env())
    assert code == 0 and out["ips"] == [{"address": "10.244.0.9/32"}]
    assert fake_agent.requests[-1][0] == "/v1/cni/add" and not Path(f"{sibling}.stdin").exists()
    # no plugin beside it: a CNI error naming the path, not a hang or a crash
    sibling.unlink()
    code, out = run_plugin("VERSION", config)
    assert code == 1 and out["msg"] == "cannot run the plugin" and str(sibling) in out["details"]
