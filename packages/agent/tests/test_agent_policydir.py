"""``--policy-dir`` with hostile files: each bad file is reported and skipped,
the good files' policies are applied, the scan never stops (issue 13 item 2).

The scan runs in a subprocess with a fake agent: before the fix a deep file
segfaulted the process and a huge integer aborted the scan.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

GOOD = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: %s, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress: [{fromEndpoints: [{matchLabels: {app: client}}]}]
"""

HOSTILE = {
    "10-deep.yaml": "[" * 30_000,
    "11-deepmap.yaml": "{" * 1_000_000,
    "12-block.yaml": "- " * 30_000 + "x",
    "13-hugeint.yaml": GOOD.replace("ingress:", "ingress: [{toPorts: [{ports: [{port: 0x%s}]}]}]\n  egress:"
                                    % ("f" * 5000)) % "hugeint",
    "14-hugestr.yaml": GOOD.replace("ingress:", "ingress: [{toPorts: [{ports: [{port: \"%s\"}]}]}]\n  egress:"
                                    % ("9" * 5000)) % "hugestr",
    "15-bomb.yaml": "a: &s " + "x" * 10240 + "\nb: &l [" + ", ".join(["*s"] * 300) + "]\nc: ["
                    + ", ".join(["*l"] * 300) + "]\n",
    "16-deep.json": "[" * 1_000_000,
}

SCAN = textwrap.dedent("""
    import asyncio, json, sys
    from axoneme.agent._policydir import PolicyDirWatcher

    class FakePolicies:
        def __init__(self):
            self.source_errors = {}
            self.applied = []

        async def upsert(self, parsed, source, remove_refs=()):
            self.applied.extend(p.ref.name for p, _ in parsed)
            return {}

    async def main():
        agent = FakePolicies()
        watcher = PolicyDirWatcher(agent, sys.argv[1])
        await asyncio.wait_for(watcher.scan(), 60)
        await asyncio.wait_for(watcher.scan(), 60)  # nothing changed: nothing re-applied
        print(json.dumps({"applied": agent.applied, "errors": agent.source_errors}))

    asyncio.run(main())
    """)


def test_hostile_files_are_skipped_and_reported(tmp_path: Path) -> None:
    pdir = tmp_path / "policies"
    pdir.mkdir()
    (pdir / "00-first.yaml").write_text(GOOD % "first")
    for name, text in HOSTILE.items():
        (pdir / name).write_text(text)
    os.mkfifo(pdir / "17-fifo.yaml")  # opening it would block the reader for good
    (pdir / "99-last.yaml").write_text(GOOD % "last")
    r = subprocess.run([sys.executable, "-c", SCAN, str(pdir)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, (r.returncode, r.stderr[-3000:])
    got = json.loads(r.stdout)
    assert got["applied"] == ["first", "last"]
    errors = got["errors"]
    assert sorted(Path(p).name for p in errors) == sorted([*HOSTILE, "17-fifo.yaml"])
    for path, messages in errors.items():
        assert messages and all(len(m) < 1000 for m in messages), (path, messages)
        assert "Traceback" not in " ".join(messages)
    by = {Path(p).name: " ".join(m) for p, m in errors.items()}
    for name in ("10-deep.yaml", "11-deepmap.yaml", "12-block.yaml", "16-deep.json"):
        assert "nesting deeper than 100 levels" in by[name], by[name]
    assert "spec.ingress[0].toPorts[0].ports[0].port" in by["13-hugeint.yaml"]
    assert "out of range" in by["14-hugestr.yaml"]
    assert "document too large" in by["15-bomb.yaml"]
    assert "not a regular file" in by["17-fifo.yaml"]
    assert "Traceback" not in r.stderr


class FakePolicies:
    def __init__(self) -> None:
        self.source_errors: dict[str, list[str]] = {}
        self.applied: list[str] = []
        self.removed: list[str] = []

    async def upsert(self, parsed: Any, source: str, remove_refs: Any = ()) -> dict[str, Any]:
        self.applied.extend(p.ref.name for p, _ in parsed)
        self.removed.extend(r.name for r in remove_refs)
        return {}


def test_a_parser_failure_skips_only_that_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: any exception but InvalidRule left scan() and the files after it
    were not looked at in that scan (nor was the failing file ever retried)."""
    from axoneme.agent._policydir import PolicyDirWatcher
    from axoneme.core.policy import parse

    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.yaml").write_text(GOOD % name)
    real = parse.parse_policy

    def flaky(doc: Any, *args: Any) -> Any:
        if doc.file.endswith("b.yaml"):
            raise RuntimeError("parser bug " + "z" * 5000)
        return real(doc, *args)

    monkeypatch.setattr(parse, "parse_policy", flaky)
    agent = FakePolicies()
    asyncio.run(PolicyDirWatcher(agent, str(tmp_path)).scan())  # type: ignore[arg-type]
    assert agent.applied == ["a", "c"]
    (message,) = agent.source_errors[str(tmp_path / "b.yaml")]
    assert message.startswith(f"cannot parse {tmp_path / 'b.yaml'}: RuntimeError: parser bug")
    assert len(message) < 500


def test_unreadable_directory_keeps_its_policies(tmp_path: Path) -> None:
    """An unreadable directory is not an empty one: its policies stay."""
    from axoneme.agent._policydir import PolicyDirWatcher

    pdir = tmp_path / "p"
    pdir.mkdir()
    (pdir / "a.yaml").write_text(GOOD % "a")
    agent = FakePolicies()
    watcher = PolicyDirWatcher(agent, str(pdir))  # type: ignore[arg-type]
    asyncio.run(watcher.scan())
    assert agent.applied == ["a"]
    moved = tmp_path / "moved"
    pdir.rename(moved)  # listdir fails like on EACCES/EIO
    asyncio.run(watcher.scan())
    assert agent.removed == []
    moved.rename(pdir)
    (pdir / "a.yaml").unlink()
    asyncio.run(watcher.scan())
    assert agent.removed == ["a"]
