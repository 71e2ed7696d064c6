"""Atomic JSON state files: write tmp + fsync + rename, refuse corrupt ones.

A state file is ours, but it may be damaged (disk, a crash in another tool,
a hand edit): reading one never raises anything but ``StateCorrupt`` naming
the file and what is wrong, whatever its bytes.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO

from axoneme.core import yamlsafe
from axoneme.core.errors import ConfigError
from axoneme.core.policy.walk import type_name

LOG = logging.getLogger(__name__)


class StateCorrupt(ConfigError):
    """A state file exists but cannot be read back; the agent refuses to start."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        super().__init__(f"state file {path} is corrupt: {reason}; refusing to start "
                         f"(move it away or run `axoneme agent cleanup`)")


# a policy document whose compact JSON is longer than this is kept packed
PACK_MIN_BYTES = 1 << 16


@dataclass(frozen=True, slots=True)
class PackedDocument:
    """A policy document as it was given, kept as zlib-compressed compact JSON
    (issue 17: a 100k-peer ``fromCIDR`` list is ~7 MB of ``str`` objects for
    as long as the policy is applied, ~0.4 MB packed). Decoded when read:
    ``policy get -o yaml``, promote, the state file and its journal (written
    as the document itself: the same bytes as before)."""

    data: bytes
    # the document's metadata.labels (when a dict), kept unpacked: `policy list`
    # shows them for every policy and stays O(1) in a policy's size
    labels: dict[str, Any] | None = None

    def unpack(self) -> Any:
        return json.loads(zlib.decompress(self.data))


def pack_document(obj: Any) -> Any:
    """``obj`` as a PackedDocument when its JSON is longer than
    ``PACK_MIN_BYTES``, else ``obj`` itself. Key order and values survive
    (the document passed the parser's JSON round-trip check)."""
    if isinstance(obj, PackedDocument) or not isinstance(obj, dict):
        return obj
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) <= PACK_MIN_BYTES:
        return obj
    return PackedDocument(zlib.compress(text, 6), document_labels(obj))


def unpack_document(obj: Any) -> Any:
    """A stored document as its JSON object (``pack_document`` undone)."""
    return obj.unpack() if isinstance(obj, PackedDocument) else obj


def document_labels(obj: Any) -> dict[str, Any] | None:
    """A stored document's ``metadata.labels`` (a dict, else None), packed or
    not, without decoding a packed one."""
    if isinstance(obj, PackedDocument):
        return obj.labels
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    labels = meta.get("labels") if isinstance(meta, dict) else None
    return labels if isinstance(labels, dict) else None


