"""``axoneme policy validate``: parse and check policy files offline."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter

from axoneme.agent.cli import EXIT_BAD_INPUT, EXIT_OK, add_output_flag
from axoneme.core.policy.parse import check_paths


def register(groups: dict[str, argparse._SubParsersAction]) -> None:  # type: ignore[type-arg]
    p = groups["policy"].add_parser(
        "validate", help="parse and check policy files (every problem with file, document and field)")
    p.add_argument("-f", "--filename", dest="files", action="extend", nargs="+", required=True,
                   metavar="PATH", help="policy file or directory (repeatable; '-' reads stdin)")
    add_output_flag(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    _, problems, files, docs = check_paths(args.files)
    for problem in problems:
        sys.stderr.write(f"error: {problem}\n")
    if args.output == "json":
        json.dump({
            "valid": not problems,
            "documents": len(docs),
            "problems": [
                {"file": p.file, "document": p.document, "field": p.field, "message": p.message}
                for p in problems
            ],
        }, sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif not problems:
        per_file = Counter(d.file for d in docs)
        for file in files:
            name = "<stdin>" if file == "-" else file
            sys.stdout.write(f"{name}: {per_file.get(name, 0)} document(s) valid\n")
        for path in args.files:
            # Say so when a directory held no policy files, rather than print nothing.
            if os.path.isdir(path) and not any(_inside(f, path) for f in files):
                sys.stdout.write(f"{path}: no *.yaml, *.yml or *.json files\n")
    return EXIT_BAD_INPUT if problems else EXIT_OK


def _inside(file: str, directory: str) -> bool:
    try:
        return os.path.samefile(os.path.dirname(file) or ".", directory)
    except OSError:
        return False
