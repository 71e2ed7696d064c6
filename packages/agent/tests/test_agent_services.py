"""The agent's CNI and policy paths without root: the real services on a
NoopDatapath and a fake netlink (no netns, no veth, no kernel).

What each test proves is what the kernel-backed e2e tests prove with pods:
the state file, the datapath's copy of every endpoint's policy and the
ipcache follow CNI ADD/DEL/GC, policy apply/delete and relabelling."""

from __future__ import annotations

import ast
import asyncio
import ipaddress
import json
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from axoneme.agent import _netlink as nl
from axoneme.agent._agent import Agent
from axoneme.agent._config import AgentConfig
from axoneme.agent._errors import Conflict, NotFound
from axoneme.agent._netlink import EndpointLink, NetlinkError
from axoneme.core.datapath import NoopDatapath
from axoneme.core.errors import ConfigError
from axoneme.core.hookspecs import hookimpl
from axoneme.core.mapstate import Direction
from axoneme.core.policy.api import PolicyKind, PolicyRef

CIDR = "10.244.9.0/24"


class FakeNetlink:
    """The kernel side of endpoints, in memory: links by host name."""

    GATEWAY_IP = nl.GATEWAY_IP

    def __init__(self) -> None:
        self.links: dict[str, int] = {}
        self.removed: list[str] = []
        self.fail_setup = False

    def host_ifname(self, container_id: str) -> str:
        return nl.host_ifname(container_id)

    def link_index(self, name: str) -> int:
        return self.links.get(name, 0)

    def setup_endpoint(self, container_id: str, netns_path: str, ifname: str, ip: str,
                       mtu: int = 1500) -> EndpointLink:
        if self.fail_setup:
            raise NetlinkError(f"cannot create veth for {container_id[:12]} (injected)")
        host = self.host_ifname(container_id)
        self.links[host] = 100 + len(self.links)
        return EndpointLink(host, self.links[host], "02:00:00:00:00:01", ifname,
                            "02:00:00:00:00:02", mtu)

    def teardown_endpoint(self, host: str) -> bool:
        self.removed.append(host)
        return self.links.pop(host, None) is not None


class Recorder:
    """pluggy plugin: what the agent announced."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    @hookimpl
    def axoneme_endpoint_added(self, endpoint: Any) -> None:
        self.events.append(("added", endpoint.id))

    @hookimpl
    def axoneme_endpoint_removed(self, endpoint: Any) -> None:
        self.events.append(("removed", endpoint.id))

    @hookimpl
    def axoneme_policy_changed(self, revision: int, added: list[Any], removed: list[Any]) -> None:
        self.events.append(("policy", (revision, [r.name for r in added],
                                       [r.name for r in removed])))


class Node:
    """An agent on NoopDatapath + FakeNetlink, as ``agent run`` would wire it,
    minus the kernel (no guard, no forwarding, no real links)."""

    def __init__(self, tmp_path: Path, netlink: FakeNetlink | None = None, **cfg: Any) -> None:
        self.state_dir = tmp_path / "state"
        self.state_dir.mkdir(exist_ok=True)
        self.nl = netlink or FakeNetlink()
        self.dp = NoopDatapath()
        self.agent = Agent(AgentConfig(datapath="noop", state_dir=str(self.state_dir),
                                       guard=False, pod_cidr=CIDR, l7_proxies=False, **cfg),
                           netlink=self.nl)
        self.agent.datapath = self.dp
        self.hooks = Recorder()
        self.agent.pm.register(self.hooks)

    def state(self) -> dict[str, Any]:
        # what a restart loads: state.json and its journal (policy changes)
        from axoneme.agent._state import read_persisted

        data = read_persisted(str(self.state_dir / "state.json"))
        assert data is not None
        return data

    async def add(self, name: str, labels: dict[str, str], ns: str = "default") -> dict[str, Any]:
        if f"{ns}/{name}" not in self.agent.store.pods:
            from axoneme.agent._records import PodRecord

            self.agent.store.pods[f"{ns}/{name}"] = PodRecord(name=name, namespace=ns,
                                                              labels=labels)
        return await self.agent.endpoints.cni_add({
            "container_id": f"c-{ns}-{name}", "netns": f"/run/netns/{name}", "ifname": "eth0",
            "namespace": ns, "pod_name": name, "network": "axoneme"})

    def endpoint(self, name: str, ns: str = "default") -> Any:
        rec = self.agent.store.endpoints[f"c-{ns}-{name}"]
        return self.agent.store.endpoint_objs[rec.id]


@pytest.fixture(autouse=True)
def _no_state_left(tmp_path: Path) -> Any:
    """The state files these agents wrote go with the test (the suite's
    sweeper would otherwise take them for a killed agent's)."""
    yield
    for f in tmp_path.glob("state/state.json*"):
        f.unlink()


def run(coro: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(coro())


def _net(ip: str) -> Any:
    return ipaddress.ip_network(f"{ip}/32")


def _allow_web_from_client(port: int) -> dict[str, Any]:
    return {"file": "<test>", "index": 0, "obj": {
        "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"endpointSelector": {"matchLabels": {"app": "web"}},
                 "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "client"}}],
                              "toPorts": [{"ports": [{"port": str(port), "protocol": "TCP"}]}]}]}}}


