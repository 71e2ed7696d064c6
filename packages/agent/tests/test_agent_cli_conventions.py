"""CLI conventions (issue 18): -o table|wide|json|yaml and -l on listings, policy get,
policy trace -o json / --exit-code, help on every flag, examples, shell completion.

The listings run against a fake agent client (unit tier); tests/e2e/test_e2e_cli_conventions.py
drives the same commands against a real agent."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from axoneme.agent.cli import UsageError, build_parser, main
from axoneme.agent.cli._help import EXAMPLES, _commands
from axoneme.agent.cli._output import labels_of, parse_selector

ROOT = Path(__file__).resolve().parents[3]
DEMO = ROOT / "examples" / "demo"
AXONEME = str(Path(sys.executable).parent / "axoneme")


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    try:
        code = main(list(args))
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


# -- label selectors -----------------------------------------------------------------------

WEB = {"app": "web", "tier": "front", "env": "prod"}
DB = {"app": "db", "env": "prod"}
BARE = {"other": "x"}


@pytest.mark.parametrize(("selector", "matching"), [
    ("app=web", {"web"}),
    ("app==web", {"web"}),
    ("app!=web", {"db", "bare"}),  # a missing key satisfies != (Kubernetes)
    ("app in (web,db)", {"web", "db"}),
    ("app in ( web , db )", {"web", "db"}),
    ("app notin (web)", {"db", "bare"}),
    ("tier", {"web"}),
    ("!tier", {"db", "bare"}),
    ("env=prod,!tier", {"db"}),
    ("app in (web,db),env=prod,tier", {"web"}),
    ("k8s:app=web", {"web"}),  # source-qualified key
    ("container:app=web", set()),  # another source: no match
    ("app=", set()),  # empty value: a label app with an empty value
])
def test_selector_matches_as_kubectl(selector: str, matching: set[str]) -> None:
    sel = parse_selector(selector)
    items = {"web": WEB, "db": DB, "bare": BARE}
    assert {n for n, labels in items.items() if sel.matches(labels_of(labels))} == matching


@pytest.mark.parametrize(("selector", "message"), [
    ("app in (web", "unclosed '('"),
    ("app in web)", "unbalanced ')'"),
    ("app in ()", "needs at least one value"),
    ("app=a b", "cannot parse"),
    ("app>3", "cannot parse"),
    ("Bad Key=x", "cannot parse"),
    ("-app=x", "is not a label key"),
    ("app=-x-", "is not a label value"),
    ("app=web,,tier", "empty requirement"),
    ("", "empty label selector"),
])
def test_bad_selector_is_a_clear_usage_error(selector: str, message: str) -> None:
    with pytest.raises(UsageError, match=re.escape(message)):
        parse_selector(selector)


def test_bad_selector_exits_2_before_asking_the_agent(capsys: pytest.CaptureFixture[str],
                                                      tmp_path: Path) -> None:
    # no agent at this socket: the selector is refused first (exit 2, not 1)
    code, out, err = run(capsys, "endpoint", "list", "-l", "app in (web",
                         "--api-socket", str(tmp_path / "none.sock"))
    assert code == 2 and out == ""
    assert "-l/--selector" in err and "unclosed '('" in err and "cannot reach" not in err


def test_labels_of_strings_keep_their_source() -> None:
    labels = labels_of(["k8s:app=web", "reserved:host"])
    assert parse_selector("reserved:host").matches(labels)
    assert parse_selector("host,app=web").matches(labels)
    assert not parse_selector("k8s:host").matches(labels)


# -- listings against a fake agent ---------------------------------------------------------

ENDPOINTS = [
    {"id": 1, "identity": 300, "labels": ["k8s:app=web", "k8s:io.kubernetes.pod.namespace=shop"],
     "ipv4": "10.244.0.2", "policy_enforcement": {"ingress": True, "egress": False},
     "status": "ready", "pod": "shop/web", "host_ifname": "lxc1", "ready_ms": 12},
    {"id": 2, "identity": 301, "labels": ["k8s:app=db", "k8s:io.kubernetes.pod.namespace=shop"],
     "ipv4": "10.244.0.3", "policy_enforcement": {"ingress": False, "egress": False},
     "status": "ready", "pod": "shop/db", "host_ifname": "lxc2", "ready_ms": 9},
]
POLICIES = [
    {"kind": "NetworkPolicy", "namespace": "shop", "name": "web", "revision": 2, "source": "api",
     "rules": 1, "labels": {"team": "a"},
     "document": {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                  "metadata": {"name": "web", "namespace": "shop", "labels": {"team": "a"}},
                  "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"]}}},
    {"kind": "CiliumNetworkPolicy", "namespace": "shop", "name": "web", "revision": 3,
     "source": "api", "rules": 1, "labels": {},
     "document": {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
                  "metadata": {"name": "web", "namespace": "shop"},
                  "spec": {"endpointSelector": {}, "ingress": [{}]}}},
    {"kind": "CiliumClusterwideNetworkPolicy", "namespace": "", "name": "all", "revision": 4,
     "source": "api", "rules": 1, "labels": {"team": "b"},
     "document": {"apiVersion": "cilium.io/v2", "kind": "CiliumClusterwideNetworkPolicy",
                  "metadata": {"name": "all", "labels": {"team": "b"}},
                  "spec": {"endpointSelector": {}, "egress": [{}]}}},
]


STATUS = {"datapath": {"name": "noop", "mode": "", "healthy": True, "detail": ""}, "endpoints": 2,
          "identities": 12, "policy_revision": 4, "components": {}, "faults": []}


class FakeClient:
    def __init__(self, socket: str | None = None, timeout: float | None = None) -> None:
        self.socket = socket

    def get(self, path: str, **query: Any) -> Any:
        if path == "/v1/endpoints":
            return ENDPOINTS
        if path == "/v1/endpoints/1":
            return {**ENDPOINTS[0], "policy": [], "datapath": [], "in_sync": True}
        if path == "/v1/status":
            return STATUS
        if path == "/v1/identities":
            return [{"id": 1, "labels": ["reserved:host"], "reserved": True, "endpoints": 0},
                    {"id": 300, "labels": ENDPOINTS[0]["labels"], "reserved": False, "endpoints": 1}]
        if path == "/v1/policies":
            pols = POLICIES if query.get("documents") else [
                {k: v for k, v in p.items() if k != "document"} for p in POLICIES]
            return {"revision": 4, "policies": pols}
        if path == "/v1/namespaces":
            return [{"name": "shop", "labels": {"env": "prod"}}, {"name": "dev", "labels": {}}]
        if path == "/v1/pods":
            return [{"name": "web", "namespace": "shop", "ip": "10.244.0.2", "labels": {"app": "web"},
                     "status": "Running", "endpoint_id": 1, "identity": 300, "pid": 42,
                     "netns": "axp-web", "service_account": "default", "ports": ["http:80/TCP"]}]
        raise AssertionError(path)


@pytest.fixture
def fake_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("axoneme.agent.cli._agentcmds.AgentClient", FakeClient)


def test_endpoint_list_formats_and_selector(fake_agent: None, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "endpoint", "list", "-o", "json")
    assert code == 0 and json.loads(out) == ENDPOINTS  # the documented shape, untouched
    code, out, _ = run(capsys, "endpoint", "list", "-o", "yaml", "-l", "app=db")
    assert code == 0 and yaml.safe_load(out) == [ENDPOINTS[1]]
    code, out, _ = run(capsys, "endpoint", "list")
    assert out.splitlines()[0].split()[:2] == ["ENDPOINT", "POLICY"] and "POD" not in out
    code, out, _ = run(capsys, "endpoint", "list", "-o", "wide", "-l", "app notin (db)")
    header, _, row = out.splitlines()[:3]
    assert "POD" in header and "INTERFACE" in header
    assert row.split()[0] == "1" and "shop/web" in row and "lxc1" in row and "lxc2" not in out


def test_identity_policy_namespace_pod_lists(fake_agent: None, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "identity", "list", "-l", "!reserved:host", "-o", "json")
    assert [i["id"] for i in json.loads(out)] == [300]
    assert set(json.loads(out)[0]) == {"id", "labels", "reserved", "endpoints"}
    code, out, _ = run(capsys, "identity", "list", "-o", "wide")
    assert "RESERVED" in out.splitlines()[0] and "ENDPOINTS" in out.splitlines()[0]
    code, out, _ = run(capsys, "policy", "list", "-l", "team", "-o", "yaml")
    assert [p["name"] for p in yaml.safe_load(out)] == ["web", "all"]
    code, out, _ = run(capsys, "policy", "list", "-o", "wide")
    assert out.splitlines()[0].split() == ["REVISION", "KIND", "NAMESPACE", "NAME", "SOURCE", "RULES",
                                           "LABELS"] and "team=a" in out
    code, out, _ = run(capsys, "namespace", "list", "-l", "env=prod")
    assert [ln.split()[0] for ln in out.splitlines()] == ["NAME", "shop"]
    code, out, _ = run(capsys, "pod", "list", "-o", "wide", "-l", "app=web")
    assert "PID" in out and "axp-web" in out and "http:80/TCP" in out
    code, out, _ = run(capsys, "pod", "list", "-l", "app=db", "-o", "json")
    assert code == 0 and json.loads(out) == []


def test_policy_get(fake_agent: None, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "policy", "get", "cnp/web", "-n", "shop", "-o", "yaml")
    assert code == 0 and yaml.safe_load(out) == POLICIES[1]["document"]
    code, out, _ = run(capsys, "policy", "get", "all", "-o", "json")  # clusterwide: any -n
    assert json.loads(out) == POLICIES[2]["document"]
    code, out, _ = run(capsys, "policy", "get", "-o", "yaml", "-l", "team")
    doc = yaml.safe_load(out)
    assert doc["kind"] == "List" and doc["items"] == [POLICIES[0]["document"], POLICIES[2]["document"]]
    code, out, _ = run(capsys, "policy", "get", "netpol/web", "-n", "shop")
    assert "NetworkPolicy" in out and "CiliumNetworkPolicy" not in out
    # ambiguous, unknown, bad kind: exit 2 naming it
    code, _, err = run(capsys, "policy", "get", "web", "-n", "shop", "-o", "yaml")
    assert code == 2 and "names 2 policies" in err and "KIND/NAME" in err
    code, _, err = run(capsys, "policy", "get", "web", "-o", "yaml")
    assert code == 2 and "not found in namespace default" in err
    code, _, err = run(capsys, "policy", "get", "pod/web", "-n", "shop")
    assert code == 2 and "expected NAME or KIND/NAME" in err


def test_every_listing_has_the_outputs_and_a_selector() -> None:
    """Every `... list` command (and `policy get`, `plugins`, which list too) takes
    -o table|wide|json|yaml, and every `list` takes -l: a new listing cannot forget them."""
    parser, _ = build_parser()
    listings = {path: sub for path, sub in _commands(parser)
                if path.split()[-1] == "list" or path in ("policy get", "plugins")}
    assert {"endpoint list", "identity list", "policy list", "namespace list",
            "pod list", "policy get", "plugins"} <= set(listings)
    problems = []
    for path, sub in sorted(listings.items()):
        flags = {s: a for a in sub._actions for s in a.option_strings}
        output = flags.get("-o")
        if output is None or not {"table", "wide", "json", "yaml"} <= set(output.choices or ()):
            problems.append(f"axoneme {path}: -o lacks table|wide|json|yaml")
        if path != "plugins" and not {"-l", "--selector"} <= set(flags):
            problems.append(f"axoneme {path}: no -l/--selector")
    assert not problems, "\n".join(problems)


# -- policy trace -o json, --exit-code -----------------------------------------------------

TRACE = ("policy", "trace", "--cluster", str(DEMO / "cluster.yaml"), "-f", str(DEMO / "policies"))


def test_trace_json_carries_what_the_table_shows(capsys: pytest.CaptureFixture[str]) -> None:
    code, table_out, _ = run(capsys, *TRACE, "--from", "y/a", "--to", "x/a", "--port", "80")
    code, out, _ = run(capsys, *TRACE, "--from", "y/a", "--to", "x/a", "--port", "80", "-o", "json")
    assert code == 0
    doc = json.loads(out)
    assert doc["verdict"] == "allowed"
    assert doc["source"]["name"] == "y/a" and doc["destination"]["name"] == "x/a"
    for side in ("source", "destination"):  # identities as the table prints them
        assert f"{doc[side]['name']} (identity {doc[side]['identity']})" in table_out
    assert doc["port"] == 80 and doc["protocol"] == "TCP" and doc["icmp_type"] is None
    assert doc["egress"]["reason"] in table_out and doc["ingress"]["reason"] in table_out
    assert doc["ingress"]["rules"] == ["NetworkPolicy x/a-from-namespace-y spec.ingress[0]"]
    assert doc["ingress"]["rule_refs"] == [{"kind": "NetworkPolicy", "namespace": "x",
                                            "name": "a-from-namespace-y", "path": "spec.ingress[0]",
                                            "deny": False}]


def test_trace_json_default_deny_names_the_policies(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, *TRACE, "--from", "x/b", "--to", "x/a", "--port", "80", "-o", "json")
    assert code == 0  # without --exit-code a denial is still exit 0
    ing = json.loads(out)["ingress"]
    assert ing["verdict"] == "denied" and ing["reason"] == "default deny: no rule allows"
    names = {(p["kind"], p["name"]) for p in ing["default_deny_by"]}
    assert ("NetworkPolicy", "default-deny-ingress") in names
    code, out, _ = run(capsys, *TRACE, "--from", "y/c", "--to", "x/a", "--port", "80", "-o", "json")
    ing = json.loads(out)["ingress"]
    assert ing["verdict"] == "denied" and ing["default_deny_by"] == []
    assert ing["rule_refs"] == [{"kind": "CiliumNetworkPolicy", "namespace": "x", "name": "deny-y-c",
                                 "path": "spec.ingressDeny[0]", "deny": True}]


@pytest.mark.parametrize(("args", "code"), [
    (("--from", "x/b", "--to", "x/a", "--port", "80"), 1),  # DENIED
    (("--from", "y/a", "--to", "x/a", "--port", "80"), 0),  # ALLOWED
    (("--from", "default/app2", "--to", "default/app1", "--port", "80", "--http-method", "GET",
      "--http-path", "/private"), 1),  # denied by L7
    (("--from", "default/app2", "--to", "default/app1", "--port", "80"), 0),  # REDIRECTED
    (("--from", "nope/x", "--to", "x/a", "--port", "80"), 2),  # bad input stays 2
])
def test_trace_exit_code(capsys: pytest.CaptureFixture[str], args: tuple[str, ...], code: int) -> None:
    for output in ("table", "json"):
        got, _, _ = run(capsys, *TRACE, *args, "-o", output, "--exit-code")
        assert got == code, (args, output)


# -- help, examples, completion ------------------------------------------------------------

def test_every_flag_has_help_and_every_command_examples() -> None:
    parser, _ = build_parser()
    problems = []
    for path, sub in [("", parser), *_commands(parser)]:
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if not action.help or action.help == argparse.SUPPRESS:
                name = "/".join(action.option_strings) or action.dest
                problems.append(f"axoneme {path} {name}: no help text")
        if path and "examples:" not in (sub.epilog or ""):
            problems.append(f"axoneme {path}: no examples in its --help")
    assert not problems, "\n".join(problems)


def test_examples_name_existing_commands_and_flags() -> None:
    parser, _ = build_parser()
    commands = dict(_commands(parser))
    for path, lines in EXAMPLES.items():
        if path not in commands:  # a command of work not landed yet
            continue
        flags = {s for a in commands[path]._actions for s in a.option_strings}
        for line in lines:
            segments = [words[i:] for part in line.split("#")[0].split("|") for seg in part.split("&&")
                        for words in [seg.replace("<(", " ").replace(")", " ").split()]
                        for i in range(len(words)) if words[i] == "axoneme"]
            mine = [w for w in segments if w[:len(path.split()) + 1] == ["axoneme", *path.split()]]
            assert mine, f"an example of {path} that does not run it: {line}"
            used = {w for words in mine for w in words[:words.index("--") if "--" in words else None]
                    if w.startswith("-") and w != "-"}
            assert used <= flags, (path, line, used - flags)


def test_completion_script(capsys: pytest.CaptureFixture[str]) -> None:
    for shell in ("bash", "zsh", "fish"):
        code, out, _ = run(capsys, "completion", shell)
        assert code == 0 and "axoneme" in out and "_ARGCOMPLETE" in out
    code, _, err = run(capsys, "completion", "tcsh")
    assert code == 2 and "invalid choice" in err


def _complete(line: str, tmp_path: Path) -> list[str]:
    """What `axoneme` answers a shell asking to complete ``line`` (argcomplete's protocol)."""
    out = tmp_path / "completions"
    env = {**os.environ, "_ARGCOMPLETE": "1", "_ARGCOMPLETE_IFS": "\n", "COMP_LINE": line,
           "COMP_POINT": str(len(line)), "_ARGCOMPLETE_STDOUT_FILENAME": str(out),
           "_ARGCOMPLETE_SHELL": "bash"}
    res = subprocess.run([AXONEME], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return sorted(w.strip() for w in out.read_text().split("\n"))


def test_completion_answers_commands_flags_and_choices(tmp_path: Path) -> None:
    assert _complete("axoneme policy g", tmp_path) == ["get"]
    assert _complete("axoneme endpoint list --se", tmp_path) == ["--selector"]
    assert _complete("axoneme pod list -o ", tmp_path) == ["json", "table", "wide", "yaml"]


def test_completion_of_names_without_an_agent_offers_none(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AXONEME_API_SOCKET", str(tmp_path / "no-agent.sock"))
    assert [w for w in _complete("axoneme pod delete ", tmp_path) if w and w[0] != "-"] == []


def test_name_completers_ask_the_agent(fake_agent: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from axoneme.agent.cli._completion import NAMES, attach_completers

    monkeypatch.setattr("axoneme.agent.client.AgentClient", FakeClient)
    parser, _ = build_parser()
    attach_completers(parser)
    commands = dict(_commands(parser))
    for (path, dest), _names in NAMES.items():
        if path != "*":
            assert any(a.dest == dest for a in commands[path]._actions), (path, dest)

    def completer(path: str, dest: str) -> Any:
        (action,) = [a for a in commands[path]._actions if a.dest == dest]
        return action.completer

    ns = argparse.Namespace
    assert completer("pod exec", "name")("w", ns(namespace="shop")) == ["web"]
    assert completer("policy get", "name")("", ns(namespace="shop")) == [
        "netpol/web", "cnp/web", "ccnp/all"]
    assert completer("endpoint get", "id")("", ns()) == ["1", "2"]
    assert completer("pod list", "namespace")("s", ns()) == ["shop"]


def test_completion_in_bash(tmp_path: Path) -> None:
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash on this machine")
    script = tmp_path / "complete.sh"
    script.write_text(
        'source <("$AXONEME" completion bash)\n'
        'COMP_LINE="axoneme identity l"; COMP_POINT=${#COMP_LINE}\n'
        'COMP_WORDS=(axoneme identity l); COMP_CWORD=2\n'
        '_python_argcomplete axoneme l identity\n'
        'printf "%s\\n" "${COMPREPLY[@]}"\n')
    env = {**os.environ, "AXONEME": AXONEME, "PATH": f"{Path(AXONEME).parent}:{os.environ['PATH']}"}
    res = subprocess.run([bash, str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["list"]


def test_plugins_yaml_is_the_json_document(capsys: pytest.CaptureFixture[str]) -> None:
    code_json, out_json, _ = run(capsys, "plugins", "-o", "json")
    code_yaml, out_yaml, _ = run(capsys, "plugins", "-o", "yaml")
    assert code_yaml == code_json and yaml.safe_load(out_yaml) == json.loads(out_json)
    _, table_out, _ = run(capsys, "plugins")
    _, wide_out, _ = run(capsys, "plugins", "-o", "wide")
    assert wide_out == table_out and "noop" in table_out


def test_status_and_endpoint_get_yaml(fake_agent: None, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "status", "-o", "yaml")
    assert code == 0 and yaml.safe_load(out) == STATUS
    code, out, _ = run(capsys, "endpoint", "get", "1", "-o", "yaml")
    assert code == 0 and yaml.safe_load(out)["pod"] == "shop/web"
    assert yaml.safe_load(out) == json.loads(run(capsys, "endpoint", "get", "1", "-o", "json")[1])
