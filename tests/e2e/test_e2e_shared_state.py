"""One agent per state dir (and one iptables agent per network namespace).

A second agent on the same state dir used to run: the two overwrote each
other's state file and the second unlinked the first's API socket. Now the
state dir holds an flock for the agent's lifetime; the second agent exits 1
naming the holder, and `agent cleanup` refuses while an agent holds it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.privileged]

AXONEME = str(Path(sys.executable).parent / "axoneme")


def test_second_agent_on_one_state_dir_exits_1_and_leaves_the_first_alone(
        agent_factory: Any) -> None:
    first = agent_factory("noop")
    first.pod_run("p1", "sleep", "infinity")
    sock_inode = os.stat(first.socket).st_ino
    state_before = (first.state_dir / "state.json").read_bytes()

    second = agent_factory("noop", start=False)
    cmd = first.command()
    # same state dir, its own socket: only the state dir is shared
    cmd[cmd.index("--api-socket") + 1] = str(second.socket)
    res = subprocess.run(cmd, capture_output=True, text=True, env=first.env(), timeout=60)
    assert res.returncode == 1, res.stderr
    assert f"state dir {first.state_dir} is in use by agent pid {first.proc.pid}" in res.stderr
    assert "Traceback" not in res.stderr
    assert not second.socket.exists()

    # the same socket too: still refused, and the first agent's socket survives
    res = subprocess.run(first.command(), capture_output=True, text=True, env=first.env(),
                         timeout=60)
    assert res.returncode == 1, res.stderr
    assert os.stat(first.socket).st_ino == sock_inode
    status = first.json("status")
    assert status["endpoints"] == 1
    assert [p["name"] for p in first.json("pod", "list")] == ["p1"]
    assert (first.state_dir / "state.json").read_bytes() == state_before

    # cleanup refuses while the agent runs: nothing of it is touched
    res = subprocess.run([AXONEME, "agent", "cleanup", "--state-dir", str(first.state_dir)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stderr
    assert f"agent pid {first.proc.pid} is running with state dir {first.state_dir}" in res.stderr
    assert (first.state_dir / "state.json").exists()
    assert first.json("status")["endpoints"] == 1

    # once the first is gone (even killed), the dir is free again
    first.kill()
    res = subprocess.run([AXONEME, "agent", "cleanup", "--state-dir", str(first.state_dir)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert not first.state_dir.exists()


def _iptables_save() -> str:
    return subprocess.run(["iptables-save", "-t", "filter"], capture_output=True,
                          text=True).stdout


def test_second_iptables_agent_in_one_netns_exits_1(agent_factory: Any, datapath_probe: Any,
                                                    tmp_path: Path) -> None:
    """Two iptables agents in one network namespace share the AXON- chains and
    the NFLOG group: the second used to run "Ok" with no flow events at all."""
    import fcntl

    reason = datapath_probe("iptables")
    if reason is not None:
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    # other suites' iptables agents take this lock: wait for them instead of
    # meeting them (the agent itself refuses to run next to one)
    lock = open("/tmp/axoneme-iptables-datapath.lock", "w")  # noqa: SIM115
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        first = agent_factory("iptables")
        first.pod_run("p1", "sleep", "infinity")
        ep_id = first.json("endpoint", "list")[0]["id"]
        assert f":AXON-EP-{ep_id}-IN " in _iptables_save()

        second = agent_factory("iptables", start=False)
        res = subprocess.run(second.command(), capture_output=True, text=True,
                             env=second.env(), timeout=90)
        assert res.returncode == 1, res.stderr
        assert f"in use by agent pid {first.proc.pid}" in res.stderr
        assert f"state dir {first.state_dir}" in res.stderr
        assert "NFLOG group 7301" in res.stderr
        assert "Traceback" not in res.stderr
        assert not second.socket.exists()
        assert first.json("status")["datapath"]["healthy"] is True

        # cleaning up after another (dead) iptables agent must not remove the
        # running agent's chains: they are the same chains
        other = tmp_path / "other-state"
        other.mkdir()
        (other / "state.json").write_text('{"version": 1, "datapath": "iptables"}')
        res = subprocess.run([AXONEME, "agent", "cleanup", "--state-dir", str(other)],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 1, res.stderr
        assert f"in use by agent pid {first.proc.pid}" in res.stderr
        assert f":AXON-EP-{ep_id}-IN " in _iptables_save()
        assert [p["name"] for p in first.json("pod", "list")] == ["p1"]
        first.cleanup()  # before the host lock goes
    finally:
        lock.close()  # releases the flock
