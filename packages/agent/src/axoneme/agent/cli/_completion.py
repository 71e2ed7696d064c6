"""``axoneme completion bash|zsh|fish``: the shell code that completes axoneme's commands and flags.

Completion itself is argcomplete's: the shell calls ``axoneme`` with
``_ARGCOMPLETE`` set, and ``main`` hands the parser to argcomplete before
parsing (``autocomplete``), which prints the candidates and exits. Commands,
flags and choices complete from the parser; pod, namespace, endpoint and
policy names from the running agent (2 s at most; nothing when it is not
there).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

SHELLS = ("bash", "zsh", "fish")


def register(groups: dict[str, argparse._SubParsersAction[argparse.ArgumentParser]]) -> None:
    p = groups[""].add_parser("completion", help="print the shell completion script (argcomplete)")
    p.add_argument("shell", choices=SHELLS, help="the shell to complete in")
    p.set_defaults(handler=cmd_completion)


def cmd_completion(args: argparse.Namespace) -> int:
    from argcomplete.shell_integration import shellcode

    sys.stdout.write(shellcode(["axoneme"], shell=args.shell))
    return 0


# -- names the agent knows, for positionals and -n ---------------------------------------

_ALIASES = {"NetworkPolicy": "netpol", "CiliumNetworkPolicy": "cnp",
            "CiliumClusterwideNetworkPolicy": "ccnp"}


def _ask(parsed_args: argparse.Namespace, path: str, **query: Any) -> Any:
    from axoneme.agent.client import AgentClient

    socket = getattr(parsed_args, "api_socket_sub", None) or getattr(parsed_args, "api_socket", None)
    return AgentClient(socket, timeout=2.0).get(path, **query)


def _pods(parsed_args: argparse.Namespace) -> list[str]:
    ns = getattr(parsed_args, "namespace", None)
    return [p["name"] for p in _ask(parsed_args, "/v1/pods", namespace=ns)]


def _namespaces(parsed_args: argparse.Namespace) -> list[str]:
    return [n["name"] for n in _ask(parsed_args, "/v1/namespaces")]


def _endpoints(parsed_args: argparse.Namespace) -> list[str]:
    return [str(e["id"]) for e in _ask(parsed_args, "/v1/endpoints")]


def _policies(parsed_args: argparse.Namespace) -> list[str]:
    ns = getattr(parsed_args, "namespace", None)
    return [f"{_ALIASES.get(p['kind'], p['kind'])}/{p['name']}"
            for p in _ask(parsed_args, "/v1/policies")["policies"]
            if ns is None or p["namespace"] in (ns, "")]


# (command, argument dest) -> the agent's names that complete it; "*": any command's -n
NAMES: dict[tuple[str, str], Callable[[argparse.Namespace], list[str]]] = {
    ("pod exec", "name"): _pods, ("pod delete", "name"): _pods, ("pod logs", "name"): _pods,
    ("namespace label", "name"): _namespaces, ("namespace delete", "name"): _namespaces,
    ("endpoint get", "id"): _endpoints,
    ("policy get", "name"): _policies, ("policy delete", "ref"): _policies,
    ("*", "namespace"): _namespaces,
}


def _completer(names: Callable[[argparse.Namespace], list[str]]) -> Callable[..., list[str]]:
    def complete(prefix: str, parsed_args: argparse.Namespace, **_: Any) -> list[str]:
        try:
            return [n for n in names(parsed_args) if n.startswith(prefix)]
        except Exception:  # no agent, no answer: nothing to offer, never an error in the shell
            return []

    return complete


def attach_completers(parser: argparse.ArgumentParser) -> None:
    from axoneme.agent.cli._help import _commands

    for path, sub in _commands(parser):
        for action in sub._actions:
            names = NAMES.get((path, action.dest))
            if names is None and "-n" in action.option_strings:
                names = NAMES[("*", "namespace")]
            if names is not None:
                action.completer = _completer(names)  # type: ignore[attr-defined]


def autocomplete(parser: argparse.ArgumentParser) -> None:
    """Answer a completion request of the shell (and exit); nothing when not asked."""
    if "_ARGCOMPLETE" not in os.environ:
        return
    import argcomplete

    attach_completers(parser)
    argcomplete.autocomplete(parser)
