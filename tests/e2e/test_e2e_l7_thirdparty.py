"""A third-party L7 parser, installed from its own wheel, used end to end (issue 14).

The parser (tests/e2e/plugins/echo: the "echo" line protocol, each request
``VERB arg``, rules ``{verb: regex}``) is built with ``uv build`` into a
wheel and installed into the venv for this module (uninstalled afterwards,
also on failure). Nothing in axoneme names it: a CiliumNetworkPolicy selects
it with Cilium's generic form ``rules: {l7proto: echo, l7: [{verb: GET}]}``.

Covered: unknown before the install (validation names ``rules.l7proto``),
listed by ``axoneme plugins`` with its distribution and capabilities,
validated and traced offline (``--l7 verb=GET`` allowed, ``--l7 verb=PUT``
denied, a key it does not take refused), and enforced live through its proxy
on the eBPF datapath: a pod's GET line is answered, PUT refused, and both
show as L7 flows in ``axoneme observe``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _testnet  # tests/ is on sys.path (tests/conftest.py)
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.privileged]

PLUGIN_SRC = Path(__file__).parent / "plugins" / "echo"
DIST = "axoneme-echo-example"
AXONEME = str(Path(sys.executable).parent / "axoneme")
PORT = 7000
FIELD = "spec.ingress[0].toPorts[0].rules.l7proto"

POLICY = textwrap.dedent(f"""\
    apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {{name: echo-verbs, namespace: default}}
    spec:
      endpointSelector: {{matchLabels: {{app: echo}}}}
      ingress:
      - fromEndpoints: [{{matchLabels: {{app: client}}}}]
        toPorts:
        - ports: [{{port: "{PORT}", protocol: TCP}}]
          rules:
            l7proto: echo
            l7: [{{verb: "GET"}}]
    """)

CLUSTER = textwrap.dedent("""\
    apiVersion: v1
    kind: Pod
    metadata: {name: client, namespace: default, labels: {app: client}}
    ---
    apiVersion: v1
    kind: Pod
    metadata: {name: echo, namespace: default, labels: {app: echo}}
    """)

# The echo server in its pod: one "OK <line>" per line.
SERVER = textwrap.dedent(f"""\
    import socketserver
    class H(socketserver.StreamRequestHandler):
        def handle(self):
            for line in self.rfile:
                self.wfile.write(b"OK " + line)
                self.wfile.flush()
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    socketserver.ThreadingTCPServer(("0.0.0.0", {PORT}), H).serve_forever()
    """)

# The client in its pod: the given lines on one connection, the answers as JSON.
CLIENT = textwrap.dedent(f"""\
    import json, socket, sys
    s = socket.create_connection((sys.argv[1], {PORT}), timeout=5)
    f = s.makefile("rwb")
    out = []
    for line in sys.argv[2:]:
        f.write(line.encode() + b"\\n")
        f.flush()
        out.append(f.readline().decode().strip())
    print(json.dumps(out))
    """)


def _uv() -> str:
    found = shutil.which("uv") or str(Path.home() / ".local" / "bin" / "uv")
    if not Path(found).exists():
        pytest.fail("uv is not installed (scripts/bootstrap installs it)")
    return found


def _run(*cmd: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)


def _uninstall(uv: str) -> None:
    _run(uv, "pip", "uninstall", "--python", sys.executable, DIST)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("echo-l7")
    (d / "policy.yaml").write_text(POLICY)
    (d / "cluster.yaml").write_text(CLUSTER)
    return {"dir": d, "policy": d / "policy.yaml", "cluster": d / "cluster.yaml"}


@pytest.fixture(scope="module")
def echo_plugin(files: dict[str, Path]) -> Iterator[Path]:
    """The echo parser's wheel, built from its sources and installed for this module."""
    uv = _uv()
    _uninstall(uv)  # a run killed before its cleanup may have left it
    # not installed: no policy can select it, and validation says which field and why
    res = _run(AXONEME, "policy", "validate", "-f", str(files["policy"]))
    assert res.returncode == 2, res
    assert FIELD in res.stderr and 'unknown L7 parser "echo"' in res.stderr, res.stderr
    out = files["dir"] / "dist"
    build = _run(uv, "build", "--wheel", "--out-dir", str(out), str(PLUGIN_SRC), timeout=300)
    assert build.returncode == 0, build.stderr
    (wheel,) = out.glob("axoneme_echo_example-*.whl")
    try:
        inst = _run(uv, "pip", "install", "--python", sys.executable, "--no-deps", str(wheel))
        assert inst.returncode == 0, inst.stderr
        yield wheel
    finally:
        _uninstall(uv)
        shutil.rmtree(PLUGIN_SRC / "build", ignore_errors=True)