WEB = PolicyRef(PolicyKind.CILIUM_NETWORK_POLICY, "default", "web")


# -- CNI --------------------------------------------------------------------------------------

def test_cni_add_wires_ipam_identity_datapath_and_state(tmp_path: Path) -> None:
    node = Node(tmp_path)

    async def go() -> None:
        res = await node.add("web", {"app": "web"})
        ip = res["ips"][0]["address"].split("/")[0]
        assert ipaddress.ip_address(ip) in ipaddress.ip_network(CIDR)
        assert res["ips"][0]["gateway"] == nl.GATEWAY_IP
        assert res["interfaces"][0]["name"] == nl.host_ifname("c-default-web")
        ep = node.endpoint("web")
        assert "k8s:app=web" in ep.labels.sorted_strings()
        assert "k8s:io.kubernetes.pod.namespace=default" in ep.labels.sorted_strings()
        assert res["identity"] == ep.identity >= 256
        # the datapath knows the endpoint and its IP's identity
        assert node.dp.dump_ipcache()[_net(ip)] == ep.identity
        assert node.dp.dump(ep) == node.agent.engine.resolve(ep.id)
        # the state file holds it, ready
        st = node.state()["endpoints"]["c-default-web"]
        assert (st["status"], st["ipv4"], st["id"]) == ("ready", ip, res["endpoint_id"])
        assert node.agent.store.pods["default/web"].container_id == "c-default-web"
        assert node.hooks.events == [("added", ep.id)]
        # a second ADD of the same container, or of the same pod, is refused
        with pytest.raises(Conflict):
            await node.add("web", {"app": "web"})
        check = await node.agent.endpoints.cni_check({"container_id": "c-default-web"})
        assert check["endpoint_id"] == res["endpoint_id"]

    run(go)


def test_cni_add_that_fails_leaves_nothing_and_frees_the_ip(tmp_path: Path) -> None:
    node = Node(tmp_path)

    async def go() -> None:
        node.nl.fail_setup = True
        with pytest.raises(NetlinkError, match="injected"):
            await node.add("web", {"app": "web"})
        assert node.agent.store.endpoints == {}
        assert node.state()["endpoints"] == {}  # the write-ahead record is gone again
        node.nl.fail_setup = False
        first = await node.add("web", {"app": "web"})
        assert first["ips"][0]["address"].startswith("10.244.9.")
        assert node.agent.endpoints.ipam.allocated() == {
            first["ips"][0]["address"].split("/")[0]: "c-default-web"}

    run(go)


