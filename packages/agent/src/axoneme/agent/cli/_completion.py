"""``axoneme completion bash|zsh|fish``: the shell code that completes axoneme's commands and flags.

Completion itself is argcomplete's: the shell calls ``axoneme`` with
``_ARGCOMPLETE`` set, and ``main`` hands the parser to argcomplete before
parsing (``autocomplete``), which prints the candidates and exits.
"""

from __future__ import annotations

import argparse
import os
import sys

SHELLS = ("bash", "zsh", "fish")


def register(groups: dict[str, argparse._SubParsersAction[argparse.ArgumentParser]]) -> None:
    p = groups[""].add_parser("completion", help="print the shell completion script (argcomplete)")
    p.add_argument("shell", choices=SHELLS, help="the shell to complete in")
    p.set_defaults(handler=cmd_completion)


def cmd_completion(args: argparse.Namespace) -> int:
    from argcomplete.shell_integration import shellcode

    sys.stdout.write(shellcode(["axoneme"], shell=args.shell))
    return 0


def autocomplete(parser: argparse.ArgumentParser) -> None:
    """Answer a completion request of the shell (and exit); nothing when not asked."""
    if "_ARGCOMPLETE" not in os.environ:
        return
    import argcomplete

    argcomplete.autocomplete(parser)
