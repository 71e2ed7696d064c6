"""The host firewall's agent side without root: its safety check (never in the
machine's own network namespace), node labels and devices from flags/config,
Node objects feeding the host endpoint's labels, and the CLI refusing it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from axoneme.agent import _hostfw
from axoneme.agent._hostfw import HostFirewall, check_netns, parse_devices, parse_node_labels
from axoneme.core.endpoint import HOST_ENDPOINT_ID, Endpoint
from axoneme.core.errors import ConfigError
from axoneme.core.policy.engine import PolicyEngine

AX = str(Path(sys.executable).with_name("axoneme"))


def test_check_netns_refuses_the_machines_namespace_and_allows_a_node() -> None:
    with pytest.raises(ConfigError, match="initial network namespace"):
        check_netns(True, initial=True)
    check_netns(True, initial=False)
    check_netns(False, initial=True)  # off: nothing to check


def test_a_namespace_with_a_default_route_counts_as_the_machines(monkeypatch: Any) -> None:
    monkeypatch.setattr(_hostfw, "_netns_inode", lambda path: 7 if "self" in path else None)
    monkeypatch.setattr(_hostfw, "has_default_route", lambda: True)
    assert _hostfw.in_initial_netns()
    monkeypatch.setattr(_hostfw, "has_default_route", lambda: False)
    assert not _hostfw.in_initial_netns()
    # PID 1's namespace, when it can be read, is the machine's whatever its routes
    monkeypatch.setattr(_hostfw, "_netns_inode", lambda path: 7)
    monkeypatch.setattr(_hostfw, "nested_pid_namespace", lambda pid_ns="": False)
    assert _hostfw.in_initial_netns()


def test_node_labels_and_devices_parse_or_name_the_field() -> None:
    assert parse_node_labels("node-role=worker, zone=a") == {"node-role": "worker", "zone": "a"}
    assert parse_node_labels({"kubernetes.io/hostname": "n2"}) == {"kubernetes.io/hostname": "n2"}
    assert parse_node_labels(None) == {}
    with pytest.raises(ConfigError, match="--node-labels: expected KEY=VALUE"):
        parse_node_labels("worker")
    with pytest.raises(ConfigError, match="config key node_labels: invalid label key"):
        parse_node_labels({"bad key": "x"}, "config key node_labels")
    with pytest.raises(ConfigError, match="invalid value"):
        parse_node_labels("a=b c")
    assert parse_devices("eth0, eth1") == ["eth0", "eth1"]
    with pytest.raises(ConfigError, match="--devices: invalid interface name"):
        parse_devices("a" * 16)
    with pytest.raises(ConfigError, match="expected interface names"):
        parse_devices(3)


class _Regen:
    def __init__(self) -> None:
        self.host_endpoint: Endpoint | None = None
        self.regenerated = 0

    async def regenerate(self) -> dict[int, str]:
        self.regenerated += 1
        return {}

    async def host_endpoint_added(self, ep: Endpoint) -> None:
        self.host_endpoint = ep


def test_node_object_labels_become_the_host_endpoints() -> None:
    engine = PolicyEngine()
    regen = _Regen()
    store = SimpleNamespace(lock=asyncio.Lock())
    config = SimpleNamespace(node_labels={}, devices=["eth0"])
    fw = HostFirewall(config, engine, regen, store, node="node2")

    async def scenario() -> None:
        await fw.start()
        ep = engine.host_endpoint()
        assert ep is not None and ep.devices == ("eth0",) and ep.identity == 1
        other = {"metadata": {"name": "node1", "labels": {"role": "cp"}}}
        mine = {"metadata": {"name": "node2", "labels": {"node-role": "worker"}}}
        await fw.on_nodes([("ADDED", other), ("ADDED", mine)], True)
        ep = engine.host_endpoint()
        assert ep is not None and "k8s:node-role=worker" in ep.labels.sorted_strings()
        assert "k8s:role=cp" not in ep.labels.sorted_strings()
        assert regen.host_endpoint == ep and regen.regenerated == 1
        await fw.on_nodes([("MODIFIED", mine)], False)  # unchanged: nothing to do
        assert regen.regenerated == 1
    asyncio.run(scenario())
    assert fw.view()["endpoint"] == HOST_ENDPOINT_ID


@pytest.mark.skipif(os.geteuid() != 0, reason="reading network namespaces needs root")
def test_agent_run_refuses_the_host_firewall_here(tmp_path: Path) -> None:
    """The tests run in the machine's namespace (or one with a default route):
    exit 2, the state dir never made."""
    if not _hostfw.in_initial_netns():
        pytest.skip("this test process is not in the machine's network namespace")
    state = tmp_path / "state"
    r = subprocess.run([AX, "agent", "run", "--datapath", "noop", "--enable-host-firewall",
                        "--state-dir", str(state), "--api-socket", str(tmp_path / "s.sock")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "host_firewall (--enable-host-firewall) refused" in r.stderr
    assert not state.exists()


def test_host_firewall_nodes_leaves_other_nodes_off() -> None:
    cfg = SimpleNamespace(host_firewall=True, host_firewall_nodes=["node2"], k8s_mode=True,
                          k8s_node_name="node1")
    _hostfw.host_firewall_here(cfg)  # node1 is not listed: off, no netns check
    assert cfg.host_firewall is False
    with pytest.raises(ConfigError, match="host_firewall_nodes: expected a list"):
        _hostfw.host_firewall_here(SimpleNamespace(host_firewall=True, host_firewall_nodes="n2",
                                                   k8s_mode=True, k8s_node_name="n2"))


def test_in_a_container_pid_1_is_not_the_machines(monkeypatch: Any, tmp_path: Path) -> None:
    """A DaemonSet agent (hostNetwork, own PID namespace) sees its container's init
    as PID 1, in the node's own network namespace: that is no sign of the machine's
    namespace there; only a default route is."""
    nested, flat = tmp_path / "nested", tmp_path / "flat"
    nested.symlink_to("pid:[4026532317]")  # what a container's /proc/self/ns/pid reads
    flat.symlink_to(f"pid:[{0xEFFFFFFC}]")  # the initial PID namespace's fixed inode
    assert _hostfw.nested_pid_namespace(str(nested)) and not _hostfw.nested_pid_namespace(str(flat))
    assert not _hostfw.nested_pid_namespace(str(tmp_path / "absent"))
    monkeypatch.setattr(_hostfw, "_netns_inode", lambda path: 7)  # PID 1 in our netns
    monkeypatch.setattr(_hostfw, "has_default_route", lambda: False)
    assert not _hostfw.in_initial_netns(pid_ns=str(nested))
    assert _hostfw.in_initial_netns(pid_ns=str(flat))
    monkeypatch.setattr(_hostfw, "has_default_route", lambda: True)
    assert _hostfw.in_initial_netns(pid_ns=str(nested))
