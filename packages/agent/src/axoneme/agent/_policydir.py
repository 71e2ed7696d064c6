"""``agent run --policy-dir DIR``: load policies from files and follow changes.

Polls the directory's files every second (mtime and size). A changed file is
re-parsed and re-applied; a file that no longer parses is logged with every
problem and its previous good version stays in force; a removed file's
policies are deleted.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING, Any

from axoneme.core.errors import InvalidRule

if TYPE_CHECKING:  # pragma: no cover
    from axoneme.agent._agent import Agent

LOG = logging.getLogger(__name__)

SUFFIXES = (".yaml", ".yml", ".json")


class PolicyDirWatcher:
    def __init__(self, agent: Agent, directory: str, interval: float = 1.0) -> None:
        self.agent = agent
        self.directory = directory
        self.interval = interval
        self._seen: dict[str, tuple[int, int]] = {}
        self._refs: dict[str, list[Any]] = {}  # file -> refs it provides

    def _files(self) -> dict[str, tuple[int, int]]:
        out: dict[str, tuple[int, int]] = {}
        try:
            names = sorted(os.listdir(self.directory))
        except OSError as e:
            LOG.error("cannot read policy dir %s: %s", self.directory, e)
            return out
        for name in names:
            if not name.endswith(SUFFIXES) or name.startswith("."):
                continue
            path = os.path.join(self.directory, name)
            try:
                st = os.stat(path)
            except OSError:
                continue
            out[path] = (st.st_mtime_ns, st.st_size)
        return out

    async def scan(self) -> None:
        from axoneme.core.policy.parse import load_documents, parse_policy

        files = self._files()
        for path in sorted(set(self._seen) - set(files)):
            refs = self._refs.pop(path, [])
            self._seen.pop(path, None)
            self.agent.policy_dir_errors.pop(path, None)
            if refs:
                LOG.warning("policy file %s removed: deleting %d policies", path, len(refs))
                await self.agent.policy_upsert([], source=path, remove_refs=refs)
        for path, sig in files.items():
            if self._seen.get(path) == sig:
                continue
            self._seen[path] = sig

            def parse(p: str = path) -> list[tuple[Any, dict[str, Any]]]:
                docs = load_documents([p])
                problems = []
                out = []
                for d in docs:
                    try:
                        out.append((parse_policy(d), {"file": d.file, "index": d.index,
                                                      "obj": d.obj}))
                    except InvalidRule as e:
                        problems.extend(e.problems)
                if problems:
                    raise InvalidRule(problems)
                return out

            try:
                parsed = await asyncio.to_thread(parse)
            except InvalidRule as e:
                self.agent.policy_dir_errors[path] = [str(p) for p in e.problems]
                for problem in e.problems:
                    LOG.error("policy dir: %s (keeping the previous version of %s)", problem, path)
                continue
            self.agent.policy_dir_errors.pop(path, None)
            new_refs = [p.ref for p, _ in parsed]
            old_refs = [r for r in self._refs.get(path, []) if r not in new_refs]
            self._refs[path] = new_refs
            LOG.warning("policy dir: applying %s (%d policies)", path, len(parsed))
            await self.agent.policy_upsert(parsed, source=path, remove_refs=old_refs)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.scan()
            except asyncio.CancelledError:
                raise
            except Exception:
                LOG.exception("policy dir scan failed")
