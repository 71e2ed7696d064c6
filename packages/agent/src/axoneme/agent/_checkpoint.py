"""The restart checkpoint: a restarted agent adopts the kernel's state at once.

A clean stop (SIGTERM) that leaves the kernel holding exactly what the agent
computed (every endpoint adopted and written, nothing failing closed or
waiting for a retry, the state file written) writes ``checkpoint.json`` in
the state dir: a format version, a random stamp, the fingerprint of
everything the policy state is computed from (the state file and its
journal byte for byte, the FQDN cache, the agent's configuration, the code
installed) and a sha256 checksum of those fields. It leaves the same stamp
beside the kernel's state (``Datapath.set_adopt_stamp``: a pinned map on
eBPF, so a reboot, ``agent cleanup`` or an agent that cleared the bpffs
takes it away).

The next start takes both before it writes anything: the file is read and
removed, the kernel's stamp read and erased, so a crash from then on leaves
neither. When the file is intact (version, checksum), its fingerprint
equals the inputs found now and its stamp equals the kernel's, the kernel
already enforces what this start would compute: the agent answers once the
datapath is loaded and rebuilds its policy state in the background (parse,
resolve, then the same full comparison with the kernel as any start, which
repairs what was changed behind the agent's back); API requests other than
``/v1/healthz`` wait for the rebuild. Otherwise (no checkpoint, a corrupt
or stale one, no or another stamp, a policy, endpoint or configuration
changed while down, a crash) the start rebuilds and syncs before it
answers, as it always did. Correctness never rests on the checkpoint: it
only decides whether the agent may answer before the rebuild.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import axoneme
from axoneme.agent._config import AgentConfig
from axoneme.agent._statefile import StateCorrupt, read_json, write_json_atomic
from axoneme.core.datapath import Datapath
from axoneme.core.errors import DatapathError

LOG = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.json"
CHECKPOINT_VERSION = 1
# beside the state file: what the policy state is also computed from
_INPUT_FILES = ("fqdn-cache.json",)
_CODE_SUFFIXES = (".py", ".c", ".h")


def path_of(config: AgentConfig) -> str:
    return os.path.join(config.state_dir, CHECKPOINT_FILE)


def new_stamp() -> str:
    return secrets.token_hex(32)


def _file_digest(h: Any, path: str) -> None:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        h.update(b"\0absent\0")
        return
    h.update(len(data).to_bytes(8, "little"))
    h.update(data)


def code_fingerprint() -> str:
    """Every installed source of the ``axoneme`` namespace (path, size,
    mtime): an upgrade or an edit computes differently, so it never adopts."""
    h = hashlib.sha256()
    for root in sorted(set(axoneme.__path__)):
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            for name in sorted(filenames):
                if not name.endswith(_CODE_SUFFIXES):
                    continue
                path = os.path.join(dirpath, name)
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def inputs_fingerprint(config: AgentConfig) -> str:
    """sha256 of what the agent's policy state is computed from (see the
    module docstring); read before the start writes any of it."""
    h = hashlib.sha256()
    _file_digest(h, config.state_file)
    _file_digest(h, config.state_file + ".journal")
    for name in _INPUT_FILES:
        _file_digest(h, os.path.join(config.state_dir, name))
    h.update(json.dumps(dataclasses.asdict(config), sort_keys=True, default=str).encode())
    h.update(code_fingerprint().encode())
    return h.hexdigest()


def _checksum(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write(config: AgentConfig, stamp: str, inputs: str) -> None:
    """Write the checkpoint atomically (OSError on failure)."""
    body = {"version": CHECKPOINT_VERSION, "stamp": stamp, "inputs": inputs}
    write_json_atomic(path_of(config), {**body, "checksum": _checksum(body)})


def take(config: AgentConfig) -> dict[str, Any] | None:
    """The checkpoint, removed from the state dir (whatever it holds); None
    when there is none or it cannot be trusted (logged)."""
    path = path_of(config)
    try:
        data = read_json(path)
    except StateCorrupt as e:
        LOG.warning("restart checkpoint refused: %s", e)
        data = None
    try:
        os.unlink(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        # a checkpoint that stays could be taken again after this run changed things
        LOG.warning("restart checkpoint refused: cannot remove %s: %s", path, e)
        return None
    if data is None:
        return None
    body = {k: data.get(k) for k in ("version", "stamp", "inputs")}
    if data.get("version") != CHECKPOINT_VERSION:
        LOG.warning("restart checkpoint refused: version %r (this agent writes %d)",
                    data.get("version"), CHECKPOINT_VERSION)
        return None
    if data.get("checksum") != _checksum(body) or not all(
            isinstance(body[k], str) and body[k] for k in ("stamp", "inputs")):
        LOG.warning("restart checkpoint refused: %s fails its checksum", path)
        return None
    return body


def adoptable(ckpt: dict[str, Any] | None, inputs: str, stamp: str, blocker: str = "") -> str:
    """Why the kernel's state cannot be adopted at once ("" when it can;
    ``blocker``: the agent's own reason). Logged when there was something
    to adopt."""
    why = (blocker or ("no usable checkpoint" if ckpt is None else
           "the state, its configuration or the code changed since the checkpoint"
           if ckpt["inputs"] != inputs else
           "the kernel's state carries no stamp" if not stamp else
           "the kernel's state carries another stamp" if stamp != ckpt["stamp"] else ""))
    if ckpt is not None or stamp:
        LOG.warning("restart: %s", f"rebuilding before serving: {why}" if why else
                    "the kernel holds the checkpoint's state: serving it while the policy "
                    "state is rebuilt and compared with the kernel in the background")
    return why


def leave(config: AgentConfig, dp: Datapath | None, blocker: str) -> None:
    """After the last write of a clean stop: the stamp beside the kernel's
    state and the checkpoint, unless ``blocker`` says the kernel may not
    hold exactly the computed state (logged)."""
    if blocker or dp is None:
        LOG.info("no restart checkpoint: %s", blocker)
        return
    stamp = new_stamp()
    try:
        inputs = inputs_fingerprint(config)
        if not dp.set_adopt_stamp(stamp):
            return  # the datapath keeps none: every start rebuilds first
        write(config, stamp, inputs)
    except (OSError, DatapathError) as e:
        LOG.warning("no restart checkpoint: %s", e)


class Adoption:
    """An adopting start's background rebuild and the gate the API waits at
    (``done``: set at once unless a rebuild runs)."""

    def __init__(self) -> None:
        self.done = asyncio.Event()
        self.done.set()
        self._task: asyncio.Task[None] | None = None

    def begin(self, rebuild: Callable[[], Awaitable[None]],
              then: Callable[[], Awaitable[None]]) -> None:
        """Run ``rebuild`` in the background, open the gate, then ``then``.
        A rebuild cannot fail for a reason the start would not have refused
        with (the same state, configuration and code parsed and resolved
        before the checkpoint): if it does, the agent exits as a refused
        start would, leaving the kernel's state as it found it."""
        self.done.clear()

        async def run() -> None:
            t0 = time.monotonic()
            try:
                await rebuild()
            except Exception:
                LOG.critical("restart: rebuilding the adopted state failed; exiting",
                             exc_info=True)
                os._exit(1)
            self.done.set()
            LOG.warning("restart: policy state rebuilt and compared with the kernel in %.2f s",
                        time.monotonic() - t0)
            await then()

        self._task = asyncio.create_task(run())

    async def finish(self) -> None:
        """Wait for a running rebuild (a stop: its worker threads would
        outlive a cancel)."""
        if self._task is not None:
            try:
                await self._task
            except Exception:
                pass