def test_cni_del_is_idempotent_and_removes_everything(tmp_path: Path) -> None:
    node = Node(tmp_path)

    async def go() -> None:
        res = await node.add("web", {"app": "web"})
        ep = node.endpoint("web")
        ip = res["ips"][0]["address"].split("/")[0]
        assert await node.agent.endpoints.cni_del({"container_id": "c-default-web"}) == {
            "deleted": True}
        assert node.nl.links == {} and node.nl.removed == [nl.host_ifname("c-default-web")]
        assert _net(ip) not in node.dp.dump_ipcache()
        assert ep.id not in node.agent.store.endpoint_objs
        assert node.state()["endpoints"] == {}
        assert node.agent.store.pods["default/web"].container_id == ""
        assert ("removed", ep.id) in node.hooks.events
        assert await node.agent.endpoints.cni_del({"container_id": "c-default-web"}) == {
            "deleted": False}
        with pytest.raises(NotFound):
            await node.agent.endpoints.cni_check({"container_id": "c-default-web"})

    run(go)


def test_cni_gc_removes_only_attachments_not_listed(tmp_path: Path) -> None:
    node = Node(tmp_path)

    async def go() -> None:
        await node.add("keep", {"app": "a"})
        await node.add("stale", {"app": "b"})
        res = await node.agent.endpoints.cni_gc({
            "network": "axoneme",
            "valid_attachments": [{"containerID": "c-default-keep", "ifname": "eth0"}]})
        assert res == {"removed": ["c-default-stale"]}
        assert set(node.agent.store.endpoints) == {"c-default-keep"}

    run(go)


# -- policies ----------------------------------------------------------------------------------

def test_policy_apply_and_delete_reach_the_datapath(tmp_path: Path) -> None:
    node = Node(tmp_path)

    async def go() -> None:
        await node.add("web", {"app": "web"})
        await node.add("client", {"app": "client"})
        web, client = node.endpoint("web"), node.endpoint("client")
        engine = node.agent.engine
        assert engine.enforcement(web.id) == (False, False)
        before = node.dp.dump(web)
        res = await node.agent.policies.apply([_allow_web_from_client(80)])
        assert res["applied"] == [{"kind": "CiliumNetworkPolicy", "namespace": "default",
                                   "name": "web"}] and res["errors"] == {}
        assert engine.enforcement(web.id) == (True, False)
        got = node.dp.dump(web)
        assert got == engine.resolve(web.id) != before
        assert any(k.identity == client.identity and k.port == 80
                   and k.direction is Direction.INGRESS for k in got)
        # write-ahead: the API policy is in the state file
        assert "CiliumNetworkPolicy/default/web" in node.state()["policies"]
        listed = node.agent.policies.listing()
        assert [(p["name"], p["source"]) for p in listed] == [("web", "api")]
        rev = res["revision"]
        # a changed port: the minimal change reaches the datapath
        await node.agent.policies.apply([_allow_web_from_client(8080)])
        assert {k.port for k in node.dp.dump(web) if k.identity == client.identity} == {8080}
        out = await node.agent.policies.delete([WEB])
        assert out["revision"] > rev
        assert node.dp.dump(web) == engine.resolve(web.id) == before
        assert node.state()["policies"] == {}
        with pytest.raises(NotFound):
            await node.agent.policies.delete([WEB])
        changes = [e[1] for e in node.hooks.events if e[0] == "policy"]
        assert changes[0][1:] == (["web"], []) and changes[-1][1:] == ([], ["web"])

    run(go)


def test_policy_revision_continues_after_a_restart(tmp_path: Path) -> None:
    node = Node(tmp_path)

    async def go() -> None:
        await node.agent.policies.apply([_allow_web_from_client(80)])
        await node.agent.policies.apply([_allow_web_from_client(81)])
        revision = node.agent.revision
        again = Node(tmp_path)
        again.agent.load_state()
        again.agent.policies.restore()
        assert again.agent.revision == revision
        assert [p.ref for p in again.agent.engine.policies()] == [WEB]

    run(go)


