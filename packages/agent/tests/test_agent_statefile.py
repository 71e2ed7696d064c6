"""The agent's state file, damaged (issue 13 item 8): every variant ends in a
clean ``StateCorrupt`` naming the file and the field (``agent run`` exits 2
with ``error: state file PATH is corrupt: WHAT``), never a traceback; and a
short ``os.write`` never leaves a truncated state file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from axoneme.agent import _statefile
from axoneme.agent._agent import Agent
from axoneme.agent._config import AgentConfig
from axoneme.agent._errors import PersistedPolicyError
from axoneme.agent._statefile import StateCorrupt, read_agent_state, read_json, write_json_atomic

HUGE = "9" * 5000
POLICY = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
          "metadata": {"name": "deny", "namespace": "default"},
          "spec": {"endpointSelector": {}, "ingress": [{"toPorts": [{"ports": [{"port": "PORT"}]}]}]}}
PORT_PATH = "policies.CiliumNetworkPolicy/default/deny.doc.obj.spec.ingress[0].toPorts[0].ports[0].port"


def _policy_state(port: str) -> str:
    doc = json.dumps(POLICY).replace('"PORT"', port)
    return ('{"version": 1, "policy_revision": 1, "policies": {"CiliumNetworkPolicy/default/deny": '
            '{"source": "api", "revision": 1, "doc": {"file": "<api>", "index": 0, "obj": ' + doc + '}}}}')


# (state.json text, what the error says after "is corrupt: ")
VARIANTS = {
    "5000-digit number": ('{"version": 1, "next_endpoint_id": ' + HUGE + "}",
                          "next_endpoint_id: integer 999999999999999999999999… (5000 characters) "
                          "out of range (64-bit)"),
    "100k nested brackets": ('{"version": 1, "pods": ' + "[" * 100_000 + "]" * 100_000 + "}",
                             "invalid JSON: nesting deeper than 110 levels"),
    "1e999 version": ('{"version": 1e999}', "version: number inf is not finite"),
    "non-integer revision": ('{"version": 1, "policy_revision": "7"}',
                             "policy_revision: expected an integer, got string 7"),
    "float revision": ('{"version": 1, "policy_revision": 1.5}',
                       "policy_revision: expected an integer, got number 1.5"),
    "huge port in a persisted policy": (_policy_state(HUGE), f"{PORT_PATH}: integer 9999"),
    "non-mapping pod": ('{"version": 1, "pods": {"default/a": [1]}}',
                        "pods.default/a: expected a mapping, got list"),
    "policies a list": ('{"version": 1, "policies": []}', "policies: expected a mapping, got list"),
    "identity key": ('{"version": 1, "identities": {"²": ["k8s:a=b"]}}',
                     "identities.²: expected an identity number as the key"),
}


def _agent(tmp_path: Path, text: str) -> Agent:
    state_dir = tmp_path / "state"
    state_dir.mkdir(exist_ok=True)
    (state_dir / "state.json").write_text(text)
    return Agent(AgentConfig(datapath="noop", state_dir=str(state_dir), guard=False))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_agent_load_state_refuses_each_variant_cleanly(tmp_path: Path, variant: str) -> None:
    """Before: OverflowError/ValueError/RecursionError escaped load_state (a
    traceback from `agent run`), or the value was silently truncated (1.5)."""
    text, what = VARIANTS[variant]
    agent = _agent(tmp_path, text)
    with pytest.raises(StateCorrupt) as info:
        agent.load_state()
    path = str(tmp_path / "state" / "state.json")
    assert info.value.path == path
    msg = str(info.value)
    assert msg.startswith(f"state file {path} is corrupt: {what}"), msg
    assert len(msg) < 600


def test_non_mapping_policy_record_is_named_by_the_restore_path(tmp_path: Path) -> None:
    """A non-dict policy record: load_state passes it on, the restore path
    refuses to start naming it (never a traceback, never dropped silently)."""
    agent = _agent(tmp_path, '{"version": 1, "policies": {"CiliumNetworkPolicy/default/x": 5}}')
    agent.load_state()
    with pytest.raises(PersistedPolicyError, match="CiliumNetworkPolicy/default/x no longer parses"):
        agent.policies.restore()


@pytest.mark.parametrize("variant", ["5000-digit number", "100k nested brackets", "1e999 version",
                                     "non-integer revision", "huge port in a persisted policy"])
def test_agent_run_exits_2_naming_file_and_field(tmp_path: Path, variant: str) -> None:
    text, what = VARIANTS[variant]
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / "state.json").write_text(text)
    cli = "import sys; from axoneme.agent.cli import main; sys.exit(main(sys.argv[1:]))"
    r = subprocess.run([sys.executable, "-c", cli, "agent", "run", "--datapath", "noop", "--no-guard",
                        "--state-dir", str(state_dir), "--api-socket", str(tmp_path / "api.sock")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    assert f"error: state file {state_dir / 'state.json'} is corrupt: {what}" in r.stderr, r.stderr
    assert (state_dir / "state.json").read_text() == text  # left as it was, for the operator


def test_a_valid_state_still_loads(tmp_path: Path) -> None:
    state = {"version": 1, "policy_revision": 3, "next_endpoint_id": 2, "namespaces": {"default": {}},
             "pods": {}, "endpoints": {}, "identities": {"256": ["k8s:a=b"]}, "policies": {},
             "datapath": "noop"}
    path = str(tmp_path / "state.json")
    write_json_atomic(path, state)
    assert read_agent_state(path) == state
    assert read_agent_state(str(tmp_path / "absent.json")) is None


def test_short_writes_are_completed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: one os.write() call; a short write left a truncated state file."""
    real_write = os.write
    calls = 0

    def one_byte(fd: int, data: Any) -> int:
        nonlocal calls
        calls += 1
        return real_write(fd, bytes(data[:1]))

    monkeypatch.setattr(_statefile.os, "write", one_byte)
    path = str(tmp_path / "state.json")
    state = {"version": 1, "pods": {"default/a": {"name": "a" * 100}}}
    write_json_atomic(path, state)
    monkeypatch.undo()
    assert read_json(path) == state
    assert calls == len(json.dumps(state, indent=1, sort_keys=True).encode())
    assert os.listdir(tmp_path) == ["state.json"]


