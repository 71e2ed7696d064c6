"""A big policy document is kept packed (zlib-compressed JSON) in the agent's
store and the engine's Policy keeps no copy of it (issue 17: a 100k-peer
``fromCIDR`` list is ~7 MB of str objects); every reader gets the document
as it was given: ``policy get -o yaml`` (listing with documents), the state
file, its journal, a restart's restore."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from axoneme.agent import _statefile
from axoneme.agent._agent import Agent
from axoneme.agent._config import AgentConfig
from axoneme.agent._statefile import PackedDocument
from axoneme.core.datapath import NoopDatapath

BIG_KEY = "CiliumNetworkPolicy/default/peers"
SMALL_KEY = "CiliumNetworkPolicy/default/small"


def _doc(name: str, peers: int) -> dict[str, Any]:
    # keys not in sorted order: the listing must give them back as given
    return {"kind": "CiliumNetworkPolicy", "apiVersion": "cilium.io/v2",
            "metadata": {"namespace": "default", "name": name, "labels": {"team": "b"}},
            "spec": {"endpointSelector": {"matchLabels": {"app": "srv"}},
                     "ingress": [{"fromCIDR": [f"10.{i // 65536}.{i // 256 % 256}.{i % 256}/32"
                                               for i in range(peers)],
                                  "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}]}]}}


def _agent(state_dir: Path) -> Agent:
    state_dir.mkdir(exist_ok=True)
    agent = Agent(AgentConfig(datapath="noop", state_dir=str(state_dir), guard=False))
    agent.datapath = NoopDatapath()
    return agent


def _documents(agent: Agent) -> dict[str, str]:
    return {f"{v['kind']}/{v['namespace']}/{v['name']}": json.dumps(v["document"])
            for v in agent.policies.listing(documents=True)}


def test_big_document_is_packed_and_read_back_as_given(tmp_path: Path) -> None:
    big, small = _doc("peers", 6000), _doc("small", 2)
    assert len(json.dumps(big)) > _statefile.PACK_MIN_BYTES > len(json.dumps(small))
    agent = _agent(tmp_path / "state")

    async def run() -> None:
        await agent.store.persist()  # a full write first: the changes go to the journal
        await agent.policies.apply([{"file": "a", "index": 0, "obj": big},
                                    {"file": "b", "index": 0, "obj": small}])

    asyncio.run(run())
    docs = agent.store.policy_docs
    assert isinstance(docs[BIG_KEY]["doc"]["obj"], PackedDocument)
    assert docs[SMALL_KEY]["doc"]["obj"] == small  # small ones stay as they are
    assert all(not p.raw for p in agent.engine.policies())  # no second copy
    assert _documents(agent) == {BIG_KEY: json.dumps(big), SMALL_KEY: json.dumps(small)}
    labels = {v["name"]: v["labels"] for v in agent.policies.listing()}
    assert labels == {"peers": {"team": "b"}, "small": {"team": "b"}}
    journal = [json.loads(line) for line in Path(agent.store.journal_file).read_text().splitlines()]
    assert journal[-1]["policies"][BIG_KEY]["doc"]["obj"] == big

    # the restart: the journal replayed over the state file, the documents packed again
    again = _agent(tmp_path / "state")
    again.load_state()
    again.policies.restore()
    assert isinstance(again.store.policy_docs[BIG_KEY]["doc"]["obj"], PackedDocument)
    # (the state file sorts keys, as it always did: the same objects)
    assert {k: json.loads(v) for k, v in _documents(again).items()} == {
        BIG_KEY: big, SMALL_KEY: small}
    by_ref = lambda e: sorted(e.engine.policies(), key=lambda p: p.ref.name)  # noqa: E731
    assert by_ref(again) == by_ref(agent) and len(by_ref(again)) == 2  # the same rules

    # the state file itself holds the document (the same bytes a dict would give)
    asyncio.run(again.store.persist())
    saved = json.loads((tmp_path / "state" / "state.json").read_text())
    assert saved["policies"][BIG_KEY]["doc"]["obj"] == big
    state = again.store.state_dict()
    assert (json.dumps(state, indent=1, sort_keys=True, default=_statefile.json_default)
            == (tmp_path / "state" / "state.json").read_text())


def test_pack_document_round_trip() -> None:
    big = _doc("peers", 6000)
    packed = _statefile.pack_document(big)
    assert isinstance(packed, PackedDocument) and len(packed.data) < len(json.dumps(big)) // 4
    assert json.dumps(packed.unpack()) == json.dumps(big)
    assert _statefile.pack_document(packed) is packed
    assert _statefile.unpack_document(big) is big
    small = _doc("small", 1)
    assert _statefile.pack_document(small) is small


def test_listing_does_not_decode_a_packed_document(tmp_path: Path, monkeypatch: Any) -> None:
    # `policy list` stays O(1) in a policy's size: its labels are kept beside the packed
    # bytes; only `policy get -o yaml` (documents=True) decodes
    agent = _agent(tmp_path / "state")
    asyncio.run(agent.policies.apply([{"file": "a", "index": 0, "obj": _doc("peers", 6000)}]))
    assert isinstance(agent.store.policy_docs[BIG_KEY]["doc"]["obj"], PackedDocument)

    def refuse(self: PackedDocument) -> Any:
        raise AssertionError("a packed document was decoded for a listing")

    monkeypatch.setattr(PackedDocument, "unpack", refuse)
    assert [v["labels"] for v in agent.policies.listing()] == [{"team": "b"}]
    unlabelled = _doc("bare", 6000)
    del unlabelled["metadata"]["labels"]
    assert _statefile.document_labels(_statefile.pack_document(unlabelled)) is None
