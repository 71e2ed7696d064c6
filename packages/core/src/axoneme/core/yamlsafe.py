"""Hardened YAML and JSON loading: the one way user-supplied YAML/JSON is read.

Policy files, cluster descriptions and the agent's config file are written by
users (or dropped into a watched directory), so a hostile file must end in a
clear error, never in a crash, a freeze or exhausted memory:

1. Nesting is bounded *before* anything recurses. PyYAML's C composer
   recurses once per level on the C stack (``[`` x 30000 is a segfault), so
   documents are composed here from the parser's event stream with an
   explicit stack; libyaml's scanner and parser keep their own heap stacks
   and do not recurse. Depth counts through aliases.
2. Aliases share one object between many places but everything downstream
   (validation, problem messages, ``json.dumps`` for the API) sees the
   expanded document, so expanded nodes *and* expanded scalar text are
   bounded, and alias cycles are refused.
3. Integer literals longer than ``MAX_INT_CHARS`` are never converted:
   ``int()`` of a long decimal string raises (CPython's 4300-digit limit) and
   hex/octal/sexagesimal literals build numbers no message can print. They
   load as ``HugeInt``, an int far outside any field's range that prints as
   its (truncated) source text, so validators report them per field.
4. Duplicate mapping keys are refused (as kubectl does): a second
   ``ingress:`` silently replacing the first would drop rules.
5. Timestamps stay strings, as Kubernetes' YAML-to-JSON conversion leaves
   them (documents are passed on as JSON).

Errors are ``InputError`` with the source, the document index and a message
that never embeds more than a short excerpt of the input.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml
from axoneme.core.errors import AxonemeError

__all__ = [
    "MAX_DEPTH", "MAX_EXPANDED_BYTES", "MAX_EXPANDED_NODES", "MAX_INT_CHARS", "HugeInt",
    "InputError", "excerpt", "iter_load_all", "json_problem", "json_text_safe", "load_all", "load_json", "load_one",
]

# Real policies nest about 10 levels (specs[].egress[].toPorts[].rules.http[]
# .headerMatches[].name); 100 leaves room and stays far below Python's
# recursion limit for everything that walks a document afterwards.
MAX_DEPTH = 100
MAX_EXPANDED_NODES = 1_000_000
# Kubernetes refuses objects over ~1.5 MiB (etcd); 16 MiB of expanded text
# is far beyond any real document and far below what hurts.
MAX_EXPANDED_BYTES = 16 * 1024 * 1024
# int64 needs 19 digits (64 in binary); anything longer is out of range for
# every field we read.
MAX_INT_CHARS = 64
EXCERPT_CHARS = 80


def excerpt(value: object, limit: int = EXCERPT_CHARS) -> str:
    """``value`` as text of at most ``limit`` characters (plus an ellipsis).

    Safe for anything a loader returns: huge ints, aliased containers (only a
    bounded prefix of the repr is ever built) and long strings.
    """
    if isinstance(value, str):
        text = value
    elif isinstance(value, HugeInt):
        return str(value)
    elif isinstance(value, bool | float | int) or value is None:
        text = repr(value)
    else:
        text = _bounded_repr(value, limit + 1)
    if len(text) > limit:
        return text[:limit] + "…"
    return text


def _bounded_repr(value: object, limit: int) -> str:
    """A repr-like rendering that stops once ``limit`` characters are produced."""
    out: list[str] = []
    size = 0
    # explicit stack: a container may be deep or shared many times
    stack: list[object] = [value]
    while stack and size < limit:
        v = stack.pop()
        if isinstance(v, _Text):
            piece = v.text
        elif isinstance(v, Mapping):
            stack.append(_Text("}"))
            pairs = list(v.items())[:limit]
            for i, (k, sub) in enumerate(reversed(pairs)):
                stack.append(sub)
                stack.append(_Text(": "))
                stack.append(k)
                if i != len(pairs) - 1:
                    stack.append(_Text(", "))
            piece = "{"
        elif isinstance(v, list | tuple | set | frozenset):
            items = list(v)[:limit]
            stack.append(_Text("]"))
            for i, sub in enumerate(reversed(items)):
                stack.append(sub)
                if i != len(items) - 1:
                    stack.append(_Text(", "))
            piece = "["
        elif isinstance(v, str):
            piece = repr(v[:limit])
        elif isinstance(v, HugeInt):
            piece = str(v)
        elif isinstance(v, bool | int | float) or v is None:
            piece = repr(v)
        else:
            piece = type(v).__name__
        out.append(piece)
        size += len(piece)
    return "".join(out)


@dataclass(frozen=True, slots=True)
class _Text:
    text: str


class HugeInt(int):
    """An integer literal with more than ``MAX_INT_CHARS`` characters.

    Its value is ±10**MAX_INT_CHARS (outside every field's range, so range
    checks reject it) and it prints as a short excerpt of its source text.
    """

    text: str
    length: int

    def __new__(cls, text: str) -> HugeInt:
        negative = text.lstrip().startswith("-")
        self = super().__new__(cls, -(10 ** MAX_INT_CHARS) if negative else 10 ** MAX_INT_CHARS)
        self.text = text[:24] + "…" if len(text) > 24 else text
        self.length = len(text)
        return self

    def __str__(self) -> str:
        return f"{self.text} ({self.length} characters)"

    __repr__ = __str__

    def __format__(self, spec: str) -> str:
        return str(self)


class InputError(AxonemeError):
    """A YAML/JSON input that cannot be loaded (malformed, too deep, too large)."""

    def __init__(self, source: str, message: str, document: int | None = None) -> None:
        self.source = source
        self.message = message
        self.document = document
        where = source if document is None else f"{source}, document {document}"
        super().__init__(f"{where}: {message}")


def _too_long_int(text: str) -> bool:
    return len(text.replace("_", "").lstrip("+-")) > MAX_INT_CHARS


_BaseLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_BaseLoader):  # type: ignore[misc]
    """The safe loader's parser and constructors; composition is ours."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue
            if key_node.value in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found duplicate key \"{excerpt(key_node.value)}\"", key_node.start_mark)
            seen.add(key_node.value)
        result: dict[Any, Any] = super().construct_mapping(node, deep=deep)
        return result

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        if _too_long_int(str(node.value)):
            return HugeInt(str(node.value))
        value: int = super().construct_yaml_int(node)
        return value


