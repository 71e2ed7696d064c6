"""docs/cli.md is the CLI contract: every command and flag its synopses name is in `--help`.

The synopsis blocks (indented lines starting with `axoneme` or `scripts/`, with their
`[...]`/`--flag` continuation lines) are parsed; each command path must exist and each
flag must be listed by `axoneme <path> --help`. The README's CLI table may name only
existing commands and flags. What the contract promises for a later issue is listed in
NOT_YET with that issue: anything else missing fails, and so does an entry that has landed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
from pathlib import Path

import pytest
from axoneme.agent.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]
CLI_MD = ROOT / "docs" / "cli.md"

# Promised by docs/cli.md, not implemented yet: (command, flag) -> the issue that adds it.
# flag None: the whole command (and every flag of it) is still to come.
NOT_YET: dict[tuple[str, str | None], int] = {
    # issue 19: audit and staged policies, what-if, recommendations, the UI
}

FLAG = re.compile(r"(?<![\w-])(--?[a-zA-Z][\w-]*)")
WORD = re.compile(r"[a-z][a-z0-9-]*")


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _split_top(text: str, sep: str = "|") -> list[str]:
    """Split at `sep` outside brackets (`a [--x p|q] | b` -> `a [--x p|q]`, `b`)."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == sep and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return [p.strip() for p in [*parts, cur] if p.strip()]


def synopses(text: str) -> list[str]:
    """Each synopsis of docs/cli.md as one line, trailing `(comments)` removed."""
    out: list[str] = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if not re.match(r"^ {4}(axoneme|scripts/)", line):
            continue
        parts = [line]
        for nxt in lines[i + 1:]:
            if re.match(r"^ {9,}[\[-]", nxt):  # deeper than the 8-space description
                parts.append(nxt)
            else:
                break
        joined = " ".join(re.sub(r"\s{2,}\(.*?(\)|$)", "", p).strip() for p in parts)
        out.append(joined)
    return out


class Contract:
    """What the synopses promise: command paths, and flags per path."""

    def __init__(self) -> None:
        self.root, _ = build_parser()
        self.commands: set[str] = set()
        self.missing_commands: set[str] = set()
        self.flags: dict[str, set[str]] = {}
        self.scripts: dict[str, set[str]] = {}

    def _resolve(self, words: list[str], start: list[str]) -> tuple[list[str], list[str], bool]:
        """Walk subcommands from `start`: (path, rest, path names a missing command)."""
        parser = self.root
        for w in start:
            parser = _subcommands(parser)[w]
        path = list(start)
        rest = list(words)
        while rest and rest[0] in _subcommands(parser):
            path.append(rest[0])
            parser = _subcommands(parser)[rest.pop(0)]
        missing = bool(rest and _subcommands(parser) and WORD.fullmatch(rest[0]))
        if missing:
            path.append(rest.pop(0))
        return path, rest, missing

    def add(self, synopsis: str) -> None:
        if synopsis.startswith("scripts/"):
            for alt in _split_top(synopsis):
                words = alt.split()
                name = words[0] if words[0].startswith("scripts/") else synopsis.split()[0]
                sub = next((w for w in words[1 if words[0] == name else 0:] if WORD.fullmatch(w)), "")
                key = f"{name} {sub}".strip() if sub and words[0] in (name, sub) else name
                self.scripts.setdefault(key, set()).update(FLAG.findall(alt))
            return
        parent: list[str] = []
        for n, alt in enumerate(_split_top(synopsis.removeprefix("axoneme").strip())):
            words = alt.split()
            if n and parent and words and words[0] in _subcommands(self._parser(parent[:-1])):
                path, rest, missing = self._resolve(words, parent[:-1])
            else:
                path, rest, missing = self._resolve(words, [])
            parent = path
            cmd = " ".join(path)
            (self.missing_commands if missing else self.commands).add(cmd)
            self.flags.setdefault(cmd, set()).update(FLAG.findall(" ".join(rest)))

    def _parser(self, path: list[str]) -> argparse.ArgumentParser:
        parser = self.root
        for w in path:
            parser = _subcommands(parser)[w]
        return parser


def help_text(path: str) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit) as exit_:
        main([*path.split(), "--help"])
    assert exit_.value.code == 0, path
    return buf.getvalue()


def listed(flag: str, help_: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_) is not None


@pytest.fixture(scope="module")
def contract() -> Contract:
    c = Contract()
    for s in synopses(CLI_MD.read_text()):
        c.add(s)
    return c


