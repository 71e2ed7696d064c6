"""The restart checkpoint (agent/_checkpoint.py), without root: what makes a
start refuse to adopt the kernel's state at once. The kernel side (the
stamp in a pinned map, a restart serving it) is tests/e2e/test_e2e_restart_adopt.py."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
from axoneme.agent import _checkpoint as cp
from axoneme.agent._config import AgentConfig
from axoneme.agent._statefile import StateCorrupt, read_json
from axoneme.core.datapath import NoopDatapath


def _config(tmp_path: Path) -> AgentConfig:
    state = tmp_path / "state"
    state.mkdir()
    (state / "state.json").write_text(json.dumps({"version": 1, "policies": {}}))
    return AgentConfig(state_dir=str(state), api_socket=str(tmp_path / "a.sock"))


class _Stamped(NoopDatapath):
    """A datapath that keeps the stamp (as eBPF's pinned map does)."""

    stamp = ""

    def take_adopt_stamp(self) -> str:
        s, type(self).stamp = type(self).stamp, ""
        return s

    def set_adopt_stamp(self, stamp: str) -> bool:
        type(self).stamp = stamp
        return True


def test_a_clean_stop_leaves_what_the_next_start_adopts(tmp_path: Path) -> None:
    config = _config(tmp_path)
    dp = _Stamped()
    cp.leave(config, dp, "")
    ckpt = cp.take(config)
    assert ckpt is not None and not os.path.exists(cp.path_of(config))  # taken
    assert cp.adoptable(ckpt, cp.inputs_fingerprint(config), dp.take_adopt_stamp()) == ""
    assert cp.take(config) is None  # once


def test_a_blocker_or_a_datapath_without_stamps_leaves_nothing(tmp_path: Path) -> None:
    config = _config(tmp_path)
    dp = _Stamped()
    dp.stamp = ""
    cp.leave(config, dp, "datapath writes wait for a retry")
    assert cp.take(config) is None and dp.take_adopt_stamp() == ""
    cp.leave(config, NoopDatapath(), "")  # keeps no stamp: no checkpoint either
    assert not os.path.exists(cp.path_of(config))


@pytest.mark.parametrize("damage", ["garbage", "checksum", "version", "empty stamp"])
def test_a_damaged_checkpoint_is_refused_and_removed(tmp_path: Path, damage: str) -> None:
    config = _config(tmp_path)
    cp.write(config, cp.new_stamp(), cp.inputs_fingerprint(config))
    path = Path(cp.path_of(config))
    data = json.loads(path.read_text())
    if damage == "garbage":
        path.write_bytes(b"{\"version\": 1, \"stamp\": ")
    else:
        if damage == "checksum":
            data["stamp"] = cp.new_stamp()
        elif damage == "version":
            data["version"] = 2
            body = {k: data[k] for k in ("version", "stamp", "inputs")}
            data["checksum"] = cp._checksum(body)
        else:
            data["stamp"] = ""
            data["checksum"] = cp._checksum({k: data[k] for k in ("version", "stamp", "inputs")})
        path.write_text(json.dumps(data))
    assert cp.take(config) is None
    assert not path.exists()
    assert "no usable checkpoint" in cp.adoptable(None, "x", "y")


def test_a_change_while_down_or_another_stamp_is_no_adoption(tmp_path: Path) -> None:
    config = _config(tmp_path)
    stamp = cp.new_stamp()
    inputs = cp.inputs_fingerprint(config)
    ckpt = {"version": 1, "stamp": stamp, "inputs": inputs}
    assert cp.adoptable(ckpt, inputs, stamp) == ""
    assert "carries no stamp" in cp.adoptable(ckpt, inputs, "")
    assert "another stamp" in cp.adoptable(ckpt, inputs, cp.new_stamp())
    assert "Kubernetes" in cp.adoptable(ckpt, inputs, stamp, "Kubernetes mode")
    # each input counts: the state file, its journal, the FQDN cache, the configuration
    state = Path(config.state_file)
    state.write_text(state.read_text().replace("{}", '{"x": {}}'))
    assert cp.inputs_fingerprint(config) != inputs
    after_state = cp.inputs_fingerprint(config)
    Path(config.state_file + ".journal").write_text("{}\n")
    assert cp.inputs_fingerprint(config) != after_state
    after_journal = cp.inputs_fingerprint(config)
    (Path(config.state_dir) / "fqdn-cache.json").write_text("{}")
    assert cp.inputs_fingerprint(config) != after_journal
    other = dataclasses.replace(config, enforcement_mode="always")
    assert cp.inputs_fingerprint(other) != cp.inputs_fingerprint(config)
    assert "changed since the checkpoint" in cp.adoptable(ckpt, cp.inputs_fingerprint(config),
                                                          stamp)


def test_trusted_state_reads_the_same(tmp_path: Path) -> None:
    """The adopting start's plain JSON read gives what the checked read gives;
    an untrusted read still refuses what the agent never writes."""
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"version": 1, "policies": {"a": {"doc": {"obj": [1, "x"]}}}}))
    assert read_json(str(path), trusted=True) == read_json(str(path))
    path.write_text('{"version": NaN}')
    with pytest.raises(StateCorrupt):
        read_json(str(path))
    path.write_text('{"version": ')
    with pytest.raises(StateCorrupt):
        read_json(str(path), trusted=True)