_Loader.add_constructor("tag:yaml.org,2002:timestamp", yaml.constructor.SafeConstructor.construct_yaml_str)
_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)


@dataclass(slots=True)
class _Frame:
    node: Any
    mark: Any
    anchor: str | None
    key: Any = None
    has_key: bool = False
    height: int = 0
    nodes: int = 1
    size: int = 0


@dataclass(slots=True)
class _Anchor:
    node: Any
    open: bool = True
    height: int = 1
    nodes: int = 1
    size: int = 0


@dataclass(slots=True)
class _Composer:
    """Builds one document's node graph from events with an explicit stack."""

    loader: Any
    anchors: dict[str, _Anchor] = field(default_factory=dict)
    stack: list[_Frame] = field(default_factory=list)

    def _where(self, mark: Any) -> str:
        if mark is None:
            return ""
        return f" at line {mark.line + 1}, column {mark.column + 1}"

    def _register(self, anchor: str | None, node: Any, event: Any) -> _Anchor | None:
        if anchor is None:
            return None
        if anchor in self.anchors:
            raise yaml.composer.ComposerError(
                f"found duplicate anchor {excerpt(anchor)!r}; first occurrence",
                self.anchors[anchor].node.start_mark, "second occurrence", event.start_mark)
        info = _Anchor(node)
        self.anchors[anchor] = info
        return info

    def _attach(self, node: Any, height: int, nodes: int, size: int, mark: Any) -> Any:
        """Adds ``node`` to the open collection; returns it when it is the root."""
        if len(self.stack) + height > MAX_DEPTH:
            raise _Limit(f"nesting deeper than {MAX_DEPTH} levels"
                         f"{' (through aliases)' if height > 1 else ''}{self._where(mark)}")
        if not self.stack:
            self._check_totals(nodes, size, mark)
            return node
        top = self.stack[-1]
        top.height = max(top.height, height)
        top.nodes += nodes
        top.size += size
        self._check_totals(top.nodes, top.size, mark)
        if isinstance(top.node, yaml.SequenceNode):
            top.node.value.append(node)
        elif top.has_key:
            top.node.value.append((top.key, node))
            top.key, top.has_key = None, False
        else:
            top.key, top.has_key = node, True
        return None

    def _check_totals(self, nodes: int, size: int, mark: Any) -> None:
        if nodes > MAX_EXPANDED_NODES:
            raise _Limit(f"document too large: aliases expand it to more than "
                         f"{MAX_EXPANDED_NODES} nodes{self._where(mark)}")
        if size > MAX_EXPANDED_BYTES:
            raise _Limit(f"document too large: more than {MAX_EXPANDED_BYTES // (1024 * 1024)} MiB "
                         f"of text once aliases are expanded{self._where(mark)}")

    def document(self) -> Any:
        """The root node of the document whose DocumentStartEvent was consumed."""
        ld = self.loader
        root = None
        node: Any
        while True:
            # Any: the C parser's events carry its own Mark type
            event: Any = ld.get_event()
            kind = type(event)  # issubclass, not isinstance: keeps event Any for mypy
            if issubclass(kind, yaml.DocumentEndEvent):
                return root
            if issubclass(kind, yaml.AliasEvent):
                info = self.anchors.get(event.anchor)
                if info is None:
                    raise yaml.composer.ComposerError(
                        None, None, f"found undefined alias {excerpt(event.anchor)!r}", event.start_mark)
                if info.open:
                    raise _Limit(f"recursive YAML aliases are not allowed{self._where(event.start_mark)}")
                got = self._attach(info.node, info.height, info.nodes, info.size, event.start_mark)
            elif issubclass(kind, yaml.ScalarEvent):
                tag = event.tag
                if tag is None or tag == "!":
                    tag = ld.resolve(yaml.ScalarNode, event.value, event.implicit)
                node = yaml.ScalarNode(tag, event.value, event.start_mark, event.end_mark,
                                       style=event.style)
                info = self._register(event.anchor, node, event)
                size = len(event.value)
                if info is not None:
                    info.open, info.size = False, size
                got = self._attach(node, 1, 1, size, event.start_mark)
            elif issubclass(kind, yaml.SequenceStartEvent | yaml.MappingStartEvent):
                if len(self.stack) >= MAX_DEPTH:
                    raise _Limit(f"nesting deeper than {MAX_DEPTH} levels{self._where(event.start_mark)}")
                seq = issubclass(kind, yaml.SequenceStartEvent)
                tag = event.tag
                if tag is None or tag == "!":
                    tag = ld.resolve(yaml.SequenceNode if seq else yaml.MappingNode, None, event.implicit)
                cls = yaml.SequenceNode if seq else yaml.MappingNode
                node = cls(tag, [], event.start_mark, None, flow_style=event.flow_style)
                self._register(event.anchor, node, event)
                self.stack.append(_Frame(node, event.start_mark, event.anchor))
                continue
            elif issubclass(kind, yaml.SequenceEndEvent | yaml.MappingEndEvent):
                frame = self.stack.pop()
                frame.node.end_mark = event.end_mark
                height = frame.height + 1
                if frame.anchor is not None:
                    info = self.anchors[frame.anchor]
                    info.open, info.height, info.nodes, info.size = False, height, frame.nodes, frame.size
                got = self._attach(frame.node, height, frame.nodes, frame.size, frame.mark)
            else:  # pragma: no cover - the parser emits nothing else inside a document
                raise yaml.composer.ComposerError(None, None, f"unexpected {type(event).__name__}",
                                                  getattr(event, "start_mark", None))
            if got is not None:
                root = got