def test_failed_write_keeps_the_old_state_and_no_temp_file(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "state.json")
    write_json_atomic(path, {"version": 1})
    written = 0

    def enospc_after_10(fd: int, data: Any) -> int:
        nonlocal written
        if written >= 10:
            raise OSError(28, "No space left on device")
        n = os.pwrite(fd, bytes(data[:5]), written)
        written += n
        return n

    monkeypatch.setattr(_statefile.os, "write", enospc_after_10)
    with pytest.raises(OSError):
        write_json_atomic(path, {"version": 1, "pods": {"x": {"name": "y" * 50}}})
    monkeypatch.undo()
    assert read_json(path) == {"version": 1}
    assert os.listdir(tmp_path) == ["state.json"]


# -- the policy journal (issue 17): a policy change writes only itself --------------

def _store(tmp_path: Path) -> Any:
    from axoneme.agent._metrics import AgentMetrics
    from axoneme.agent._state import StateStore

    state_dir = tmp_path / "state"
    state_dir.mkdir(exist_ok=True)
    return StateStore(AgentConfig(datapath="noop", state_dir=str(state_dir), guard=False),
                      AgentMetrics())


def _rec(name: str) -> dict[str, Any]:
    obj = json.loads(json.dumps(POLICY).replace('"PORT"', '"80"').replace('"deny"', f'"{name}"'))
    return {"source": "api", "revision": 1, "doc": {"file": "<api>", "index": 0, "obj": obj}}


def test_policy_changes_are_journaled_and_replayed(tmp_path: Path) -> None:
    import asyncio

    from axoneme.agent._state import read_persisted

    store = _store(tmp_path)
    big = {f"CiliumNetworkPolicy/default/p{i}": _rec(f"p{i}") for i in range(50)}
    store.policy_docs.update(big)
    asyncio.run(store.persist())  # the full write: every policy
    state_file = Path(store.config.state_file)
    full = state_file.read_text()
    store.policy_docs["CiliumNetworkPolicy/default/new"] = _rec("new")
    asyncio.run(store.persist_policies(["CiliumNetworkPolicy/default/new"], 7))
    del store.policy_docs["CiliumNetworkPolicy/default/p3"]
    asyncio.run(store.persist_policies(["CiliumNetworkPolicy/default/p3"], 8))
    journal = Path(store.journal_file)
    # the state file is untouched; each change is one short record
    assert state_file.read_text() == full
    lines = journal.read_bytes().splitlines()
    assert len(lines) == 2 and all(len(line) < 1000 for line in lines)
    # a crash while appending leaves a torn last line: dropped
    with open(journal, "ab") as f:
        f.write(b'{"seq": 3, "policies": {"CiliumNetw')
    loaded = read_persisted(str(state_file))
    assert loaded is not None
    assert set(loaded["policies"]) == set(store.policy_docs) and loaded["policy_revision"] == 8
    again = _store(tmp_path)
    assert again.load() is not None
    assert again.policy_docs == store.policy_docs
    # the next full write holds everything and empties the journal; a journal
    # left behind by a crash before that unlink replays nothing older
    stale = journal.read_bytes()
    asyncio.run(again.persist())
    assert not journal.exists()
    journal.write_bytes(stale)
    third = _store(tmp_path)
    assert third.load() is not None and third.policy_docs == store.policy_docs


def test_a_bad_journal_record_is_state_corrupt(tmp_path: Path) -> None:
    import asyncio

    store = _store(tmp_path)
    asyncio.run(store.persist())
    Path(store.journal_file).write_text('{"seq": 1}\nnot json\n')
    with pytest.raises(StateCorrupt, match=r"state\.json\.journal is corrupt: line 2"):
        _store(tmp_path).load()


