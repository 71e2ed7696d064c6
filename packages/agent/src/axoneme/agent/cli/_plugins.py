"""``axoneme plugins``: installed datapaths, L7 parsers and plugins."""

from __future__ import annotations

import argparse
import json
import sys

from axoneme.agent.cli import add_output_flag
from axoneme.core.plugins import GROUP_DATAPATH, GROUP_L7, GROUP_PLUGINS, installed


def register(groups: dict[str, argparse._SubParsersAction]) -> None:  # type: ignore[type-arg]
    p = groups[""].add_parser("plugins", help="list installed datapaths, L7 parsers and plugins")
    add_output_flag(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    data = {
        "datapath": installed(GROUP_DATAPATH),
        "l7": installed(GROUP_L7),
        "plugins": installed(GROUP_PLUGINS),
    }
    if args.output == "json":
        json.dump(data, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
        return 0
    sys.stdout.write(f"{'KIND':<10} {'NAME':<12} OBJECT\n")
    for kind, entries in data.items():
        for name, value in sorted(entries.items()):
            sys.stdout.write(f"{kind:<10} {name:<12} {value}\n")
    return 0
