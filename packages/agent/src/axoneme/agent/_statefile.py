"""Atomic JSON state files: write tmp + fsync + rename, refuse corrupt ones."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from axoneme.core.errors import ConfigError

LOG = logging.getLogger(__name__)


class StateCorrupt(ConfigError):
    """A state file exists but cannot be read back; the agent refuses to start."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        super().__init__(f"state file {path} is corrupt: {reason}; refusing to start "
                         f"(move it away or run `axoneme agent cleanup`)")


def write_json_atomic(path: str, data: Any) -> None:
    """Replace ``path`` with ``data`` so a crash leaves either the old or the new file."""
    directory = os.path.dirname(path) or "."
    tmp = f"{path}.tmp.{os.getpid()}"
    payload = json.dumps(data, indent=1, sort_keys=True).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, payload)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    # fsync the directory so the rename itself survives a power cut
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def read_json(path: str, expect: type = dict) -> Any | None:
    """The JSON in ``path``; None if it does not exist; StateCorrupt if unreadable."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StateCorrupt(path, str(e)) from e
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StateCorrupt(path, f"invalid JSON: {e}") from e
    if not isinstance(data, expect):
        raise StateCorrupt(path, f"expected a JSON {expect.__name__}, got {type(data).__name__}")
    return data