def test_namespace_labels_change_identities_in_the_datapath(tmp_path: Path) -> None:
    node = Node(tmp_path)

    async def go() -> None:
        await node.agent.namespaces.create("team", {"tier": "a"})
        await node.add("web", {"app": "web"}, ns="team")
        old = node.endpoint("web", "team").identity
        await node.agent.namespaces.label("team", {"tier": "b"})
        ep = node.endpoint("web", "team")
        assert ep.identity != old
        assert "k8s:io.cilium.k8s.namespace.labels.tier=b" in ep.labels.sorted_strings()
        assert node.dp.dump_ipcache()[_net(ep.ipv4)] == ep.identity
        with pytest.raises(Conflict, match="still has pods"):
            await node.agent.namespaces.delete("team")

    run(go)


# -- restart: adoption and write-ahead records ---------------------------------------------------

def test_restart_adopts_live_endpoints_and_undoes_interrupted_adds(tmp_path: Path) -> None:
    fake = FakeNetlink()
    node = Node(tmp_path, fake)

    async def go() -> None:
        await node.add("web", {"app": "web"})
        await node.add("gone", {"app": "gone"})
        await node.agent.policies.apply([_allow_web_from_client(80)])
        # an ADD killed half-way, and a pod whose veth vanished while the agent was down
        state = node.state()
        state["endpoints"]["c-default-half"] = {
            **state["endpoints"]["c-default-web"], "id": 99, "container_id": "c-default-half",
            "pod_name": "half", "ipv4": "10.244.9.200", "status": "creating",
            "host_ifname": nl.host_ifname("c-default-half")}
        (node.state_dir / "state.json").write_text(json.dumps(state))
        fake.links.pop(nl.host_ifname("c-default-gone"))
        again = Node(tmp_path, fake)
        agent = again.agent
        agent.load_state()
        agent.endpoints.restore_ipam()
        agent.policies.restore()
        await agent.endpoints.reconcile_interrupted()
        await agent.endpoints.adopt()
        recs = agent.store.endpoints
        assert "c-default-half" not in recs
        assert nl.host_ifname("c-default-half") in fake.removed
        assert "10.244.9.200" not in agent.endpoints.ipam.allocated()
        assert recs["c-default-web"].status == "ready"
        assert recs["c-default-gone"].status == "disconnected"
        web = again.endpoint("web")
        assert again.dp.dump(web) == agent.engine.resolve(web.id)
        assert agent.engine.enforcement(web.id) == (True, False)
        assert again.dp.dump_ipcache()[_net(web.ipv4)] == web.identity

    run(go)


# -- datapath options ----------------------------------------------------------------------------

def test_legacy_flags_become_options_only_where_declared() -> None:
    cfg = AgentConfig(iptables_mode="ipset", bpffs_root="/sys/fs/bpf/t", policy_map_max=8,
                      datapath_options={"max_endpoints": 4})
    assert cfg.datapath_option_values({"mode", "policy_map_max"}) == {
        "mode": "ipset", "policy_map_max": 8, "max_endpoints": 4}
    # a datapath that declares nothing gets the legacy values as before
    assert cfg.datapath_option_values(set()) == {
        "mode": "ipset", "bpffs_root": "/sys/fs/bpf/t", "policy_map_max": 8, "max_endpoints": 4}
    # --datapath-opt wins over a legacy flag
    cfg.datapath_options["policy_map_max"] = "16"
    assert cfg.datapath_option_values({"policy_map_max"})["policy_map_max"] == "16"