def json_default(obj: Any) -> Any:
    """``json``'s ``default``: a PackedDocument is written as its document."""
    if isinstance(obj, PackedDocument):
        return obj.unpack()
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def write_json_atomic(path: str, data: Any) -> None:
    """Replace ``path`` with ``data`` so a crash leaves either the old or the new file."""
    directory = os.path.dirname(path) or "."
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        try:
            _write_json(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        # never leave a truncated tmp file behind; the old state stays intact
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    os.replace(tmp, path)
    # fsync the directory so the rename itself survives a power cut
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


# json.dumps(data, indent=1, sort_keys=True), the bytes a state file always had
_ENCODER = json.JSONEncoder(indent=1, sort_keys=True, default=json_default)
_WRITE_PIECE = 1 << 16


def _write_json(fd: int, data: Any) -> None:
    """``data`` as JSON, written ~64 KiB at a time (issue 17: RSS). The text as
    one string was first a list of every piece the encoder yields (with an
    indent it is the pure-Python encoder): at 100k CIDR identities ~1M small
    strings and then a ~20 MB string, on top of the whole state (an adopting
    restart writes it after its rebuild: the heap's high-water mark 238 -> 213
    MiB of pymalloc arenas at 100k peers)."""
    buf: list[str] = []
    size = 0
    for piece in _ENCODER.iterencode(data):
        buf.append(piece)
        size += len(piece)
        if size >= _WRITE_PIECE:
            _write_all(fd, "".join(buf).encode())
            buf.clear()
            size = 0
    if buf:
        _write_all(fd, "".join(buf).encode())


def _write_all(fd: int, payload: bytes) -> None:
    """``os.write`` until every byte is written: it may write fewer (signals,
    pipes, quotas, some filesystems) and a short state file is a corrupt one."""
    view = memoryview(payload)
    while view:
        n = os.write(fd, view)
        if n <= 0:  # pragma: no cover - os.write raises rather than return 0 for files
            raise OSError(f"write returned {n}")
        view = view[n:]


def append_line(path: str, line: bytes, sync: bool = True) -> None:
    """Append one journal line (a crash may leave it torn: ``read_journal``
    drops a last line without its newline). Written, it survives the
    process; ``sync`` (or a later ``sync_file``) makes it survive a power
    cut. A new file is always synced with its directory entry."""
    new = not os.path.exists(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        _write_all(fd, line)
        if sync or new:
            os.fdatasync(fd)
    finally:
        os.close(fd)
    if new:  # the file's own directory entry must survive a power cut too
        dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


class JournalFile:
    """The journal, kept open between records (``append_line``'s contract):
    a record is one ``write`` (and a ``stat`` that the path still names the
    file held), not an exists check, open and close each (issue 17, B5CUT:
    ~50 us of a policy change on a cold agent). A path that no longer names
    the file held (removed, replaced) is opened anew; so is one after a
    failed write. A new file is synced with its directory entry."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file: BinaryIO | None = None
        self._id: tuple[int, int] = (0, 0)  # (st_dev, st_ino) of the file held

    def append(self, line: bytes) -> None:
        """Append one line; written, it survives the process (``sync``: a power cut)."""
        f = self._file
        if f is not None:
            try:
                st = os.stat(self.path)
                same = (st.st_dev, st.st_ino) == self._id
            except FileNotFoundError:
                same = False
            if not same:
                self.close()
                f = None
        new = False
        if f is None:
            new = not os.path.exists(self.path)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            st = os.fstat(fd)
            f = self._file = os.fdopen(fd, "ab", buffering=0)
            self._id = (st.st_dev, st.st_ino)
        try:
            _write_all(f.fileno(), line)
            if new:
                os.fdatasync(f.fileno())
        except OSError:
            self.close()
            raise
        if new:  # the file's own directory entry must survive a power cut too
            dfd = os.open(os.path.dirname(self.path) or ".", os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    def sync(self) -> None:
        """fdatasync what ``append`` wrote."""
        if self._file is None:
            sync_file(self.path)
        else:
            os.fdatasync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            f, self._file = self._file, None
            f.close()


def sync_file(path: str) -> None:
    """fdatasync an existing file (what ``append_line(sync=False)`` wrote)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def _read_capped(f: BinaryIO) -> bytes:
    """At most ``STATE_MAX_BYTES + 1`` bytes of ``f``, in a buffer the size
    of the file (``read(STATE_MAX_BYTES + 1)`` mapped a 256 MiB buffer
    first, at every read; no measurable RSS change at 100k, RSS17C)."""
    size = os.fstat(f.fileno()).st_size
    raw = f.read(min(size, STATE_MAX_BYTES) + 1)
    if len(raw) > size:  # it grew meanwhile: the rest, up to the cap
        raw += f.read(max(0, STATE_MAX_BYTES + 1 - len(raw)))
    return raw


def read_journal(path: str) -> list[dict[str, Any]]:
    """The records of a JSON-lines journal, oldest first ([] when there is
    none). A torn last line (a crash while appending) is dropped; any other
    bad line is StateCorrupt."""
    try:
        with open(path, "rb") as f:
            raw = _read_capped(f)
    except FileNotFoundError:
        return []
    except OSError as e:
        raise StateCorrupt(path, f"cannot read: {e}") from e
    if len(raw) > STATE_MAX_BYTES:
        raise StateCorrupt(path, f"larger than {STATE_MAX_BYTES} bytes")
    lines = raw.split(b"\n")
    complete, torn = lines[:-1], lines[-1]
    if torn:
        LOG.warning("%s: dropping a torn last record (%d bytes)", path, len(torn))
    out: list[dict[str, Any]] = []
    for n, line in enumerate(complete, 1):
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError) as e:
            raise StateCorrupt(path, f"line {n}: {e}") from e
        if not isinstance(rec, dict):
            raise StateCorrupt(path, f"line {n}: expected an object, got {type_name(rec)}")
        out.append(rec)
    return out


# What the agent writes nests about 25 levels (a policy document inside
# policies.<key>.doc.obj); policy documents are bounded at yamlsafe.MAX_DEPTH.
STATE_MAX_DEPTH = yamlsafe.MAX_DEPTH + 10
# The agent's state is a few MB at most; refuse to slurp a runaway file.
STATE_MAX_BYTES = 256 * 1024 * 1024


def read_json(path: str, expect: type = dict, trusted: bool = False) -> Any | None:
    """The JSON in ``path``; None if it does not exist; StateCorrupt if unreadable.

    Malformed JSON, nesting deeper than ``STATE_MAX_DEPTH``, numbers the
    agent never writes (integers beyond 64 bits, NaN, infinities) and a
    top-level value that is not ``expect`` are all ``StateCorrupt``.
    ``trusted``: the bytes are known to be exactly what this agent wrote (a
    restart checkpoint's fingerprint, _checkpoint): plain JSON parsing, the
    walks for depth and numbers skipped (a few tenths of a second at 100k
    policy peers).
    """
    try:
        with open(path, "rb") as f:
            raw = _read_capped(f)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StateCorrupt(path, str(e)) from e
    if len(raw) > STATE_MAX_BYTES:
        raise StateCorrupt(path, f"larger than {STATE_MAX_BYTES // (1024 * 1024)} MiB")
    try:
        data = json.loads(raw) if trusted else yamlsafe.load_json(raw, path,
                                                                  max_depth=STATE_MAX_DEPTH)
    except yamlsafe.InputError as e:
        raise StateCorrupt(path, e.message) from None
    except (ValueError, RecursionError) as e:  # trusted, and yet
        raise StateCorrupt(path, str(e)) from None
    if not isinstance(data, expect):
        raise StateCorrupt(path, f"expected a JSON {expect.__name__}, got {type_name(data)}")
    bad = None if trusted else yamlsafe.json_problem(data, STATE_MAX_DEPTH)
    if bad is not None:
        raise StateCorrupt(path, f"{bad[0] or 'top level'}: {bad[1]}")
    return data


def _int_field(path: str, where: str, value: object, minimum: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise StateCorrupt(path, f"{where}: expected an integer, got {type_name(value)} "
                                 f"{yamlsafe.excerpt(value)}")
    if value < minimum:
        raise StateCorrupt(path, f"{where}: expected an integer >= {minimum}, got {value}")


def _mapping(path: str, where: str, value: object) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise StateCorrupt(path, f"{where}: expected a mapping, got {type_name(value)}")
    return value


def read_agent_state(path: str, trusted: bool = False) -> dict[str, Any] | None:
    """The agent's ``state.json`` (None if absent), its shape checked.

    Raises ``StateCorrupt(path, "<field path>: <what>")`` for anything the
    agent would not have written: the file-level problems of ``read_json``
    (malformed JSON, nesting, integers beyond 64 bits or NaN/infinity
    anywhere, persisted policies included), a ``version``,
    ``policy_revision`` or ``next_endpoint_id`` that is not a plain integer,
    a section (``namespaces``, ``pods``, ``endpoints``, ``identities``,
    ``policies``) that is not a mapping, a namespace/pod/endpoint record
    that is not a mapping and a malformed ``identities`` entry. The records
    under ``policies`` are left to the restore path, which names a policy
    that no longer parses and never drops it silently. ``trusted``: see
    ``read_json``.
    """
    data: dict[str, Any] | None = read_json(path, trusted=trusted)
    if data is None:
        return None
    if "version" in data:
        _int_field(path, "version", data["version"])
    for key, minimum in (("policy_revision", 0), ("next_endpoint_id", 1)):
        if key in data:
            _int_field(path, key, data[key], minimum)
    for section in ("namespaces", "pods", "endpoints"):
        for key, rec in _mapping(path, section, data.get(section, {})).items():
            _mapping(path, f"{section}.{yamlsafe.excerpt(key)}", rec)
    for key, ids in _mapping(path, "identities", data.get("identities", {})).items():
        where = f"identities.{yamlsafe.excerpt(key)}"
        if not (key.isascii() and key.isdigit() and len(key) <= 10):
            raise StateCorrupt(path, f"{where}: expected an identity number as the key")
        if not isinstance(ids, list):
            raise StateCorrupt(path, f"{where}: expected a list, got {type_name(ids)}")
    # Each policy record's shape and whether it still parses is the restore
    # path's business: it names the policy and never drops it silently.
    _mapping(path, "policies", data.get("policies", {}))
    return data
