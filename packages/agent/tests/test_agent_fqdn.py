"""toFQDNs in the agent (FQDNManager, no kernel) and `policy trace --dns-answer`."""

from __future__ import annotations

import asyncio
import json
import types
from pathlib import Path
from typing import Any

import pytest
from axoneme.agent._fqdn import FQDN_STATE_FILE, FQDNManager
from axoneme.agent.cli import main
from axoneme.core.errors import ConfigError
from axoneme.core.identity import IdentityAllocator
from axoneme.core.plugins import GROUP_L7, installed, make_plugin_manager
from axoneme.core.policy.api import FQDNPeer
from axoneme.core.policy.engine import PolicyEngine

ROOT = Path(__file__).resolve().parents[3]
DEMO = ROOT / "examples" / "demo"

pytestmark = pytest.mark.skipif("dns" not in installed(GROUP_L7),
                                reason="the dns L7 parser is not installed")

POLICY = {
    "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
    "metadata": {"name": "to-twitter", "namespace": "default"},
    "spec": {"endpointSelector": {"matchLabels": {"id": "app2"}},
             "egress": [{"toFQDNs": [{"matchName": "api.twitter.com"},
                                     {"matchPattern": "*.example.com"}],
                         "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}]}]},
}


class FakeAgent:
    """What FQDNManager is given: config, engine, pm, lock, the regenerator's push."""

    def __init__(self, state_dir: Path, **conf: Any) -> None:
        self.config = types.SimpleNamespace(state_dir=str(state_dir), **conf)
        self.engine = PolicyEngine(IdentityAllocator())
        self.pm = make_plugin_manager()
        self.lock = asyncio.Lock()
        self.metrics: Any = None
        self.pushes: list[Any] = []

    def regenerate_sync(self) -> dict[int, str]:
        self.pushes.append(self.engine.pending_ipcache_changes())
        return {}


def manager(agent: FakeAgent) -> FQDNManager:
    return FQDNManager(agent.config, agent.engine, agent.regenerate_sync,  # type: ignore[arg-type]
                       agent.pm, agent.lock, agent.metrics)


def apply_policy(agent: FakeAgent) -> None:
    from axoneme.core.policy.parse import parse_policy_obj

    agent.engine.upsert_policy(parse_policy_obj(POLICY, "<test>", 0))


def test_answer_pushes_cidr_identity_and_survives_restart(tmp_path: Path) -> None:
    agent = FakeAgent(tmp_path)
    apply_policy(agent)
    mgr = manager(agent)
    assert mgr.start()
    assert mgr.proxy_kwargs("http") == {}
    kw = mgr.proxy_kwargs("dns")
    assert kw["cache"] is mgr.cache and kw["dns_config"].reject_rcode == "REFUSED"
    mgr.cache.record("api.twitter.com", ["198.51.100.10"], 60)
    asyncio.run(kw["on_answer"]("api.twitter.com.", frozenset({"198.51.100.10"}), 60))
    assert agent.pushes and "198.51.100.10/32" in {str(k) for k in agent.pushes[-1].upserts}
    assert agent.engine.identity_of_ip("198.51.100.10") != agent.engine.identity_of_ip(
        "198.51.100.99")
    saved = json.loads((tmp_path / FQDN_STATE_FILE).read_text())
    assert any(e["ip"] == "198.51.100.10" for e in saved["entries"])

    # a new agent (restart) restores the name before any DNS traffic
    agent2 = FakeAgent(tmp_path)
    apply_policy(agent2)
    mgr2 = manager(agent2)
    mgr2.start()
    peer = FQDNPeer(match_name="api.twitter.com")
    assert mgr2.cache.lookup(peer) == {"198.51.100.10"}
    assert agent2.engine.identity_of_ip("198.51.100.10") != agent2.engine.identity_of_ip(
        "198.51.100.99")


def test_answer_to_allowed_is_measured_once_per_change(tmp_path: Path) -> None:
    from axoneme.agent._metrics import AgentMetrics

    agent = FakeAgent(tmp_path)
    agent.metrics = AgentMetrics()
    apply_policy(agent)
    mgr = manager(agent)
    mgr.start()
    on_answer = mgr.proxy_kwargs("dns")["on_answer"]

    def count() -> float:
        return agent.metrics.registry.get_sample_value(  # type: ignore[no-any-return]
            "axoneme_fqdn_answer_to_allowed_seconds_count") or 0.0

    mgr.cache.record("api.twitter.com", ["198.51.100.10"], 60)
    asyncio.run(on_answer("api.twitter.com.", frozenset({"198.51.100.10"}), 60))
    assert count() == 1
    # the same answer again changes nothing: no datapath push, nothing measured
    mgr.cache.record("api.twitter.com", ["198.51.100.10"], 60)
    asyncio.run(on_answer("api.twitter.com.", frozenset({"198.51.100.10"}), 60))
    assert count() == 1 and len(agent.pushes) == 1
    mgr.cache.record("sub.example.com", ["198.51.100.12"], 60)
    asyncio.run(on_answer("sub.example.com.", frozenset({"198.51.100.12"}), 60))
    assert count() == 2


def test_expiry_revokes(tmp_path: Path) -> None:
    agent = FakeAgent(tmp_path)
    apply_policy(agent)
    mgr = manager(agent)
    mgr.start()
    mgr.cache.record("sub.example.com", ["198.51.100.12"], 60)
    mgr.push()
    learned = agent.engine.identity_of_ip("198.51.100.12")
    assert mgr.cache.expire(now=1e12)  # far future: everything is due
    mgr._dirty = True
    mgr.push()
    assert agent.engine.identity_of_ip("198.51.100.12") != learned
    assert mgr.view() == []


def test_config_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        manager(FakeAgent(tmp_path, dns_reject_rcode="SERVFAIL"))
    with pytest.raises(ConfigError):
        manager(FakeAgent(tmp_path, tofqdns_min_ttl=-1))
    mgr = manager(FakeAgent(tmp_path, dns_reject_rcode="nxdomain", tofqdns_min_ttl=30))
    mgr.start()
    assert mgr.cache.min_ttl == 30
    assert mgr.proxy_kwargs("dns")["dns_config"].reject_rcode == "NXDOMAIN"


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_trace_dns_answer(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    pol = tmp_path / "fqdn.json"
    pol.write_text(json.dumps(POLICY))
    base = ("policy", "trace", "--cluster", str(DEMO / "cluster.yaml"), "-f", str(pol),
            "--from", "default/app2", "--port", "80", "-o", "json")
    code, out, _ = run(capsys, *base, "--to", "198.51.100.10")
    assert code == 0 and json.loads(out)["verdict"] == "denied"  # never resolved
    code, out, _ = run(capsys, *base, "--to", "198.51.100.10",
                       "--dns-answer", "api.twitter.com=198.51.100.10")
    assert code == 0 and json.loads(out)["verdict"] == "allowed"
    # wildcard: one label under example.com only
    code, out, _ = run(capsys, *base, "--to", "198.51.100.12",
                       "--dns-answer", "sub.example.com=198.51.100.12,198.51.100.13")
    assert json.loads(out)["verdict"] == "allowed"
    code, out, _ = run(capsys, *base, "--to", "198.51.100.14",
                       "--dns-answer", "example.com=198.51.100.14")
    assert json.loads(out)["verdict"] == "denied"
    code, _, err = run(capsys, *base, "--to", "198.51.100.10", "--dns-answer", "api.twitter.com")
    assert code == 2 and "--dns-answer" in err
    code, _, err = run(capsys, *base, "--to", "198.51.100.10", "--dns-answer", "a.io=not-an-ip")
    assert code == 2 and "not-an-ip" in err


def test_policy_change_resyncs_only_new_selectors(tmp_path: Path) -> None:
    """A policy change that keeps the toFQDNs selectors costs no push and no
    snapshot write; one that adds a selector gives it the cache's IPs and pushes."""
    from axoneme.core.policy.parse import parse_policy_obj

    agent = FakeAgent(tmp_path)
    apply_policy(agent)
    mgr = manager(agent)
    mgr.start()
    mgr.cache.record("api.twitter.com", ["198.51.100.10"], 60)
    mgr.cache.record("db.example.org", ["198.51.100.20"], 60)
    mgr.push()
    pushes = len(agent.pushes)
    snap = tmp_path / FQDN_STATE_FILE
    snap.unlink()
    other = json.loads(json.dumps(POLICY))
    other["metadata"]["name"] = "same-selectors"
    agent.engine.upsert_policy(parse_policy_obj(other, "<test>", 0))
    mgr.policy_changed()
    mgr.push()
    assert len(agent.pushes) == pushes and not snap.exists()

    new = json.loads(json.dumps(POLICY))
    new["metadata"]["name"] = "to-db"
    new["spec"]["egress"][0]["toFQDNs"] = [{"matchName": "db.example.org"}]
    agent.engine.upsert_policy(parse_policy_obj(new, "<test>", 0))
    assert agent.engine.identity_of_ip("198.51.100.20") == agent.engine.identity_of_ip(
        "198.51.100.99")  # not resolved yet: the selector is new
    mgr.policy_changed()
    mgr.push()
    assert len(agent.pushes) == pushes + 1
    assert "198.51.100.20/32" in {str(k) for k in agent.pushes[-1].upserts}
    assert agent.engine.identity_of_ip("198.51.100.20") != agent.engine.identity_of_ip(
        "198.51.100.99")
    assert not snap.exists()  # the cache itself did not change
    # removing it changes the selector set again; the engine forgets its IP
    agent.engine.delete_policy(parse_policy_obj(new, "<test>", 0).ref)
    mgr.policy_changed()
    assert agent.engine.fqdn_selectors() == sorted(
        mgr._selectors, key=lambda p: (p.match_name or "", p.match_pattern or ""))
