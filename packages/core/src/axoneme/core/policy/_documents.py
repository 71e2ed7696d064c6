"""Reading policy files: paths -> documents (``kind: List`` items expanded).

Read with the hardened loader (``axoneme.core.yamlsafe``); every unreadable
file or malformed document is a ``Problem`` naming the file (and line).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from axoneme.core import yamlsafe
from axoneme.core.errors import InvalidRule, Problem
from axoneme.core.policy.walk import make_problem, type_name

_q = yamlsafe.excerpt

POLICY_EXTENSIONS = (".yaml", ".yml", ".json")
# Kubernetes refuses objects over ~1.5 MiB; a policy file is never near this.
MAX_FILE_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Document:
    """One YAML document, or one item of a ``kind: List``."""

    file: str
    index: int
    obj: Any


def _expand(paths: Sequence[str], problems: list[Problem]) -> list[str]:
    """Files to read: files as given, directories as their sorted policy files."""
    files: list[str] = []
    for path in paths:
        if path == "-":
            files.append(path)
        elif os.path.isdir(path):
            try:
                names = sorted(os.listdir(path))
            except OSError as e:
                problems.append(make_problem(path, None, "", f"cannot read directory: {e.strerror or e}"))
                continue
            files.extend(
                os.path.join(path, n) for n in names
                if n.endswith(POLICY_EXTENSIONS) and os.path.isfile(os.path.join(path, n))
            )
        elif os.path.exists(path):
            files.append(path)
        else:
            problems.append(make_problem(path, None, "", "no such file or directory"))
    return files


def _read(path: str, problems: list[Problem]) -> bytes | None:
    try:
        if path == "-":
            data = sys.stdin.buffer.read(MAX_FILE_BYTES + 1)
        else:
            with open(path, "rb") as f:
                data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        problems.append(make_problem(path, None, "", f"cannot read file: {e.strerror or e}"))
        return None
    if len(data) > MAX_FILE_BYTES:
        # read no further: /dev/zero or a runaway generator never ends
        problems.append(make_problem("<stdin>" if path == "-" else path, None, "",
                                     f"file too large (more than {MAX_FILE_BYTES // (1024 * 1024)} MiB)"))
        return None
    return data


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key \"{_q(k)}\"")
        out[k] = v
    return out


def _is_list(obj: object) -> bool:
    """``kind: List`` (kubectl) or ``kind: <Kind>List`` (the API's list kinds)."""
    if not isinstance(obj, Mapping):
        return False
    kind = obj.get("kind")
    return kind == "List" or (isinstance(kind, str) and kind.endswith("List") and "items" in obj)


def _parse_file(file: str, data: bytes, problems: list[Problem]) -> list[Any]:
    """The top-level objects of one file (``None`` for empty documents).

    Read with the hardened loader (``axoneme.core.yamlsafe``): nesting,
    alias expansion and integer literals are bounded before anything
    recurses or converts.
    """
    file_name = "<stdin>" if file == "-" else file
    objs: list[Any] = []
    try:
        if file.endswith(".json"):
            objs.append(yamlsafe.load_json(data, file_name, object_pairs_hook=_no_duplicates))
        else:
            for obj in yamlsafe.iter_load_all(data, file_name):
                objs.append(obj)
    except yamlsafe.InputError as e:
        problems.append(make_problem(file_name, e.document, "", e.message))
    return objs


def load_paths(paths: Sequence[str]) -> tuple[list[str], list[Document], list[Problem]]:
    """(files read, documents, problems) for ``paths``."""
    problems: list[Problem] = []
    files = _expand(paths, problems)
    docs: list[Document] = []
    for file in files:
        data = _read(file, problems)
        if data is None:
            continue
        file_name = "<stdin>" if file == "-" else file
        index = 0
        for obj in _parse_file(file, data, problems):
            if obj is None:
                continue  # empty document (e.g. a trailing ---), as kubectl skips it
            if _is_list(obj):
                items = obj.get("items")
                if items is None:
                    items = []
                if not isinstance(items, list):
                    problems.append(make_problem(file_name, index, "items", f"expected a list, got {type_name(items)}"))
                    index += 1
                    continue
                for it in items:
                    docs.append(Document(file_name, index, it))
                    index += 1
                continue
            docs.append(Document(file_name, index, obj))
            index += 1
    return files, docs, problems


def load_documents(paths: Sequence[str]) -> list[Document]:
    """Every document (or List item) of ``paths`` (files or directories).

    Performs no kind filtering. Raises ``InvalidRule`` naming the file (and
    line) for missing files and malformed YAML/JSON, after reading all.
    """
    _, docs, problems = load_paths(paths)
    if problems:
        raise InvalidRule(problems)
    return docs


def in_input_order(problems: list[Problem], paths: Sequence[str], files: list[str]) -> list[Problem]:
    """Problems grouped by file in the order the files were given, then by document."""
    file_rank = {("<stdin>" if f == "-" else f): i for i, f in enumerate(files)}

    def arg_rank(file: str) -> int:
        for i, p in enumerate(paths):
            if file == p or (p == "-" and file == "<stdin>") or file.startswith(os.path.join(p, "")):
                return i
        return len(paths)

    def key(p: Problem) -> tuple[int, int, int]:
        return (arg_rank(p.file), file_rank.get(p.file, -1), -1 if p.document is None else p.document)

    return sorted(problems, key=key)


__all__ = ["Document", "MAX_FILE_BYTES", "POLICY_EXTENSIONS", "load_documents", "load_paths", "in_input_order"]
