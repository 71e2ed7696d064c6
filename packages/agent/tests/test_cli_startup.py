"""Start-up of the ``axoneme`` CLI and of the Python CNI plugin: a command
builds only its own parser (cli._COMMAND_AREAS) and imports only what it needs."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterator

import pytest
from axoneme.agent import cli


def _tree(parser: argparse.ArgumentParser, path: str = "") -> Iterator[tuple[str, str]]:
    """(command path, --help text) of ``parser`` and every parser below it."""
    yield path, parser.format_help()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _tree(sub, f"{path} {name}".strip())


@pytest.mark.parametrize("command", sorted(cli._COMMAND_AREAS))
def test_a_commands_own_parser_is_the_full_builds(command: str) -> None:
    """Every command of _COMMAND_AREAS gets, from its areas alone, exactly the
    parser (flags, subcommands, help, examples) the full build gives it: an
    area that adds to one of them must be listed there."""
    full, _ = cli.build_parser()
    own, _ = cli.build_parser(cli._COMMAND_AREAS[command])
    want = {p: h for p, h in _tree(full) if p == command or p.startswith(command + " ")}
    got = {p: h for p, h in _tree(own) if p == command or p.startswith(command + " ")}
    assert want and got == want
    # the global flags too
    assert [a.option_strings for a in own._actions if a.option_strings] == \
        [a.option_strings for a in full._actions if a.option_strings]


@pytest.mark.parametrize(("argv", "areas"), [
    (["pod", "run", "web", "--", "sleep", "1"], ("_pods",)),
    (["--debug", "--api-socket", "/x.sock", "status"], ("_agentcmds",)),
    (["--api-socket=/x.sock", "agent", "run"], ("_agentcmds", "_audit")),
    (["policy", "apply", "-f", "x"], cli._AREAS),  # several areas add to `policy`
    (["--help"], cli._AREAS),
    (["--version"], cli._AREAS),
    (["--deb", "pod"], cli._AREAS),  # an abbreviation: argparse's to judge
    ([], cli._AREAS),
])
def test_command_areas(argv: list[str], areas: tuple[str, ...]) -> None:
    assert tuple(cli._command_areas(argv)) == tuple(areas)


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys\nprint('\\n'.join(sys.modules))"],
                         capture_output=True, text=True, check=True).stdout
    return set(out.split())


HEAVY = ("axoneme.core.policy", "axoneme.core.datapath", "axoneme.core.plugins", "asyncio",
         "yaml", "importlib.metadata", "axoneme.agent._config")


def test_pod_run_and_the_cni_plugin_import_no_engine() -> None:
    """`axoneme pod run` and the Python CNI plugin load neither the policy
    engine nor the agent's machinery (import time is most of their start-up)."""
    pod = _modules_after("from axoneme.agent.cli import build_parser, _command_areas\n"
                         "build_parser(_command_areas(['pod', 'run', 'x']))")
    cni = _modules_after("import axoneme.cni.plugin")
    for loaded in (pod, cni):
        assert not [m for m in loaded if m.startswith(HEAVY)], sorted(loaded)
    assert "axoneme.agent.cli._pods" in pod and "axoneme.core.names" in cni


def test_lazy_core_exports() -> None:
    """axoneme.core's names load on first use and are the defining modules' own."""
    import axoneme.core as core
    from axoneme.core.mapstate import Key

    assert set(core.__all__) == set(core._EXPORTS)
    assert core.Key is Key and "Key" in dir(core)
    assert core.policy.__name__ == "axoneme.core.policy"  # submodules as before
    with pytest.raises(AttributeError):
        core.NoSuchThing  # noqa: B018


def test_version_flag() -> None:
    out = subprocess.run([sys.executable, "-c", "import sys\nfrom axoneme.agent.cli import main\n"
                          "sys.exit(main())", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout == f"axoneme {cli.version()}\n"


def test_a_command_without_its_subcommand_prints_the_full_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["pod"]) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "pod" in err and "policy" in err and "status" in err and "observe" in err