def test_synopses_are_parsed(contract: Contract) -> None:
    # the parser of this test sees what a reader sees (guards against it silently seeing nothing)
    assert {"policy validate", "policy trace", "agent run", "pod run", "observe", ""} <= contract.commands
    assert {"--cluster", "--from", "--to", "--port", "--http-method", "--kafka-topic",
            "--icmp-type", "-o"} <= contract.flags["policy trace"]
    assert {"--datapath", "--policy-map-max", "--policy-map-full", "--install-cni"} <= \
        contract.flags["agent run"]
    assert "--version" in contract.flags[""]
    assert contract.flags["pod delete"] >= {"-n"} and "pod list" in contract.commands


def test_every_command_of_the_contract_exists(contract: Contract) -> None:
    missing = {c for c in contract.missing_commands if (c, None) not in NOT_YET}
    assert not missing, f"docs/cli.md names commands that do not exist: {sorted(missing)}"


def test_every_flag_of_the_contract_is_in_help(contract: Contract) -> None:
    problems = []
    for cmd, flags in sorted(contract.flags.items()):
        if cmd in contract.missing_commands:
            continue
        help_ = help_text(cmd)
        for flag in sorted(flags):
            if not listed(flag, help_) and (cmd, flag) not in NOT_YET:
                problems.append(f"axoneme {cmd} --help does not list {flag}")
    assert not problems, "\n".join(problems)


def test_scripts_of_the_contract(contract: Contract) -> None:
    assert {"scripts/cluster up", "scripts/k8s-e2e"} <= set(contract.scripts)
    for key, flags in contract.scripts.items():
        script = ROOT / key.split()[0]
        if (key, None) in NOT_YET:
            continue
        assert script.is_file(), f"docs/cli.md names {key}, {script} does not exist"
        text = script.read_text()
        for flag in flags:
            if (key, flag) in NOT_YET:
                continue
            assert flag in text, f"{key}: {flag} is not handled by {script}"


def test_not_yet_list_is_current(contract: Contract) -> None:
    """An entry whose command or flag has landed must leave NOT_YET (and is then checked)."""
    landed = []
    for (cmd, flag), issue in NOT_YET.items():
        if cmd.startswith("scripts/"):
            script = ROOT / cmd.split()[0]
            if script.is_file() and (flag is None or flag in script.read_text()):
                landed.append(f"{cmd}{' ' + flag if flag else ''} (issue {issue})")
            continue
        known = cmd in contract.commands or cmd in contract.missing_commands
        assert known, f"NOT_YET names {cmd!r}, which docs/cli.md does not"
        if flag is None:
            if cmd in contract.commands:
                landed.append(f"{cmd} (issue {issue})")
        else:
            assert flag in contract.flags.get(cmd, set()), f"NOT_YET: docs/cli.md has no {cmd} {flag}"
            if cmd in contract.commands and listed(flag, help_text(cmd)):
                landed.append(f"{cmd} {flag} (issue {issue})")
    assert not landed, "implemented now, remove from NOT_YET: " + ", ".join(landed)


def _readme_cli_rows() -> list[tuple[list[str], str]]:
    text = (ROOT / "README.md").read_text()
    start = text.index("## The CLI")
    section = text[start:text.index("\n## ", start + 1)]
    rows = []
    for line in section.splitlines():
        if not line.startswith("| `axoneme"):
            continue
        first, second = [c.strip().replace("\\|", "|") for c in line.strip("|").split(" | ", 1)]
        rows.append((re.findall(r"`([^`]+)`", first), second))
    assert len(rows) >= 10, "the README's CLI table was not found"
    return rows


def test_readme_cli_table_names_existing_commands_and_flags() -> None:
    contract = Contract()
    problems = []
    for codes, what in _readme_cli_rows():
        first_cmd = None
        for code in codes:
            words = code.removeprefix("axoneme").split()
            # `policy apply|delete|list`: one command per alternative of the last word
            head = [w for w in words if not w.startswith(("[", "-", "."))]
            alts = head[-1].split("|") if head and "|" in head[-1] else [None]
            for alt in alts:
                ws = [alt if w == head[-1] and alt else w for w in words]
                path, rest, missing = contract._resolve(ws, [])
                cmd = " ".join(path)
                first_cmd = first_cmd or cmd
                if missing or not path:
                    problems.append(f"README names `axoneme {cmd}`, which does not exist")
                    continue
                help_ = help_text(cmd)
                problems += [f"README: axoneme {cmd} has no {f}" for f in FLAG.findall(" ".join(rest))
                             if not listed(f, help_)]
        # concrete flags named in the description belong to the row's first command
        if first_cmd:
            help_ = help_text(first_cmd)
            for code in re.findall(r"`([^`]+)`", what):
                problems += [f"README: axoneme {first_cmd} has no {f}" for f in FLAG.findall(code)
                             if not code.startswith(f + "*") and "*" not in f and not listed(f, help_)]
    assert not problems, "\n".join(problems)


def test_version_flag() -> None:
    from importlib.metadata import version

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert buf.getvalue() == f"axoneme {version('axoneme')}\n"