def test_journal_is_synced_before_flush_returns(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """flush_journal fdatasyncs the journal before it returns, on the loop while
    the disk is fast and in a worker thread after a slow (or failed) one."""
    import asyncio
    import threading

    from axoneme.agent import _state

    store = _store(tmp_path)
    asyncio.run(store.persist())
    synced: list[tuple[str, bool]] = []
    slow = {"on": False}

    def fdatasync(fd: int) -> None:  # the disk's speed is the test's: fast or slow
        if slow["on"]:
            import time

            time.sleep(2 * _state.INLINE_SYNC_S)
        synced.append((os.readlink(f"/proc/self/fd/{fd}"),
                       threading.current_thread() is threading.main_thread()))

    monkeypatch.setattr(os, "fdatasync", fdatasync)

    async def change(i: int) -> None:
        key = f"CiliumNetworkPolicy/default/p{i}"
        store.policy_docs[key] = _rec(f"p{i}")
        await store.persist_policies([key], i)
        before = len(synced)
        await store.flush_journal()
        assert len(synced) == before + 1 and synced[-1][0] == store.journal_file

    async def run() -> None:
        for i in range(3):
            await change(i)
        slow["on"] = True
        await change(3)  # judged fast: on the loop; it was slow
        await change(4)  # so this one in a thread
        slow["on"] = False
        await change(5)  # the thread's was slow too: still a thread
        await change(6)  # fast again: back on the loop

    asyncio.run(run())
    # the first append makes the file (append_line syncs it itself): then the flushes
    assert [main for _, main in synced] == [True, False, True, True, True, False, False, True]


def test_state_written_in_pieces_is_the_same_bytes(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The state file is written a piece at a time (no whole text in memory at
    100k identities): the bytes are json.dumps(indent=1, sort_keys=True)'s,
    across piece boundaries, non-ASCII text and nesting included."""
    writes: list[int] = []
    real_write = os.write

    def counted(fd: int, data: Any) -> int:
        writes.append(len(data))
        return real_write(fd, data)

    state = {"version": 1, "z": None, "identities": {str(n): [f"cidr:10.{n >> 8}.{n & 255}.1/32",
                                                              "reserved:world"]
                                                     for n in range(20_000)},
             "pods": {"default/é": {"name": "ü" * 300, "labels": {"b": "2", "a": "1"}}},
             "nums": [1.5, -2, True, False, [], {}]}
    monkeypatch.setattr(_statefile.os, "write", counted)
    path = tmp_path / "state.json"
    write_json_atomic(str(path), state)
    monkeypatch.undo()
    assert path.read_bytes() == json.dumps(state, indent=1, sort_keys=True).encode()
    assert len(writes) > 10 and max(writes) < 2 * _statefile._WRITE_PIECE
    write_json_atomic(str(path), [])  # a tiny document: one piece
    assert path.read_bytes() == b"[]"


def test_a_file_that_grows_while_read_is_read_whole(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The read is sized by fstat; a file longer than that (it grew) is still
    read to its end, and one over the cap is refused."""
    path = tmp_path / "state.json"
    state = {"version": 1, "pods": {"a": {"name": "x" * 1000}}}
    path.write_text(json.dumps(state))
    real = os.fstat

    class Small:
        def __init__(self, st: os.stat_result) -> None:
            self.st_size = 5

    monkeypatch.setattr(_statefile.os, "fstat", lambda fd: Small(real(fd)))
    assert read_json(str(path)) == state
    monkeypatch.setattr(_statefile, "STATE_MAX_BYTES", 100)
    with pytest.raises(StateCorrupt, match="larger than"):
        read_json(str(path))


def test_the_journal_is_kept_open_and_reopened_when_its_path_changes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Journal records go to the file kept open (one write each, no open per
    record: issue 17, B5CUT); a journal removed or replaced behind the agent's
    back is opened anew, so no record goes to a file the path no longer names;
    the full write closes and empties it."""
    import asyncio

    store = _store(tmp_path)
    asyncio.run(store.persist())
    opened: list[str] = []
    real_open = os.open

    def counted(path: Any, *args: Any, **kwargs: Any) -> int:
        opened.append(str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", counted)  # the module _statefile opens with
    journal = Path(store.journal_file)

    def change(i: int) -> None:
        key = f"CiliumNetworkPolicy/default/p{i}"
        store.policy_docs[key] = _rec(f"p{i}")
        asyncio.run(store.persist_policies([key], i))
        asyncio.run(store.flush_journal())

    for i in range(4):
        change(i)
    assert opened.count(str(journal)) == 1  # the first record made it, the rest appended
    assert len(journal.read_bytes().splitlines()) == 4
    journal.unlink()  # removed behind the agent's back: the next record makes it again
    change(4)
    assert [json.loads(x)["seq"] for x in journal.read_bytes().splitlines()] == [5]
    journal.rename(tmp_path / "old")  # replaced: the next record goes to the new file
    journal.write_bytes(b"")
    change(5)
    assert [json.loads(x)["seq"] for x in journal.read_bytes().splitlines()] == [6]
    assert opened.count(str(journal)) == 3
    asyncio.run(store.persist())  # the full write holds every record: the journal goes
    assert not journal.exists()
    change(6)
    assert [json.loads(x)["seq"] for x in journal.read_bytes().splitlines()] == [7]
    again = _store(tmp_path)
    assert again.load() is not None and again.policy_docs == store.policy_docs