def test_listed_validated_and_traced_offline(echo_plugin: Path, files: dict[str, Path]) -> None:
    res = _run(AXONEME, "plugins", "-o", "json")
    assert res.returncode == 0, res
    data = json.loads(res.stdout)
    assert data["l7"]["echo"] == "axoneme_echo:EchoParser"
    (echo,) = [d for d in data["details"] if d["kind"] == "l7" and d["name"] == "echo"]
    assert echo["distribution"] == DIST and echo["version"] == "0.0.1" and echo["loads"], echo
    assert {"proxy", "rules:l7proto", "transport:tcp"} <= set(echo["capabilities"]), echo

    res = _run(AXONEME, "policy", "validate", "-f", str(files["policy"]))
    assert res.returncode == 0, res.stderr
    bad = files["dir"] / "bad.yaml"
    bad.write_text(POLICY.replace('{verb: "GET"}', '{verb: "GET", path: "/x"}'))
    res = _run(AXONEME, "policy", "validate", "-f", str(bad))
    assert res.returncode == 2 and "rules.l7[0].path" in res.stderr, res

    def trace(*l7: str) -> subprocess.CompletedProcess[str]:
        args = [a for kv in l7 for a in ("--l7", kv)]
        return _run(AXONEME, "policy", "trace", "--cluster", str(files["cluster"]), "-f",
                    str(files["policy"]), "--from", "default/client", "--to", "default/echo",
                    "--port", str(PORT), *args, "-o", "json")

    got = json.loads(trace("verb=GET", "arg=a").stdout)
    assert got["verdict"] == "allowed" and got["l7"]["verdict"] == "allowed", got
    assert got["l7"]["rules"] == [{"parser": "echo", "verb": "GET"}], got
    got = json.loads(trace("verb=PUT").stdout)
    assert got["verdict"] == "denied" and got["l7"]["verdict"] == "denied", got
    assert json.loads(trace().stdout)["verdict"] == "redirected"
    res = trace("bogus=1")
    assert res.returncode == 2 and "bogus" in res.stderr and "verb" in res.stderr, res


def _lines(agent: Any, dst: str, *lines: str) -> list[str] | None:
    res = agent.pod_exec("client", "python3", "-c", CLIENT, dst, *lines, timeout=30)
    return json.loads(res.stdout) if res.returncode == 0 else None


def test_enforced_live_on_ebpf(echo_plugin: Path, agent_factory: Any, datapath_probe: Any,
                               files: dict[str, Path]) -> None:
    reason = datapath_probe("ebpf")
    if reason is not None:
        pytest.skip(reason)
    with _testnet.kernel_agent_lock():
        agent = agent_factory("ebpf")
        dst = agent.pod_run("echo", "python3", "-u", "-c", SERVER, labels="app=echo")
        agent.pod_run("client", "sleep", "infinity", labels="app=client")
        deadline = time.monotonic() + 20
        while _lines(agent, dst, "PUT ready") != ["OK PUT ready"]:  # no policy yet: all allowed
            assert time.monotonic() < deadline, f"the echo server does not answer:\n{agent.log()}"
            time.sleep(0.3)

        agent.cli("policy", "apply", "-f", str(files["policy"]), check=True)
        got = _lines(agent, dst, "GET a", "PUT b", "GET c")
        assert got == ["OK GET a", "DENIED", "OK GET c"], f"{got}\n{agent.log()}"

        flows = [json.loads(line) for line in agent.cli(
            "observe", "--type", "l7", "-o", "json", check=True).stdout.splitlines() if line]
        echo = [(f["verdict"], f["l7"]["echo"]["verb"], f["l7"]["echo"]["arg"])
                for f in flows if "echo" in f.get("l7", {})]
        assert ("FORWARDED", "GET", "a") in echo and ("DROPPED", "PUT", "b") in echo, flows
        assert ("FORWARDED", "PUT", "ready") not in echo  # sent before the policy: not proxied
        (put,) = [f for f in flows if f.get("l7", {}).get("echo", {}).get("verb") == "PUT"]
        assert put["source"].get("pod_name") == "client" and put["destination"].get("pod_name") == "echo"
        assert put["traffic_direction"] == "INGRESS", put
