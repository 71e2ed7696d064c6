"""Fail-open paths of the agent (issue 13, item 5), proved without a kernel:
the agent runs in-process on a NoopDatapath (or a subclass that fails on
purpose) and the test checks what the datapath was told."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from axoneme.agent._agent import Agent
from axoneme.agent._config import AgentConfig
from axoneme.agent._errors import DROPPED_POLICIES_FILE, PersistedPolicyError

GOOD = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "good", "namespace": "default"},
        "spec": {"endpointSelector": {"matchLabels": {"app": "web"}},
                 "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "client"}}]}]}}
# a default-deny whose port no longer validates (say, after an upgrade)
BAD = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
       "metadata": {"name": "deny-all", "namespace": "default"},
       "spec": {"endpointSelector": {},
                "ingress": [{"toPorts": [{"ports": [{"port": "99999"}]}]}]}}


def _record(obj: dict[str, Any], rev: int) -> dict[str, Any]:
    return {"doc": {"file": "<api>", "index": 0, "obj": obj}, "source": "api", "revision": rev}


def _state(tmp_path: Path) -> Path:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / "state.json").write_text(json.dumps({
        "version": 1, "policy_revision": 2,
        "policies": {"CiliumNetworkPolicy/default/good": _record(GOOD, 1),
                     "CiliumNetworkPolicy/default/deny-all": _record(BAD, 2),
                     "CiliumNetworkPolicy/default/junk": "not a record"}}))
    return state_dir


def test_unparseable_persisted_policy_refuses_start_naming_it(tmp_path: Path) -> None:
    state_dir = _state(tmp_path)
    agent = Agent(AgentConfig(datapath="noop", state_dir=str(state_dir), guard=False))
    agent.load_state()
    with pytest.raises(PersistedPolicyError) as info:
        agent.policies.restore()
    msg = str(info.value)
    assert "persisted policy CiliumNetworkPolicy/default/deny-all no longer parses: " \
           "spec.ingress[0].toPorts[0].ports[0].port" in msg
    assert "persisted policy CiliumNetworkPolicy/default/junk no longer parses" in msg
    assert "--drop-unparseable-policies" in msg
    assert str(state_dir / "state.json") in msg
    # nothing was dropped: the state still holds both
    assert "CiliumNetworkPolicy/default/deny-all" in agent.store.policy_docs
    assert "deny-all" in (state_dir / "state.json").read_text()


def test_drop_unparseable_policies_drops_loudly_and_keeps_a_copy(tmp_path: Path) -> None:
    state_dir = _state(tmp_path)
    agent = Agent(AgentConfig(datapath="noop", state_dir=str(state_dir), guard=False,
                              drop_unparseable_policies=True))
    agent.load_state()
    agent.policies.restore()
    assert [p.ref.name for p in agent.engine.policies()] == ["good"]
    assert set(agent.store.policy_docs) == {"CiliumNetworkPolicy/default/good"}
    dropped = {d["policy"]: d for d in agent.policies.dropped}
    assert set(dropped) == {"CiliumNetworkPolicy/default/deny-all",
                            "CiliumNetworkPolicy/default/junk"}
    assert "spec.ingress[0].toPorts[0].ports[0].port" in \
        dropped["CiliumNetworkPolicy/default/deny-all"]["problem"]
    kept = json.loads((state_dir / DROPPED_POLICIES_FILE).read_text())
    assert kept["CiliumNetworkPolicy/default/deny-all"]["record"]["doc"]["obj"] == BAD
    status = agent.views.status()["components"]["policies"]
    assert {d["policy"] for d in status["dropped_at_start"]} == set(dropped)


# -- agent on a datapath that fails on purpose ---------------------------------------------

import asyncio  # noqa: E402
import ipaddress  # noqa: E402

from axoneme.agent._records import EndpointRecord, PodRecord  # noqa: E402
from axoneme.core.datapath import IPCacheChanges, NoopDatapath  # noqa: E402
from axoneme.core.endpoint import Endpoint  # noqa: E402
from axoneme.core.errors import DatapathProgramError, MapFullError  # noqa: E402
from axoneme.core.mapstate import Direction, MapChanges, MapState  # noqa: E402


class FlakyIPCache(NoopDatapath):
    """Fails the first ``fails`` ipcache writes."""

    def __init__(self, fails: int) -> None:
        super().__init__()
        self.fails = fails
        self.calls = 0

    def ipcache_apply(self, changes: IPCacheChanges) -> None:
        self.calls += 1
        if self.fails > 0:
            self.fails -= 1
            raise DatapathProgramError("ipcache update", 12, "injected failure")
        super().ipcache_apply(changes)


class SmallPolicyMap(NoopDatapath):
    """A policy map of ``max_entries`` per endpoint, atomic as the real ones."""

    def __init__(self, max_entries: int) -> None:
        super().__init__()
        self.max_entries = max_entries

    def _check(self, ep: Endpoint, state: MapState) -> None:
        if len(state) > self.max_entries:
            raise MapFullError(f"policy map of endpoint {ep.id} would hold {len(state)} entries "
                               f"(policy_map_max {self.max_entries}); nothing applied")

    def apply(self, endpoint: Endpoint, changes: MapChanges) -> None:
        self._check(endpoint, self.dump(endpoint).apply(changes))
        super().apply(endpoint, changes)

    def sync(self, endpoint: Endpoint, state: MapState) -> MapChanges:
        self._check(endpoint, state)
        return super().sync(endpoint, state)


def _agent(tmp_path: Path, dp: NoopDatapath, **cfg: Any) -> Agent:
    agent = Agent(AgentConfig(datapath="noop", state_dir=str(tmp_path / "state"), guard=False,
                              **cfg))
    (tmp_path / "state").mkdir(exist_ok=True)
    agent.datapath = dp
    return agent


def _add_endpoint(agent: Agent, ep_id: int, ip: str, app: str) -> Endpoint:
    name = f"p{ep_id}"
    agent.store.pods[f"default/{name}"] = PodRecord(name=name, namespace="default", labels={"app": app})
    rec = EndpointRecord(id=ep_id, container_id=f"c{ep_id}", ifname="eth0", netns_path="",
                         namespace="default", pod_name=name, ipv4=ip, host_ifname=f"lxct{ep_id}")
    agent.store.endpoints[rec.container_id] = rec
    ep = agent.endpoints.build_endpoint(rec)
    agent.store.endpoint_objs[ep_id] = ep
    agent.engine.upsert_endpoint(ep)
    assert agent.datapath is not None
    agent.datapath.endpoint_added(ep, *agent.engine.enforcement(ep_id))
    return ep


def _net(ip: str) -> Any:
    return ipaddress.ip_network(f"{ip}/32")


def test_failed_ipcache_write_is_kept_and_retried_until_it_lands(tmp_path: Path) -> None:
    dp = FlakyIPCache(fails=2)
    agent = _agent(tmp_path, dp)

    async def run() -> None:
        a = _add_endpoint(agent, 1, "10.244.7.2", "web")
        await agent.regenerator.regenerate()  # write 1 fails
        ipc = agent.views.status()["components"]["ipcache"]
        assert ipc["pending"] >= 1 and "injected failure" in ipc["last_error"]
        b = _add_endpoint(agent, 2, "10.244.7.3", "client")
        await agent.regenerator.regenerate()  # write 2 fails: both changes are kept, merged
        assert agent.views.status()["components"]["ipcache"]["pending"] >= 2
        assert dp.dump_ipcache() == {}
        await agent.regenerator.retry()  # write 3 succeeds
        assert dp.dump_ipcache()[_net("10.244.7.2")] == a.identity
        assert dp.dump_ipcache()[_net("10.244.7.3")] == b.identity
        ipc = agent.views.status()["components"]["ipcache"]
        assert ipc["pending"] == 0 and ipc["last_error"] == ""
        assert ipc["retries"] == 2

    asyncio.run(run())


def test_retry_backs_off_while_the_datapath_keeps_failing(tmp_path: Path) -> None:
    dp = FlakyIPCache(fails=100)
    agent = _agent(tmp_path, dp)

    async def run() -> None:
        _add_endpoint(agent, 1, "10.244.7.2", "web")
        await agent.regenerator.regenerate()
        calls = dp.calls
        await agent.regenerator.retry()
        await agent.regenerator.retry()  # within the backoff: no new attempt
        assert dp.calls == calls + 1
        assert agent.regenerator.retry_delay == 2.0

    asyncio.run(run())


def _allow_ports(name: str, ports: list[int]) -> dict[str, Any]:
    return {"obj": {
        "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"endpointSelector": {"matchLabels": {"app": "web"}},
                 "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "client"}}],
                              "toPorts": [{"ports": [{"port": str(p), "protocol": "TCP"}
                                                     for p in ports]}]}]}}}


def _ref(name: str) -> Any:
    from axoneme.core.policy.api import PolicyKind, PolicyRef

    return PolicyRef(PolicyKind.CILIUM_NETWORK_POLICY, "default", name)


def test_policy_map_full_fails_closed_then_a_policy_that_fits_restores(tmp_path: Path) -> None:
    dp = SmallPolicyMap(max_entries=3)
    agent = _agent(tmp_path, dp)

    async def run() -> None:
        web = _add_endpoint(agent, 1, "10.244.7.2", "web")
        _add_endpoint(agent, 2, "10.244.7.3", "client")
        await agent.regenerator.regenerate()
        await agent.policies.apply([_allow_ports("small", [80])])
        assert dp.fail_closed == {}
        assert dp.dump(web) == agent.engine.resolve(1)
        # a bigger policy does not fit: the endpoint fails closed on ingress
        # (the direction that changed) instead of keeping the older policy
        res = await agent.policies.apply([_allow_ports("big", list(range(8000, 8010)))])
        assert 1 in {int(k) for k in res["errors"]}
        assert dp.fail_closed[1] == frozenset({Direction.INGRESS})
        rec = agent.store.endpoints["c1"]
        assert rec.status.startswith("not-ready: policy map full: ")
        assert "failing closed (ingress)" in rec.status
        fc = agent.views.status()["components"]["fail_closed"]
        assert fc == [{"endpoint": 1, "directions": ["ingress"], "reason": fc[0]["reason"]}]
        assert "policy_map_max 3" in fc[0]["reason"]
        # the periodic retry keeps it closed while it does not fit
        await agent.regenerator.retry()
        assert dp.fail_closed[1] == frozenset({Direction.INGRESS})
        # deleting the big policy: it fits again, service is back
        await agent.policies.delete([_ref("big")])
        assert dp.fail_closed == {}
        assert dp.dump(web) == agent.engine.resolve(1)
        assert agent.store.endpoints["c1"].status == "ready"
        assert agent.views.status()["components"]["fail_closed"] == []

    asyncio.run(run())


def test_policy_map_full_keep_last_keeps_the_previous_policy(tmp_path: Path) -> None:
    dp = SmallPolicyMap(max_entries=3)
    agent = _agent(tmp_path, dp, policy_map_full="keep-last")

    async def run() -> None:
        web = _add_endpoint(agent, 1, "10.244.7.2", "web")
        _add_endpoint(agent, 2, "10.244.7.3", "client")
        await agent.regenerator.regenerate()
        await agent.policies.apply([_allow_ports("small", [80])])
        before = dp.dump(web)
        await agent.policies.apply([_allow_ports("big", list(range(8000, 8010)))])
        assert dp.fail_closed == {}
        assert dp.dump(web) == before
        assert "keep-last" in agent.store.endpoints["c1"].status

    asyncio.run(run())


class NoFailClosed(SmallPolicyMap):
    def endpoint_fail_closed(self, endpoint: Endpoint, directions: frozenset[Direction]) -> None:
        raise NotImplementedError


def test_policy_map_full_without_a_fail_closed_switch_removes_the_entries(tmp_path: Path) -> None:
    dp = NoFailClosed(max_entries=3)
    agent = _agent(tmp_path, dp)

    async def run() -> None:
        web = _add_endpoint(agent, 1, "10.244.7.2", "web")
        _add_endpoint(agent, 2, "10.244.7.3", "client")
        await agent.regenerator.regenerate()
        await agent.policies.apply([_allow_ports("small", [80])])
        assert any(k.direction is Direction.INGRESS for k in dp.dump(web))
        await agent.policies.apply([_allow_ports("big", list(range(8000, 8010)))])
        assert not any(k.direction is Direction.INGRESS for k in dp.dump(web))

    asyncio.run(run())


# -- a datapath write that fails, a state write that fails (failpoints) ---------------------

from axoneme.agent._errors import StateWriteError  # noqa: E402
from axoneme.core import failpoints  # noqa: E402


@pytest.fixture
def armed() -> Any:
    """The failpoint registry, enabled for the test and emptied after it."""
    failpoints.configure("1")
    try:
        yield failpoints.set_failpoint
    finally:
        failpoints.configure(None)


def _deny_client(name: str) -> dict[str, Any]:
    return {"obj": {
        "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"endpointSelector": {"matchLabels": {"app": "web"}},
                 "ingressDeny": [{"fromEndpoints": [{"matchLabels": {"app": "client"}}]}]}}}


def test_failed_datapath_write_fails_closed_until_a_retry_writes_it(
        tmp_path: Path, armed: Any) -> None:
    dp = NoopDatapath()
    agent = _agent(tmp_path, dp)

    async def run() -> None:
        web = _add_endpoint(agent, 1, "10.244.7.2", "web")
        _add_endpoint(agent, 2, "10.244.7.3", "client")
        await agent.regenerator.regenerate()
        await agent.policies.apply([_allow_ports("allow", [80])])
        allowed = dp.dump(web)
        armed("datapath.apply", "error")
        # the tightening cannot be written: the older (looser) policy must not
        # stay in force, the endpoint fails closed in the direction that changed
        res = await agent.policies.apply([_deny_client("deny")])
        assert "1" in res["errors"]
        assert dp.dump(web) == allowed  # the write really did not happen
        assert dp.fail_closed[1] == frozenset({Direction.INGRESS})
        assert "datapath write failed: failpoint datapath.apply" in agent.store.endpoints["c1"].status
        faults = agent.views.status()["faults"]
        assert any(f.startswith("endpoint 1: datapath write failed") and "failing closed (ingress)"
                   in f for f in faults), faults
        # retries keep it closed while writes fail
        agent.regenerator.retry_at = 0.0
        await agent.regenerator.retry()
        assert dp.fail_closed[1] == frozenset({Direction.INGRESS})
        armed("datapath.apply", "off")
        agent.regenerator.retry_at = 0.0
        await agent.regenerator.retry()
        assert dp.fail_closed == {}
        assert dp.dump(web) == agent.engine.resolve(1) != allowed
        assert agent.store.endpoints["c1"].status == "ready"
        assert agent.views.status()["faults"] == []

    asyncio.run(run())


def test_failed_ipcache_write_is_a_named_fault(tmp_path: Path, armed: Any) -> None:
    agent = _agent(tmp_path, NoopDatapath())

    async def run() -> None:
        armed("datapath.ipcache", "1*error")
        _add_endpoint(agent, 1, "10.244.7.2", "web")
        await agent.regenerator.regenerate()
        assert any(f.startswith("ipcache: failpoint datapath.ipcache")
                   for f in agent.views.status()["faults"])
        await agent.regenerator.retry()
        assert agent.views.status()["faults"] == []

    asyncio.run(run())


def test_api_policy_is_refused_and_undone_when_the_state_cannot_be_written(
        tmp_path: Path, armed: Any) -> None:
    dp = NoopDatapath()
    agent = _agent(tmp_path, dp)
    state_file = tmp_path / "state" / "state.json"

    async def run() -> None:
        web = _add_endpoint(agent, 1, "10.244.7.2", "web")
        _add_endpoint(agent, 2, "10.244.7.3", "client")
        await agent.regenerator.regenerate()
        await agent.policies.apply([_allow_ports("allow", [80])])
        before_kernel, before_file = dp.dump(web), state_file.read_text()
        armed("state.write", "error")
        # write-ahead: a policy the state file cannot record is not enforced
        # either (a restart would silently lose it); the caller is told
        with pytest.raises(StateWriteError, match="failpoint state.write"):
            await agent.policies.apply([_deny_client("deny")])
        assert [p.ref.name for p in agent.engine.policies()] == ["allow"]
        assert set(agent.store.policy_docs) == {"CiliumNetworkPolicy/default/allow"}
        with pytest.raises(StateWriteError):
            await agent.policies.delete([_ref("allow")])
        assert [p.ref.name for p in agent.engine.policies()] == ["allow"]
        await agent.regenerator.regenerate()
        assert dp.dump(web) == before_kernel
        assert state_file.read_text() == before_file
        st = agent.views.status()
        assert st["components"]["state"]["healthy"] is False
        assert any(f.startswith("state: cannot write ") and "failpoint state.write" in f
                   for f in st["faults"]), st["faults"]
        await agent.store.retry_persist()  # still failing: still named
        assert agent.views.status()["components"]["state"]["last_error"]
        armed("state.write", "off")
        await agent.store.retry_persist()
        assert agent.views.status()["components"]["state"] == {
            "dir": str(tmp_path / "state"), "healthy": True, "last_error": ""}
        await agent.policies.apply([_deny_client("deny")])
        # a policy change is appended to the state file's journal (O(the change))
        assert "deny" in state_file.read_text() + Path(f"{state_file}.journal").read_text()
        assert dp.dump(web) == agent.engine.resolve(1) != before_kernel

    asyncio.run(run())
