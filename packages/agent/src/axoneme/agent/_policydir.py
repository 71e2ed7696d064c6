"""``agent run --policy-dir DIR``: load policies from files and follow changes.

Polls the directory's files every second (mtime and size). A changed file is
re-parsed and re-applied; a file that no longer parses is logged with every
problem and its previous good version stays in force; a removed file's
policies are deleted.

Anyone who can write to the directory can hand the agent hostile input, so a
bad file (malformed, too deep, too large, not a regular file, or one that
makes the parser fail unexpectedly) is reported in the log and in
``status`` and skipped: the scan goes on with the other files and the agent
keeps running.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from typing import Any

from axoneme.agent._policies import PolicyService
from axoneme.core.errors import AxonemeError, InvalidRule
from axoneme.core.policy import parse as policy_parse
from axoneme.core.yamlsafe import excerpt

LOG = logging.getLogger(__name__)

SUFFIXES = (".yaml", ".yml", ".json")


class PolicyDirWatcher:
    """A policy source (``PolicySource``): each file's policies, under the
    file's path as their source."""

    def __init__(self, policies: PolicyService, directory: str, interval: float = 1.0) -> None:
        self.policies = policies
        self.errors = policies.source_errors  # path -> problems (status shows them)
        self.directory = directory
        self.interval = interval
        self._seen: dict[str, tuple[int, int]] = {}
        self._refs: dict[str, list[Any]] = {}  # file -> refs it provides
        self._special: dict[str, tuple[int, int]] = {}  # non-regular files already reported

    def _files(self) -> dict[str, tuple[int, int]] | None:
        """Policy files by path -> (mtime, size); None if the directory cannot be read."""
        out: dict[str, tuple[int, int]] = {}
        try:
            names = sorted(os.listdir(self.directory))
        except OSError as e:
            LOG.error("cannot read policy dir %s: %s (keeping its policies)", self.directory, e)
            return None
        for name in names:
            if not name.endswith(SUFFIXES) or name.startswith("."):
                continue
            path = os.path.join(self.directory, name)
            try:
                st = os.stat(path)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
                # a FIFO would block the reader thread forever, a device
                # could be endless: never open what is not a regular file
                sig = (st.st_mtime_ns, st.st_mode)
                if self._special.get(path) != sig:
                    self._special[path] = sig
                    LOG.error("policy dir: %s is not a regular file, skipping it", path)
                self.errors[path] = [f"not a regular file ({path})"]
                continue
            self._special.pop(path, None)
            out[path] = (st.st_mtime_ns, st.st_size)
        for path in [p for p in self._special if os.path.basename(p) not in names]:
            del self._special[path]
        return out

    async def start(self) -> None:
        await self.scan()

    async def scan(self) -> None:
        files = self._files()
        if files is None:
            # unreadable is not empty: deleting every policy of the directory
            # on a transient error would drop its denies too
            return
        for path in [p for p in self.errors if p not in files and p not in self._special]:
            self.errors.pop(path, None)  # a bad file that went away
        for path in sorted(set(self._seen) - set(files)):
            refs = self._refs.pop(path, [])
            self._seen.pop(path, None)
            self.errors.pop(path, None)
            if refs:
                LOG.warning("policy file %s removed: deleting %d policies", path, len(refs))
                await self.policies.upsert([], source=path, remove_refs=refs)
        for path, sig in files.items():
            if self._seen.get(path) == sig:
                continue
            self._seen[path] = sig

            def parse(p: str = path) -> list[tuple[Any, dict[str, Any]]]:
                docs = policy_parse.load_documents([p])
                problems = []
                out = []
                for d in docs:
                    try:
                        pol = policy_parse.parse_policy(
                            d, getattr(self.policies, "services_source", False))
                        out.append((pol, {"file": d.file, "index": d.index, "obj": d.obj}))
                    except InvalidRule as e:
                        problems.extend(e.problems)
                if problems:
                    raise InvalidRule(problems)
                return out

            try:
                parsed = await asyncio.to_thread(parse)
            except InvalidRule as e:
                self.errors[path] = [str(p) for p in e.problems]
                for problem in e.problems:
                    LOG.error("policy dir: %s (keeping the previous version of %s)", problem, path)
                continue
            except Exception as e:
                # a parser bug must not stop the scan of the other files (nor
                # the agent); the file is retried when it changes
                self._fail(path, "cannot parse", e)
                continue
            new_refs = [p.ref for p, _ in parsed]
            old_refs = [r for r in self._refs.get(path, []) if r not in new_refs]
            LOG.warning("policy dir: applying %s (%d policies)", path, len(parsed))
            try:
                await self.policies.upsert(parsed, source=path, remove_refs=old_refs)
            except (AxonemeError, ValueError, TypeError) as e:
                self._fail(path, "cannot apply", e)
                continue
            self._refs[path] = new_refs
            self.errors.pop(path, None)

    def _fail(self, path: str, what: str, e: BaseException) -> None:
        message = f"{what} {path}: {type(e).__name__}: {excerpt(str(e), 300)}"
        self.errors[path] = [message]
        LOG.error("policy dir: %s (keeping the previous version of %s)", message, path)
        LOG.debug("policy dir: %s", what, exc_info=True)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.scan()
            except asyncio.CancelledError:
                raise
            except Exception:
                LOG.exception("policy dir scan failed")
