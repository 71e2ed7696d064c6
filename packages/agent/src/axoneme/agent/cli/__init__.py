"""The ``axoneme`` command line (docs/cli.md is the contract; a test checks ``--help`` against it).

Each area registers its subcommands from its own module:
``_validate`` (policy validate), ``_offline`` (policy trace/matrix), ``_agentcmds`` (agent run/cleanup,
status, policy apply/delete/list, namespace, pod, endpoint, identity,
observe), ``_plugins`` (plugins). A handler returns the exit code; errors
are ``AxonemeError`` subclasses mapped to exit codes here.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence

from axoneme.core.errors import AxonemeError, ConfigError, InvalidRule, PolicyError

LOG = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_BAD_INPUT = 2

# Modules that register subcommands; a missing one is skipped (it belongs to
# work not landed yet), a broken one fails loudly.
_AREAS = ("_plugins", "_validate", "_offline", "_agentcmds", "_pods", "_observe", "_policyget", "_completion", "_whatif", "_audit", "_ui")

# Start-up: a top-level command whose whole parser these areas build (no other
# area adds to it) gets a parser of just them, so `axoneme pod run` imports the
# pod commands' modules, not every command's (policy engine, asyncio, YAML).
# An area that adds to one of these commands goes in its tuple too
# (packages/agent/tests/test_cli_startup.py compares every entry with a full build).
_COMMAND_AREAS = {
    "pod": ("_pods",),
    "observe": ("_observe",),
    "plugins": ("_plugins",),
    "ui": ("_ui",),
    **dict.fromkeys(("status", "identity", "namespace", "ns"), ("_agentcmds",)),
    **dict.fromkeys(("agent", "endpoint", "ep"), ("_agentcmds", "_audit")),
}


# Third-party modules of the `agent` extra: the offline and client commands never import them.
AGENT_EXTRA_MODULES = frozenset({"aiohttp", "prometheus_client"})


def version() -> str:
    """The installed distribution's version (all axoneme distributions share it)."""
    import importlib.metadata  # only when asked: it costs more than the rest of start-up

    try:
        return importlib.metadata.version("axoneme")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"  # run from a source tree that is not installed


class _VersionAction(argparse.Action):
    """``--version``: argparse's version action, the version looked up when asked."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS, help: str = "show program's version number and exit") -> None:
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        parser._print_message(f"axoneme {version()}\n", sys.stdout)
        parser.exit()


class UsageError(AxonemeError):
    """Bad command-line usage (exit 2)."""


class CLIParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        sys.stderr.write(f"error: {message} (usage)\n")
        raise SystemExit(EXIT_BAD_INPUT)


def add_output_flag(p: argparse.ArgumentParser, choices: Sequence[str] = ("table", "json"),
                    help: str | None = None) -> None:
    p.add_argument("-o", "--output", choices=list(choices), default=choices[0],
                   help=help or f"output format: {' or '.join(choices)} (default {choices[0]}); "
                                f"json is one document on stdout")


def fail(message: str, where: str, code: int) -> int:
    sys.stderr.write(f"error: {message} ({where})\n")
    return code


def build_parser(areas: Sequence[str] = _AREAS) -> tuple[CLIParser, dict[str, argparse._SubParsersAction]]:  # type: ignore[type-arg]
    """The parser of ``areas``' commands (main(): every area, or the ones of the
    command given, see _COMMAND_AREAS)."""
    parser = CLIParser(prog="axoneme", description="identity-based network policy for pods and containers")
    parser.add_argument("--version", action=_VersionAction)
    parser.add_argument("--debug", action="store_true", help="log at DEBUG to stderr")
    parser.add_argument("--api-socket", default=None,
                        help="agent API socket (default: $AXONEME_API_SOCKET or /var/run/axoneme/axoneme.sock)")
    top = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CLIParser)
    groups: dict[str, argparse._SubParsersAction] = {"": top}  # type: ignore[type-arg]
    policy = top.add_parser("policy", help="validate, trace, apply and list policies")
    groups["policy"] = policy.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", parser_class=CLIParser)
    for area in areas:
        try:
            mod = importlib.import_module(f"axoneme.agent.cli.{area}")
        except ModuleNotFoundError as e:
            if e.name == f"axoneme.agent.cli.{area}":
                continue
            raise
        mod.register(groups)
    from axoneme.agent.cli._help import add_examples

    add_examples(parser)
    return parser, groups


def _command_areas(argv: Sequence[str]) -> Sequence[str]:
    """The areas main() builds: those of the command in ``argv`` when one area
    set builds all of it, else every area (help, completion, unknown flags)."""
    if "_ARGCOMPLETE" in os.environ:
        return _AREAS
    args = iter(argv)
    for arg in args:
        if arg == "--debug" or arg.startswith("--api-socket="):
            continue
        if arg == "--api-socket":
            next(args, None)
            continue
        return _COMMAND_AREAS.get(arg, _AREAS)
    return _AREAS


def main(argv: Sequence[str] | None = None) -> int:
    areas = _command_areas(sys.argv[1:] if argv is None else argv)
    parser, _ = build_parser(areas)
    from axoneme.agent.cli._completion import autocomplete

    autocomplete(parser)  # a shell asking for completions: answered, then exit
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler: Callable[[argparse.Namespace], int] | None = getattr(args, "handler", None)
    if handler is None:
        if areas != _AREAS:  # the help lists every command
            parser, _ = build_parser()
        parser.print_help(sys.stderr)
        return EXIT_BAD_INPUT
    try:
        return handler(args)
    except InvalidRule as e:
        for problem in e.problems:
            sys.stderr.write(f"error: {problem}\n")
        return EXIT_BAD_INPUT
    except (UsageError, PolicyError, ConfigError) as e:
        sys.stderr.write(f"error: {e}\n")
        return EXIT_BAD_INPUT
    except AxonemeError as e:
        sys.stderr.write(f"error: {e}\n")
        return EXIT_RUNTIME
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in AGENT_EXTRA_MODULES:
            raise
        sys.stderr.write(f"error: this command needs the node agent's dependencies: "
                         f"pip install 'axoneme[agent]' (missing module {e.name})\n")
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
