"""What every listing command shares (kubectl's conventions, docs/cli.md "CLI conventions"):

- ``-o table|wide|json|yaml``: ``table`` is the command's own table (unchanged),
  ``wide`` the same table with more columns, ``json`` the documented JSON
  shape, ``yaml`` the same document as YAML;
- ``-l/--selector SELECTOR``: only the items whose labels match a Kubernetes
  label selector (``k=v``, ``k==v``, ``k!=v``, ``k in (a,b)``,
  ``k notin (a,b)``, ``k``, ``!k``; requirements joined by commas are ANDed),
  parsed by ``parse_selector`` into core's ``LabelSelector`` so it matches
  exactly as policy selectors do (a key without a source matches any source;
  ``k8s:app=web`` names one).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from axoneme.agent.cli import UsageError
from axoneme.core.labels import Label, Labels, valid_label_key, valid_label_value
from axoneme.core.selectors import LabelSelector, Operator, Requirement, split_selector_key

LIST_FORMATS = ("table", "wide", "json", "yaml")

SELECTOR_HELP = ("only items whose labels match this label selector (kubectl syntax: k=v, k!=v, "
                 "'k in (a,b)', 'k notin (a,b)', k, !k; comma-separated requirements are ANDed)")


def add_list_flags(p: argparse.ArgumentParser, what: str, selector: bool = True) -> None:
    """``-o table|wide|json|yaml`` and (unless ``selector`` is False) ``-l/--selector``."""
    p.add_argument("-o", "--output", choices=list(LIST_FORMATS), default="table",
                   help=f"table (default), wide (more columns), json or yaml: {what}")
    if selector:
        p.add_argument("-l", "--selector", default=None, metavar="SELECTOR", type=_selector_arg,
                       help=SELECTOR_HELP)


# -- label selectors ------------------------------------------------------------------------

_SET_RE = re.compile(r"^(?P<key>\S+)\s+(?P<op>in|notin)\s*\((?P<values>[^()]*)\)$")
_EQ_RE = re.compile(r"^(?P<key>[^!=\s]+)\s*(?P<op>==|=|!=)\s*(?P<value>\S*)$")


def _split_requirements(text: str) -> list[str]:
    """Split at commas outside parentheses (``a in (x,y),b`` -> two requirements)."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise UsageError(f"invalid label selector {text!r}: unbalanced ')' (--selector)")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if depth:
        raise UsageError(f"invalid label selector {text!r}: unclosed '(' (--selector)")
    return [*parts, cur]


def _check_key(key: str, text: str) -> str:
    _, bare = split_selector_key(key)
    if not valid_label_key(bare):
        raise UsageError(f"invalid label selector {text!r}: {key!r} is not a label key "
                         f"([source:][prefix/]name) (--selector)")
    return key


def _check_value(value: str, text: str) -> str:
    if not valid_label_value(value):
        raise UsageError(f"invalid label selector {text!r}: {value!r} is not a label value "
                         f"(--selector)")
    return value


def parse_selector(text: str) -> LabelSelector:
    """A kubectl label selector -> core's LabelSelector; UsageError (exit 2) naming what is wrong."""
    reqs: list[Requirement] = []
    if not text.strip():
        raise UsageError("empty label selector (--selector)")
    for raw in _split_requirements(text):
        part = raw.strip()
        if not part:
            raise UsageError(f"invalid label selector {text!r}: empty requirement (--selector)")
        if m := _SET_RE.match(part):
            values = [v.strip() for v in m["values"].split(",")]
            if not any(values):
                raise UsageError(f"invalid label selector {text!r}: {m['op']} needs at least one "
                                 f"value (--selector)")
            op = Operator.IN if m["op"] == "in" else Operator.NOT_IN
            reqs.append(Requirement(_check_key(m["key"], text), op,
                                    frozenset(_check_value(v, text) for v in values)))
        elif m := _EQ_RE.match(part):
            op = Operator.NOT_IN if m["op"] == "!=" else Operator.IN
            reqs.append(Requirement(_check_key(m["key"], text), op,
                                    frozenset({_check_value(m["value"], text)})))
        elif part.startswith("!") and " " not in part:
            reqs.append(Requirement(_check_key(part[1:], text), Operator.DOES_NOT_EXIST))
        elif re.fullmatch(r"[^\s!=<>(),]+", part):
            reqs.append(Requirement(_check_key(part, text), Operator.EXISTS))
        else:
            raise UsageError(f"invalid label selector {text!r}: cannot parse {part!r}; expected "
                             f"k=v, k!=v, 'k in (a,b)', 'k notin (a,b)', k or !k (--selector)")
    return LabelSelector(frozenset(reqs))


def _selector_arg(text: str) -> LabelSelector:
    """argparse type: a bad selector is a usage error (exit 2) before anything is asked."""
    try:
        return parse_selector(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e).removesuffix(" (--selector)")) from None


def labels_of(value: Mapping[str, str] | Iterable[str] | None) -> Labels:
    """Labels of a listed item: a ``{k: v}`` mapping (source k8s) or ``source:k=v`` strings."""
    if value is None:
        return Labels()
    if isinstance(value, Mapping):
        return Labels(Label("k8s", str(k), str(v)) for k, v in value.items())
    return Labels.from_strings(value)


def select(args: argparse.Namespace, items: Sequence[Any],
           labels: Callable[[Any], Mapping[str, str] | Iterable[str] | None]) -> list[Any]:
    """``items`` whose labels match ``--selector`` (all of them when it is not given)."""
    sel = getattr(args, "selector", None)
    if sel is None:
        return list(items)
    if isinstance(sel, str):
        sel = parse_selector(sel)
    return [it for it in items if sel.matches(labels_of(labels(it)))]


# -- printing -------------------------------------------------------------------------------

def dump_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=False, default=str)
    sys.stdout.write("\n")


def dump_yaml(data: Any) -> None:
    import yaml

    # through JSON first: the same document as -o json (tuples, non-str scalars alike)
    plain = json.loads(json.dumps(data, default=str))
    sys.stdout.write(yaml.safe_dump(plain, sort_keys=False, default_flow_style=False,
                                    allow_unicode=True))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(c) for c in headers]] + [[("" if c is None else str(c)) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for r in cells:
        sys.stdout.write("   ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip() + "\n")


def emit(args: argparse.Namespace, document: Any, render: Callable[[bool], None]) -> int:
    """Print a listing: the JSON ``document`` as json/yaml, else ``render(wide)``."""
    output = getattr(args, "output", "table")
    if output == "json":
        dump_json(document)
    elif output == "yaml":
        dump_yaml(document)
    else:
        render(output == "wide")
    return 0


def joined_labels(labels: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
