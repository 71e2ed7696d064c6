"""A restart adopting the kernel's state (issue 17; agent/_checkpoint.py) on eBPF.

A clean stop leaves a checkpoint and a stamp beside the pinned maps; the next
start serves the kernel's state at once and rebuilds its policy state in the
background, then compares it with the kernel. Each test proves the kernel ends
exactly right: after a plain restart (and nothing got through that the policy
denies while the agent was away), after a corrupt checkpoint, after a policy
changed while the agent was down, and after map entries changed behind its back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.privileged]

SERVER = ("import http.server, socketserver\n"
          "socketserver.ThreadingTCPServer.allow_reuse_address = True\n"
          "socketserver.ThreadingTCPServer(('', 80), http.server.SimpleHTTPRequestHandler)"
          ".serve_forever()\n")
POLICY = ("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\n"
          "metadata:\n  name: web-in\n  namespace: default\n"
          "spec:\n  endpointSelector:\n    matchLabels:\n      app: web\n"
          "  ingress:\n  - fromEndpoints:\n    - matchLabels:\n        app: client\n"
          "    toPorts:\n    - ports:\n      - port: \"80\"\n        protocol: TCP\n")
# connects to ip:80 from the pod's netns every 0.1 s for argv[2] seconds;
# prints the number of connections that were accepted and refused/timed out
PROBER = ("import socket, sys, time\n"
          "ip, end = sys.argv[1], time.monotonic() + float(sys.argv[2])\n"
          "ok = no = 0\n"
          "while time.monotonic() < end:\n"
          "    s = socket.socket(); s.settimeout(0.5)\n"
          "    try:\n        s.connect((ip, 80)); ok += 1\n"
          "    except OSError:\n        no += 1\n"
          "    finally:\n        s.close()\n"
          "    time.sleep(0.1)\n"
          "print(ok, no)\n")
ADOPTED = "the kernel holds the checkpoint's state"
REBUILT = "policy state rebuilt and compared with the kernel"


@pytest.fixture
def setup(agent_factory: Any, datapath_probe: Any, tmp_path: Path) -> dict[str, Any]:
    reason = datapath_probe("ebpf")
    if reason is not None:
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    ap = agent_factory("ebpf")
    web = ap.pod_run("web", "python3", "-c", SERVER, labels="app=web")
    ap.pod_run("client", "sleep", "infinity", labels="app=client")
    ap.pod_run("bad", "sleep", "infinity", labels="app=bad")
    policy = tmp_path / "web-in.yaml"
    policy.write_text(POLICY)
    ap.cli("policy", "apply", "-f", str(policy), check=True)
    eps = {e["pod"].split("/")[1]: e for e in ap.json("endpoint", "list")}
    s = {"ap": ap, "web": web, "eps": eps}
    assert _probe(s, "client", 3)[0] > 0, ap.log()
    assert _probe(s, "bad", 1)[0] == 0
    return s


def _prober(s: dict[str, Any], pod: str, seconds: float) -> subprocess.Popen[str]:
    return subprocess.Popen(["nsenter", f"--net={s['eps'][pod]['netns']}", sys.executable, "-c",
                             PROBER, s["web"], str(seconds)], stdout=subprocess.PIPE, text=True)


def _probe(s: dict[str, Any], pod: str, seconds: float) -> tuple[int, int]:
    out, _ = _prober(s, pod, seconds).communicate(timeout=seconds + 30)
    ok, no = out.split()
    return int(ok), int(no)


def _in_sync(s: dict[str, Any]) -> dict[str, Any]:
    """The web endpoint's view: the computed policy and the kernel's copy."""
    view = s["ap"].api().get(f"/v1/endpoints/{s['eps']['web']['id']}")
    assert view["in_sync"], view
    return dict(view)


def _restart(s: dict[str, Any]) -> str:
    """SIGTERM, start again; the new part of the agent's log once the API serves."""
    ap = s["ap"]
    assert ap.stop() == 0
    offset = ap.log_path.stat().st_size
    ap.start()
    ap.api().get("/v1/status")  # waits for a background rebuild (the API's gate)
    with open(ap.log_path, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def test_a_clean_restart_adopts_and_never_lets_a_denied_peer_through(setup: Any,
                                                                       tmp_path: Path) -> None:
    ap = setup["ap"]
    # scale: 5,000 CIDR peers more on the server (10k entries, 5k identities), so the
    # restart's background rebuild and comparison run while the probes do
    peers = "".join(f"    - 100.64.{i // 256}.{i % 256}/32\n" for i in range(5000))
    big = tmp_path / "peers.yaml"
    big.write_text("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\n"
                   "metadata:\n  name: peers\n  namespace: default\n"
                   "spec:\n  endpointSelector:\n    matchLabels:\n      app: web\n"
                   "  ingress:\n  - fromCIDR:\n" + peers +
                   "    toPorts:\n    - ports:\n      - port: \"80\"\n        protocol: TCP\n"
                   "      - port: \"80\"\n        protocol: UDP\n")
    ap.cli("policy", "apply", "-f", str(big), check=True)
    assert len(_in_sync(setup)["datapath"]) > 10_000
    bad, client = _prober(setup, "bad", 20), _prober(setup, "client", 20)
    assert ap.stop() == 0
    assert (ap.state_dir / "checkpoint.json").exists(), ap.log()
    offset = ap.log_path.stat().st_size
    ap.start()
    assert ap.api().get("/v1/healthz")["ok"]
    ap.api().get("/v1/status")  # waits for the background rebuild (the API's gate)
    log = ap.log_path.read_bytes()[offset:].decode(errors="replace")
    assert ADOPTED in log and REBUILT in log and "differed" not in log, log
    assert not (ap.state_dir / "checkpoint.json").exists()  # taken by the start
    _in_sync(setup)
    denied_ok, _ = bad.communicate(timeout=60)[0].split()
    allowed_ok, _ = client.communicate(timeout=60)[0].split()
    assert int(denied_ok) == 0, "the denied peer connected during the restart"
    assert int(allowed_ok) > 0
    assert _probe(setup, "client", 2)[0] > 0
    # the rebuilt engine serves changes: the policy now allows another app only
    other = ap.log_path.parent / "web-in-other.yaml"
    other.write_text(POLICY.replace("app: client", "app: other"))
    ap.cli("policy", "apply", "-f", str(other), check=True)
    assert _probe(setup, "client", 1.5)[0] == 0
    _in_sync(setup)


def test_a_corrupt_checkpoint_is_refused_and_the_state_recomputed(setup: Any) -> None:
    ap = setup["ap"]
    assert ap.stop() == 0
    path = ap.state_dir / "checkpoint.json"
    data = json.loads(path.read_text())
    data["inputs"] = "0" * 64  # well-formed, but not what its checksum covers
    path.write_text(json.dumps(data))
    offset = ap.log_path.stat().st_size
    ap.start()
    assert ap.api().get("/v1/healthz") == {"ok": True}  # rebuilt before serving
    log = ap.log_path.read_bytes()[offset:].decode(errors="replace")
    assert "fails its checksum" in log and "rebuilding before serving" in log, log
    assert ADOPTED not in log
    _in_sync(setup)
    assert _probe(setup, "client", 2)[0] > 0
    assert _probe(setup, "bad", 1)[0] == 0


def test_a_policy_changed_while_down_is_enforced_exactly(setup: Any) -> None:
    ap = setup["ap"]
    assert ap.stop() == 0
    state = json.loads((ap.state_dir / "state.json").read_text())
    (key,) = [k for k in state["policies"] if "web-in" in k]
    ports = state["policies"][key]["doc"]["obj"]["spec"]["ingress"][0]["toPorts"][0]["ports"]
    ports[0]["port"] = "8080"  # the client may no longer reach port 80
    (ap.state_dir / "state.json").write_text(json.dumps(state))
    log = _restart(setup)
    assert "changed since the checkpoint" in log and ADOPTED not in log, log
    view = _in_sync(setup)
    ports_held = {e.get("port") for e in view["datapath"] if isinstance(e, dict)}
    assert 80 not in ports_held, view["datapath"]
    assert _probe(setup, "client", 1.5)[0] == 0


def test_map_entries_changed_behind_the_agents_back_are_repaired(setup: Any) -> None:
    """A stamp only says what the last agent left: an entry written by
    someone else while the agent was down is found by the comparison after
    the background rebuild and removed."""
    from axoneme.core.mapstate import Direction, Entry, Key
    from axoneme.datapath.ebpf import _bpf
    from axoneme.datapath.ebpf._datapath import policy_entry, policy_key_bytes, policy_map_of

    ap = setup["ap"]
    assert ap.stop() == 0
    web, bad = setup["eps"]["web"], setup["eps"]["bad"]
    key = Key(bad["identity"], Direction.INGRESS)  # allow everything from "bad"
    raw = policy_key_bytes(web["id"], key)
    pin = os.path.join(ap.bpffs_root, _bpf.PINNED_MAPS[policy_map_of(raw)])
    fd = _bpf.libbpf().bpf_obj_get(pin.encode())
    assert fd >= 0, pin
    try:
        _bpf.map_update(fd, raw, policy_entry(key, Entry()))
    finally:
        os.close(fd)
    assert _probe(setup, "bad", 2)[0] > 0  # the tampering lets it through
    log = _restart(setup)
    assert ADOPTED in log, log
    assert f"endpoint {web['id']}: the kernel's policy differed" in log, log
    assert "1 removed" in log, log
    _in_sync(setup)
    assert _probe(setup, "bad", 1.5)[0] == 0
    assert _probe(setup, "client", 2)[0] > 0


def test_an_erased_stamp_means_no_adoption(setup: Any) -> None:
    """Another writer of ours (any agent start takes the stamp) or a reboot
    (bpffs is empty): the checkpoint alone is not trusted."""
    from axoneme.core.datapath import DatapathConfig
    from axoneme.datapath.ebpf import EbpfDatapath

    ap = setup["ap"]
    assert ap.stop() == 0
    dp = EbpfDatapath(DatapathConfig(bpffs_root=ap.bpffs_root))
    assert len(dp.take_adopt_stamp()) == 64
    assert dp.take_adopt_stamp() == ""  # taken: erased
    log = _restart(setup)
    assert "carries no stamp" in log and ADOPTED not in log, log
    _in_sync(setup)
    assert _probe(setup, "client", 2)[0] > 0
    assert _probe(setup, "bad", 1)[0] == 0
