"""Kubernetes mode, unit level (no API server: scripted list/watch answers).

The real thing is tested against a real control plane in tests/k8s/."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from axoneme.agent import _k8sinformer
from axoneme.agent._cniinstall import build_zipapp, plugin_modules
from axoneme.agent._config import AgentConfig
from axoneme.agent._errors import TryAgain
from axoneme.agent._k8s import KubernetesSource, pod_meta, policy_document
from axoneme.agent._k8sclient import api_client
from axoneme.agent._k8sinformer import Informer
from axoneme.core.endpoint import NamedPort
from axoneme.core.errors import AxonemeError, ConfigError

# -- the informer --------------------------------------------------------------------------------

def obj(name: str, rv: str, ns: str = "n") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": ns, "resourceVersion": rv}}


class ListResp:
    def __init__(self, items: list[dict[str, Any]], rv: str) -> None:
        self.data = json.dumps({"kind": "PodList", "apiVersion": "v1",
                                "metadata": {"resourceVersion": rv}, "items": items}).encode()


class WatchResp:
    def __init__(self, events: list[dict[str, Any]]) -> None:
        self.lines = [json.dumps(e).encode() + b"\n" for e in events]

    def stream(self, amt: Any = None, decode_content: bool = False) -> Iterator[bytes]:
        yield from self.lines

    def close(self) -> None:
        pass

    def release_conn(self) -> None:
        pass


class ApiError(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.reason = "scripted"


class Script:
    """A lister answering list and watch calls from a script; stops the
    informer when the script is used up."""

    def __init__(self, stop: threading.Event, answers: list[Any]) -> None:
        self.stop = stop
        self.answers = answers
        self.calls: list[dict[str, Any]] = []

    def __call__(self, **kwargs: Any) -> Any:
        self.calls.append(kwargs)
        if not self.answers:
            self.stop.set()
            raise ApiError(500)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def run_informer(answers: list[Any], optional: bool = False) -> tuple[Informer, Script, list[Any]]:
    stop = threading.Event()
    script = Script(stop, answers)
    delivered: list[Any] = []

    def deliver(events: Any, initial: bool) -> None:
        delivered.append((initial, [(k, o["metadata"]["name"], o["metadata"]["resourceVersion"])
                                    for k, o in events]))

    inf = Informer("pods", script, deliver, stop, optional=optional)
    inf.run()
    return inf, script, delivered


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_k8sinformer, "BACKOFF_FIRST", 0.001)
    monkeypatch.setattr(_k8sinformer, "BACKOFF_CAP", 0.002)


def test_list_watch_bookmark_410_relist_delivers_each_change_once() -> None:
    inf, script, delivered = run_informer([
        ListResp([obj("a", "1"), obj("b", "1")], "10"),
        WatchResp([{"type": "ADDED", "object": obj("a", "1")},  # already listed: not again
                   {"type": "MODIFIED", "object": obj("b", "11")},
                   {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "12"}}}]),
        WatchResp([{"type": "ERROR", "object": {"code": 410, "reason": "Expired"}}]),
        ListResp([obj("a", "1"), obj("c", "13")], "14"),  # b deleted while we were away
    ])
    assert delivered == [
        (True, [("ADDED", "a", "1"), ("ADDED", "b", "1")]),
        (False, [("MODIFIED", "b", "11")]),
        (False, [("ADDED", "c", "13"), ("DELETED", "b", "11")]),
    ]
    # the second watch resumed from the bookmark; the first watch from the list
    watches = [c for c in script.calls if c.get("watch")]
    assert [c["resource_version"] for c in watches[:2]] == ["10", "12"]
    assert all(c["allow_watch_bookmarks"] for c in watches)
    assert inf.synced.is_set() and set(inf.cache) == {"n/a", "n/c"}


def test_errors_back_off_and_resume_the_watch_without_relisting() -> None:
    inf, script, delivered = run_informer([
        ListResp([obj("a", "1")], "5"),
        ConnectionResetError("connection reset by peer"),  # the API server went away
        ApiError(503),
        WatchResp([{"type": "DELETED", "object": obj("a", "6")},
                   {"type": "DELETED", "object": obj("a", "6")}]),  # twice: applied once
    ])
    assert delivered == [(True, [("ADDED", "a", "1")]), (False, [("DELETED", "a", "6")])]
    assert sum(1 for c in script.calls if not c.get("watch")) == 1  # listed once
    assert [c["resource_version"] for c in script.calls if c.get("watch")][:3] == ["5", "5", "5"]
    assert inf.stats.errors >= 2


def test_http_410_on_the_watch_request_relists() -> None:
    _, script, delivered = run_informer([
        ListResp([obj("a", "1")], "5"), ApiError(410), ListResp([obj("a", "2")], "7")])
    assert delivered == [(True, [("ADDED", "a", "1")]), (False, [("MODIFIED", "a", "2")])]


def test_optional_resource_missing_is_synced_empty() -> None:
    inf, _, delivered = run_informer([ApiError(404)], optional=True)
    assert delivered == [(True, [])]
    assert inf.synced.is_set() and inf.missing and inf.view()["count"] == 0


def test_a_required_resource_is_not_synced_until_listed() -> None:
    inf, _, delivered = run_informer([ApiError(403), ApiError(403)])
    assert delivered == [] and not inf.synced.is_set()
    assert "403" in inf.stats.last_error


# -- objects -> what the agent uses -------------------------------------------------------------

def test_policy_document_keeps_what_the_author_wrote() -> None:
    doc = policy_document({
        "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "p", "namespace": "n", "resourceVersion": "9", "uid": "u",
                     "generation": 2, "managedFields": [{}], "labels": {"a": "b"},
                     "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"}},
        "spec": {"endpointSelector": {}}, "status": {"nodes": {}}})
    assert doc == {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
                   "metadata": {"name": "p", "namespace": "n", "labels": {"a": "b"}},
                   "spec": {"endpointSelector": {}}}


def test_pod_meta_reads_labels_service_account_named_ports_node_and_ips() -> None:
    meta = pod_meta({
        "metadata": {"name": "w", "namespace": "n", "labels": {"app": "web"}, "uid": "u1"},
        "spec": {"nodeName": "n1", "serviceAccountName": "sa", "containers": [
            {"name": "c", "ports": [{"name": "http", "containerPort": 80},
                                    {"containerPort": 81},
                                    {"name": "dns", "containerPort": 53, "protocol": "UDP"}]}]},
        "status": {"podIP": "10.0.0.5", "podIPs": [{"ip": "10.0.0.5"}]}})
    assert dict(meta.pod.labels) == {"app": "web"} and meta.pod.service_account == "sa"
    assert meta.pod.ports == (NamedPort("http", 80, "TCP"), NamedPort("dns", 53, "UDP"))
    assert meta.node == "n1" and meta.pod.ips == ("10.0.0.5",) and not meta.host_network
    bare = pod_meta({"metadata": {"name": "x", "namespace": "n"}, "spec": {"hostNetwork": True}})
    assert bare.pod.service_account == "default" and bare.pod.ips == () and bare.host_network


# -- policies, status reports, CNI waits (fake services) ----------------------------------------

class FakeEngine:
    def __init__(self) -> None:
        self.policies: dict[Any, Any] = {}

    def get_policy(self, ref: Any) -> Any:
        return self.policies.get(ref)


class FakePolicies:
    def __init__(self) -> None:
        self.engine = FakeEngine()
        self.revision = 0
        self.calls: list[tuple[list[str], list[str]]] = []

    async def upsert(self, parsed: Any, source: str, remove_refs: Any = ()) -> dict[str, Any]:
        assert source == "k8s"
        for ref in remove_refs:
            self.engine.policies.pop(ref, None)
        for pol, _ in parsed:
            self.engine.policies[pol.ref] = pol
        self.revision += len(parsed) + len(remove_refs)
        self.calls.append(([p.ref.name for p, _ in parsed], [r.name for r in remove_refs]))
        return {}


class Reports:
    def __init__(self) -> None:
        self.items: list[Any] = []

    def submit(self, r: Any) -> None:
        self.items.append(r)


def source(wait: float = 0.2) -> tuple[KubernetesSource, FakePolicies, Reports]:
    pols = FakePolicies()
    src = KubernetesSource(AgentConfig(k8s_kubeconfig="x", k8s_node_name="n1",
                                       k8s_pod_wait=wait), None, None, pols)  # type: ignore[arg-type]
    reports = Reports()
    src.status_writer = reports  # type: ignore[assignment]
    return src, pols, reports


def cnp_obj(name: str, port: str, rv: str, status: Any = None, gen: int = 1) -> dict[str, Any]:
    o = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
         "metadata": {"name": name, "namespace": "n", "resourceVersion": rv, "generation": gen,
                      "uid": f"uid-{name}"},
         "spec": {"endpointSelector": {"matchLabels": {"app": "web"}},
                  "ingress": [{"toPorts": [{"ports": [{"port": port, "protocol": "TCP"}]}]}]}}
    if status is not None:
        o["status"] = status
    return o


def test_refused_policy_reports_field_path_and_never_blocks_the_others() -> None:
    src, pols, reports = source()

    async def go() -> None:
        await src._on_policies("cnps", [("ADDED", cnp_obj("good", "80", "1")),
                                        ("ADDED", cnp_obj("bad", "99999", "1"))], True)
        # our own status write comes back as MODIFIED: nothing is applied again
        await src._on_policies("cnps", [("MODIFIED", cnp_obj("good", "80", "2",
                                                             status={"nodes": {}}))], False)
        await src._on_policies("cnps", [("DELETED", cnp_obj("bad", "99999", "3"))], False)

    asyncio.run(go())
    assert pols.calls == [(["good"], []), ([], ["bad"])]
    by_name = {r.name: r for r in reports.items}
    assert by_name["good"].ok and by_name["good"].enforcing and not by_name["good"].error
    bad = by_name["bad"]
    assert not bad.ok and not bad.enforcing and "spec.ingress[0].toPorts[0].ports[0].port" in bad.error
    assert not src.refused  # deleted: forgotten


def test_a_restarted_agent_does_not_rewrite_a_status_that_is_already_right() -> None:
    src, pols, reports = source()
    status = {"nodes": {"n1": {"ok": True, "error": ""}},
              "conditions": [{"type": "Valid", "observedGeneration": 3}]}
    asyncio.run(src._on_policies("cnps", [("ADDED", cnp_obj("p", "80", "1", status, gen=3))],
                                 True))
    assert pols.calls == [(["p"], [])] and reports.items == []
    # a new generation is reported
    asyncio.run(src._on_policies("cnps", [("MODIFIED", cnp_obj("p", "81", "2", status, gen=4))],
                                 False))
    assert [r.generation for r in reports.items] == [4]


def test_cni_add_waits_for_the_pod_then_tries_again_later() -> None:
    src, _, _ = source(wait=0.2)

    class NoEndpoints:
        async def relabel(self, which: Any) -> None:
            raise AssertionError("no relabel for a new pod")

    src.endpoints = NoEndpoints()  # type: ignore[assignment]
    src.store = SimpleNamespace(endpoints={})  # type: ignore[assignment]
    pod = {"metadata": {"name": "w", "namespace": "n", "labels": {"app": "web"}}, "spec": {}}
    ns = {"metadata": {"name": "n", "labels": {"team": "a"}}}

    async def go() -> None:
        src._changed = asyncio.Condition()
        with pytest.raises(TryAgain, match="n/w"):
            await src.wait_for_pod("n", "w")  # no API to GET from: try again later
        waiter = asyncio.create_task(src.wait_for_pod("n", "w"))
        await asyncio.sleep(0.01)
        await src._on_namespaces("namespaces", [("ADDED", ns)], True)
        assert not waiter.done()  # the namespace alone is not enough
        await src._on_pods("pods", [("ADDED", pod)], False)
        await asyncio.wait_for(waiter, 1)

    asyncio.run(go())
    assert src.pod("n", "w").labels == {"app": "web"}  # type: ignore[union-attr]
    assert src.namespace("n").labels["team"] == "a"  # type: ignore[union-attr]


# -- credentials -------------------------------------------------------------------------------

def test_in_cluster_credentials_from_the_service_account_files(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("tok-1")
    (tmp_path / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    api = api_client(AgentConfig(k8s_api_server="https://10.255.254.1:6443"), str(tmp_path))
    cfg = api.configuration
    assert cfg.host == "https://10.255.254.1:6443" and cfg.ssl_ca_cert == str(tmp_path / "ca.crt")
    assert cfg.api_key["BearerToken"] == "bearer tok-1"
    assert cfg.refresh_api_key_hook is not None  # the token is read again when it rotates


def test_bad_credentials_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--k8s-api-server"):
        api_client(AgentConfig(k8s_api_server="http://plain:80"), str(tmp_path))
    with pytest.raises(ConfigError, match="service account"):
        api_client(AgentConfig(k8s_api_server="https://h:6443"), str(tmp_path))
    with pytest.raises(ConfigError, match="--k8s-kubeconfig"):
        api_client(AgentConfig(k8s_kubeconfig=str(tmp_path / "nope")))


# -- the CNI plugin zipapp ----------------------------------------------------------------------

def test_cni_zipapp_is_stdlib_only_and_runs_outside_the_venv(tmp_path: Path) -> None:
    target = tmp_path / "axoneme-cni"
    modules = build_zipapp(str(target))
    assert "axoneme.cni.plugin" in modules and "axoneme.core.apiclient" in modules
    assert target.read_bytes().startswith(b"#!/usr/bin/env python3\n")
    res = subprocess.run([sys.executable, "-I", str(target)], input='{"cniVersion": "1.0.0"}',
                         capture_output=True, text=True, cwd=tmp_path,
                         env={"CNI_COMMAND": "VERSION", "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr
    assert "1.1.0" in json.loads(res.stdout)["supportedVersions"]


def test_cni_zipapp_refuses_a_module_beyond_the_stdlib(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "axk_fake_plugin.py").write_text("import json\nimport yaml\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(AxonemeError, match="imports yaml, which is not in the standard library"):
        plugin_modules("axk_fake_plugin")


# -- flags and config keys ---------------------------------------------------------------------

def test_kubernetes_flags_and_config_keys(tmp_path: Path) -> None:
    from axoneme.agent.cli import UsageError, build_parser
    from axoneme.agent.cli._agentcmds import build_agent_config

    parser, _ = build_parser()
    conf = tmp_path / "agent.yaml"
    conf.write_text("k8s_api_server: https://10.255.254.1:6443\nk8s_node_name: from-file\n"
                    "k8s_pod_wait: 2.5\ncni_conf_dir: /c\ncni_bin_dir: /b\n")
    cfg = build_agent_config(parser.parse_args(
        ["agent", "run", "--config", str(conf), "--k8s-node-name", "n1", "--k8s-kubeconfig",
         "kc", "--cni-bin-dir", "/host/bin"]))
    assert cfg.k8s_mode and cfg.k8s_node_name == "n1" and cfg.k8s_pod_wait == 2.5
    assert cfg.k8s_kubeconfig == str(Path("kc").resolve())
    assert (cfg.cni_conf_dir, cfg.cni_bin_dir) == ("/c", "/host/bin")
    assert not build_agent_config(parser.parse_args(["agent", "run"])).k8s_mode
    conf.write_text("k8s_pod_wait: soon\n")
    with pytest.raises(ConfigError, match="k8s_pod_wait: expected a number"):
        build_agent_config(parser.parse_args(["agent", "run", "--config", str(conf)]))
    conf.write_text("k8s_pod_wait: -1\n")
    with pytest.raises(UsageError, match="k8s_pod_wait"):
        build_agent_config(parser.parse_args(["agent", "run", "--config", str(conf)]))


# -- status --brief (the DaemonSet's startup and readiness probes) -------------------------

def _status(healthy=True, k8s=None, faults=()):
    data = {"datapath": {"name": "ebpf", "healthy": healthy, "detail": "" if healthy else "map gone"},
            "endpoints": 0, "identities": 0, "policy_revision": 1,
            "components": {}, "faults": list(faults)}
    if k8s is not None:
        data["components"]["kubernetes"] = k8s
    return data


def test_status_brief_ready_unless_datapath_or_api_server_is_not():
    from axoneme.agent.cli._agentcmds import not_ready

    synced = {"api_server": "https://10.255.254.1:6443", "connected": True,
              "resources": {"pods": {"synced": True, "count": 3},
                            "networkpolicies": {"synced": True, "count": 0}}}
    assert not_ready(_status()) == []
    assert not_ready(_status(k8s=synced)) == []
    # a refused policy is that policy's fault: the agent stays ready
    assert not_ready(_status(k8s=synced, faults=["policy default/bad refused"])) == []
    assert not_ready(_status(healthy=False)) == ["datapath ebpf unhealthy: map gone"]
    down = dict(synced, connected=False, last_error="connection refused")
    assert not_ready(_status(k8s=down)) == [
        "kubernetes: not connected to https://10.255.254.1:6443: connection refused"]
    partial = dict(synced, resources={"pods": {"synced": False}, "nodes": {"synced": True}})
    assert not_ready(_status(k8s=partial)) == ["kubernetes: not synced: pods"]


def test_status_brief_exit_codes(monkeypatch, capsys):
    import argparse

    from axoneme.agent.cli import _agentcmds

    answers = iter([_status(), _status(healthy=False)])

    class FakeClient:
        def get(self, path):
            assert path == "/v1/status"
            return next(answers)

    monkeypatch.setattr(_agentcmds, "client", lambda args: FakeClient())
    args = argparse.Namespace(brief=True, output="text")
    assert _agentcmds.cmd_status(args) == 0
    assert capsys.readouterr().out == "OK\n"
    assert _agentcmds.cmd_status(args) == 1
    assert capsys.readouterr().out == "datapath ebpf unhealthy: map gone\n"