def test_datapath_opt_flags_reach_the_datapath(tmp_path: Path) -> None:
    from axoneme.agent.cli import UsageError, build_parser
    from axoneme.agent.cli._agentcmds import build_agent_config

    parser, _ = build_parser()
    conf = tmp_path / "agent.yaml"
    conf.write_text("datapath: noop\ndatapath_options: {lock_dir: /tmp/x, events: 'on'}\n")
    args = parser.parse_args(["agent", "run", "--config", str(conf), "--state-dir",
                              str(tmp_path / "s"), "--datapath-opt", "events=off",
                              "--datapath-opt", "max-endpoints=4"])
    cfg = build_agent_config(args)
    assert cfg.datapath_options == {"lock_dir": "/tmp/x", "events": "off", "max_endpoints": "4"}
    dp = Agent(cfg).make_datapath()
    assert isinstance(dp, NoopDatapath)
    assert dp.config.options["events"] == "off" and dp.config.state_dir == str(tmp_path / "s")
    with pytest.raises(UsageError, match="--datapath-opt expects KEY=VALUE"):
        build_agent_config(parser.parse_args(["agent", "run", "--datapath-opt", "novalue"]))
    conf.write_text("datapath_options: [1, 2]\n")
    with pytest.raises(ConfigError, match="datapath_options must be a mapping"):
        build_agent_config(parser.parse_args(["agent", "run", "--config", str(conf)]))


def test_declared_options_are_checked_at_build(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from axoneme.core import datapath as dpmod
    from axoneme.core.datapath import DatapathOption

    class Strict(NoopDatapath):
        name = "strict"
        options = (DatapathOption("policy_map_max", int, 16384, "entries per endpoint"),)

    monkeypatch.setattr(dpmod, "load_class", lambda group, name: Strict)
    agent = Agent(AgentConfig(datapath="strict", state_dir=str(tmp_path), policy_map_max=9,
                              iptables_mode="ipset"))
    dp = agent.make_datapath()
    # only what it declares: the iptables mode flag is not its business
    assert dp.config.options == {"policy_map_max": 9} and dp.config.policy_map_max == 9
    assert agent.store.state_dict()["datapath_options"] == {"policy_map_max": 9}
    agent.config.datapath_options = {"colour": "red"}
    with pytest.raises(ConfigError, match="unknown datapath option 'colour' for datapath 'strict'"):
        agent.make_datapath()


# -- the agent's shape ---------------------------------------------------------------------------

def test_only_the_entry_points_import_the_composition_root() -> None:
    """Services never import the agent (they are handed what they need)."""
    src = Path(nl.__file__).parent
    importers = set()
    for f in src.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "axoneme.agent._agent":
                importers.add(f.relative_to(src).as_posix())
    assert importers == {"_api.py", "_daemon.py"}, importers
    too_long = {f.name: n for f in src.rglob("*.py")
                if (n := len(f.read_text().splitlines())) > 500}
    assert not too_long, too_long


def test_status_and_endpoint_get_read_the_computed_state(tmp_path: Path) -> None:
    """Issue 17: ``endpoint get`` serves the engine's computed MapState (no
    recompute; O(that endpoint's entries)); ``status`` and lists do not
    depend on policy size (no recompute, no datapath dump)."""
    node = Node(tmp_path)

    async def go() -> None:
        await node.add("web", {"app": "web"})
        await node.add("client", {"app": "client"})
        web = node.endpoint("web")
        await node.agent.policies.apply([_allow_web_from_client(80)])
        engine, dp = node.agent.engine, node.dp
        calls: list[str] = []
        real_update, real_dump = engine._update, dp.dump
        engine._update = lambda *a, **k: calls.append("recompute") or real_update(*a, **k)  # type: ignore[method-assign]
        dp.dump = lambda ep: calls.append("dump") or real_dump(ep)  # type: ignore[method-assign]
        views = node.agent.views
        st = views.status()
        assert st["components"]["policies"]["count"] == 1
        views.endpoint_list()
        node.agent.policies.listing()
        assert calls == []  # neither recomputes nor reads the kernel back
        got = views.endpoint_get(web.id)
        assert calls == ["dump"]  # the kernel's copy, for in_sync; the policy is the engine's
        assert got["in_sync"] is True
        assert {e["key"] for e in got["policy"]} == {str(k) for k in engine.resolve(web.id)}

    run(go)