class _Limit(Exception):
    pass


def yaml_error_message(e: yaml.YAMLError) -> str:
    """``invalid YAML: <what> at line L, column C`` for a PyYAML error."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None)
    context = getattr(e, "context", None)
    if problem:
        what = f"{context}: {problem}" if context else str(problem)
    else:
        lines = str(e).splitlines()
        what = lines[0] if lines else type(e).__name__
    what = excerpt(what, 200)
    if mark is not None:
        return f"invalid YAML: {what} at line {mark.line + 1}, column {mark.column + 1}"
    return f"invalid YAML: {what}"


def iter_load_all(data: bytes | str, source: str = "<input>") -> Iterator[Any]:
    """Each document of a YAML stream (``None`` for an empty one).

    Raises ``InputError`` (with the index of the failing document) on the
    first document that is malformed or over a bound; the documents before
    it have been yielded.
    """
    loader = _Loader(data)
    index = 0
    try:
        if not loader.check_event(yaml.StreamStartEvent):  # pragma: no cover
            raise yaml.parser.ParserError(None, None, "expected a stream", None)
        loader.get_event()
        while not loader.check_event(yaml.StreamEndEvent):
            loader.get_event()  # DocumentStartEvent
            root = _Composer(loader).document()
            yield None if root is None else loader.construct_document(root)
            index += 1
    except _Limit as e:
        raise InputError(source, str(e), index) from None
    except yaml.YAMLError as e:
        raise InputError(source, yaml_error_message(e), index) from None
    except RecursionError:
        # not expected with the bounds above; still the input's fault
        raise InputError(source, f"invalid YAML: nesting deeper than {MAX_DEPTH} levels", index) from None
    except (ValueError, TypeError, OverflowError) as e:
        # The constructors can fail outside YAMLError on odd scalars (e.g.
        # out-of-range timestamps or floats); still the user's input.
        raise InputError(source, f"invalid YAML: {excerpt(str(e), 200)}", index) from None
    finally:
        dispose = getattr(loader, "dispose", None)
        if dispose is not None:
            dispose()


def load_all(data: bytes | str, source: str = "<input>") -> list[Any]:
    """Every document of a YAML stream; ``InputError`` if any is bad."""
    return list(iter_load_all(data, source))


def load_one(data: bytes | str, source: str = "<input>") -> Any:
    """The single document of a YAML stream (``None`` if empty); ``InputError``
    if it is bad or there is more than one document."""
    docs = load_all(data, source)
    if len(docs) > 1:
        raise InputError(source, f"expected a single document, found {len(docs)}", 1)
    return docs[0] if docs else None


def _json_int(text: str) -> int:
    if _too_long_int(text):
        return HugeInt(text)
    return int(text)


def _depth_over(obj: Any, limit: int) -> bool:
    """Whether ``obj`` nests deeper than ``limit`` (walked without recursion)."""
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, Mapping):
            children: Any = o.values()
        elif isinstance(o, list):
            children = o
        else:
            continue
        if d > limit:
            return True
        stack.extend((c, d + 1) for c in children if isinstance(c, Mapping | list))
    return False


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def json_problem(obj: Any, max_depth: int = MAX_DEPTH) -> tuple[str, str] | None:
    """(field path, what) for the first part of ``obj`` that a Kubernetes
    JSON object cannot carry, or None.

    Nesting deeper than ``max_depth``, integers outside int64 (``HugeInt``
    included), NaN/infinite floats and non-JSON values (``!!binary``,
    ``!!set``). A document that passes survives ``json.dumps`` and a reload
    by ``load_json`` unchanged, so whatever is accepted can be persisted and
    read back at the next start. Walked without recursion.
    """
    # A path is built only for the problem found: the walk carries (parent,
    # key, is-a-list-index) links (a policy of 50k peers has 100k keys and
    # items; rendering each one's path cost more than the walk itself).
    seen: set[int] = set()
    stack: list[tuple[Any, _PathLink, int]] = [(obj, None, 1)]
    while stack:
        o, link, depth = stack.pop()
        t = type(o)  # exact dict and list first: no ABC check
        if t is dict or t is list or isinstance(o, Mapping | list):
            if depth > max_depth:
                return _path(link), f"nesting deeper than {max_depth} levels"
            if id(o) in seen:
                continue  # an alias of a subtree already checked
            seen.add(id(o))
            # values that are always fine are not walked (the order problems
            # are found in stays the document's)
            if t is list or (t is not dict and isinstance(o, list)):
                stack.extend((v, (link, i, True), depth + 1)
                             for i, v in reversed(list(enumerate(o))) if type(v) not in _FINE)
                continue
            for k, v in reversed(list(o.items())):
                if type(k) is not str:
                    bad = _scalar_problem(k)
                    if bad is not None:
                        return _path((link, k, False)), f"key: {bad}"
                if type(v) not in _FINE:
                    stack.append((v, (link, k, False), depth + 1))
            continue
        bad = _scalar_problem(o)
        if bad is not None:
            return _path(link), bad
    return None


# what in JSON text could decode to something json_problem objects to: NaN and
# infinities (json.loads takes them, and a float literal with an exponent may
# overflow to one) and integers of 19+ digits (int64 has 19)
_JSON_SUSPECT = re.compile(rb"NaN|Infinity|[0-9][eE]|[0-9]{19}")


def json_text_safe(text: bytes, max_depth: int = MAX_DEPTH) -> bool:
    """Whether ``json.loads(text)``, and every part of it, is proven to pass
    ``json_problem`` from the text alone: no more brackets than ``max_depth``
    (so no deeper nesting), no NaN or infinity token, no float literal with
    an exponent, no run of 19+ digits (JSON keys are strings). False says
    only "not proven" (the text may be fine; ``json_problem`` decides): a
    suspect run inside a string is enough. A scan of the bytes, no walk of
    the decoded objects (issue 17, B5CUT: the API's small policy bodies)."""
    return (text.count(b"{") + text.count(b"[") <= max_depth
            and _JSON_SUSPECT.search(text) is None)


# scalar types json_problem never objects to (exact types: a HugeInt is an int)
_FINE = frozenset({str, bool, type(None)})
# (parent link, mapping key or list index, whether it is an index); None: the root
_PathLink = tuple[Any, Any, bool] | None


def _path(link: _PathLink) -> str:
    """The field path of ``link``: ``a.b[2].c``, keys shown by ``excerpt``."""
    steps: list[tuple[Any, bool]] = []
    while link is not None:
        link, step, index = link
        steps.append((step, index))
    path = ""
    for step, index in reversed(steps):
        if index:
            path = f"{path}[{step}]"
        else:
            path = f"{path}.{excerpt(step)}" if path else excerpt(step)
    return path


def _scalar_problem(o: Any) -> str | None:
    if o is None or isinstance(o, str | bool):
        return None
    if isinstance(o, int):
        if isinstance(o, HugeInt) or not INT64_MIN <= o <= INT64_MAX:
            return f"integer {excerpt(o)} out of range (64-bit)"
        return None
    if isinstance(o, float):
        if o != o or o in (float("inf"), float("-inf")):
            return f"number {o!r} is not finite (JSON has no NaN or infinity)"
        return None
    return f"a {type(o).__name__} value cannot be represented in JSON"


def load_json(
    data: bytes | str, source: str = "<input>",
    object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None,
    max_depth: int = MAX_DEPTH,
) -> Any:
    """One JSON value, with the YAML loader's depth and integer bounds.

    ``InputError`` names ``source`` for malformed JSON, a non-UTF-8 file,
    nesting deeper than ``max_depth`` or an error of ``object_pairs_hook``.
    """
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise InputError(source, f"invalid JSON: not UTF-8 ({e.reason})") from None
    else:
        text = data
    try:
        obj = json.loads(text, parse_int=_json_int, object_pairs_hook=object_pairs_hook)
    except json.JSONDecodeError as e:
        raise InputError(source, f"invalid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    except RecursionError:
        raise InputError(source, f"invalid JSON: nesting deeper than {max_depth} levels") from None
    except ValueError as e:
        raise InputError(source, f"invalid JSON: {excerpt(str(e), 200)}") from None
    if _depth_over(obj, max_depth):
        raise InputError(source, f"invalid JSON: nesting deeper than {max_depth} levels")
    return obj
