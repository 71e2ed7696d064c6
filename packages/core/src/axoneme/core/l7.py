"""The L7 parser contract (``axoneme.l7`` entry points).

A parser owns everything about its protocol that a policy, the proxy and
``axoneme policy trace`` need; core never names one:

- its rule schema: ``parse_rules`` parses and validates the rules of one
  ``toPorts[].rules`` block, reporting problems with field paths;
- how a policy selects it: Cilium's built-in fields (``rules: {http: [...]}``,
  ``kafka``, ``dns``) for parsers whose ``rules_field`` is set, and the
  generic form ``rules: {l7proto: NAME, l7: [{key: value}, ...]}`` for any
  installed parser;
- its transport (the L4 protocols its proxy serves), its default proxy port,
  the policy directions it may be used in;
- its trace inputs: the keys ``policy trace --l7 KEY=VALUE`` accepts;
- its matcher (shared by the proxy and ``policy trace``) and proxy factory.

DNS parsers also feed toFQDNs selectors: they implement ``FQDNParser``.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from axoneme.core.mapstate import Direction
from axoneme.core.policy.walk import Walker, join

# Proxy port of a parser that does not declare one (offline tools, tests).
DEFAULT_PROXY_PORT = 15000


@dataclass(frozen=True, slots=True)
class L7Request:
    """What the matcher sees of one request; parser-specific fields in ``fields``."""

    fields: dict[str, Any] = field(default_factory=dict, hash=False)


@dataclass(frozen=True, slots=True)
class L7Verdict:
    allowed: bool
    rule: int | None = None  # index of the matching rule
    reason: str = ""


@dataclass(frozen=True, slots=True)
class GenericRule:
    """One item of Cilium's generic ``l7: [{key: value, ...}]`` list (``PortRuleL7``).

    ``fields`` are the item's pairs, sorted by key (hashable, so equal rules merge)."""

    fields: tuple[tuple[str, str], ...] = ()

    def get(self, key: str, default: str | None = None) -> str | None:
        for k, v in self.fields:
            if k == key:
                return v
        return default

    def as_dict(self) -> dict[str, str]:
        return dict(self.fields)


@dataclass(frozen=True, slots=True)
class RuleContext:
    """Where a ``rules`` block sits: what ``check_context`` may refuse."""

    direction: Direction
    ports: tuple[Any, ...]  # the toPorts[].ports items that parsed (PortProtocol)
    port_items: int  # how many ports items were given (parsed or not)
    ports_path: str  # e.g. spec.egress[0].toPorts[0].ports
    rules_path: str  # e.g. spec.egress[0].toPorts[0].rules.dns


class L7Parser(abc.ABC):
    """A protocol parser + rule matcher + proxy factory.

    Subclasses set the class attributes and implement ``match``; they
    override ``parse_rule`` (one rule item) or ``parse_rules`` (the whole
    list) when their rules are not plain ``{key: value}`` pairs.
    """

    name: ClassVar[str] = "abstract"
    # The key under toPorts[].rules that holds this parser's rules in Cilium's
    # built-in form (``http``, ``kafka``, ``dns``), or None: the parser is
    # selected with the generic ``l7proto: NAME`` + ``l7: [...]`` form only.
    rules_field: ClassVar[str | None] = None
    # L4 protocols the proxy serves (the ports of an L7 rule must be one of
    # them; ANY is accepted when there are several).
    transport: ClassVar[tuple[str, ...]] = ("TCP",)
    default_proxy_port: ClassVar[int] = DEFAULT_PROXY_PORT
    # Policy directions the rules may appear in.
    directions: ClassVar[frozenset[Direction]] = frozenset({Direction.INGRESS, Direction.EGRESS})
    # ``policy trace --l7 KEY=VALUE``: accepted keys -> what they mean. Empty
    # = any key (handed to ``request_from_trace`` as given).
    trace_inputs: ClassVar[Mapping[str, str]] = {}
    # Fields a generic ``l7`` rule item may have (None = any key).
    rule_fields: ClassVar[frozenset[str] | None] = None

    # -- policy schema -------------------------------------------------------------

    def parse_rules(self, value: object, path: str, w: Walker) -> tuple[Any, ...]:
        """Parse and validate the rule list at ``path``; record every problem on
        ``w`` (``axoneme.core.policy.walk.Walker``: typed accessors that report
        wrong types and unknown fields with their paths).

        Returns the rules (their objects reach ``match`` and the proxy). An
        empty tuple allows every request (visibility only), which is also what
        one empty rule means."""
        rules: list[Any] = []
        for i, raw in enumerate(w.list(value, path)):
            rule = self.parse_rule(raw, f"{path}[{i}]", w)
            if rule is not None:
                rules.append(rule)
        if any(self.is_empty_rule(r) for r in rules):
            return ()
        return tuple(rules)

    def parse_rule(self, value: object, path: str, w: Walker) -> Any:
        """One rule item, or None after recording its problems. The default is a
        ``GenericRule`` of string pairs (Cilium's ``PortRuleL7``), checked
        against ``rule_fields`` and ``check_field``."""
        m = w.mapping(value, path, self.rule_fields)
        if m is None:
            return None
        n = len(w.problems)
        pairs: list[tuple[str, str]] = []
        for k, v in m.items():
            text = w.string(v, join(path, k))
            if text is None:
                continue
            why = self.check_field(k, text)
            if why:
                w.problem(join(path, k), why)
                continue
            pairs.append((k, text))
        if len(w.problems) != n:
            return None
        return GenericRule(tuple(sorted(pairs)))

    def check_field(self, key: str, value: str) -> str | None:
        """A problem with one generic rule field, or None."""
        return None

    def is_empty_rule(self, rule: Any) -> bool:
        """Whether ``rule`` matches every request (then the whole list does)."""
        return isinstance(rule, GenericRule) and not rule.fields

    def check_context(self, ctx: RuleContext, w: Walker) -> None:
        """Refuse rules where they cannot apply (beyond transport and direction):
        record problems on ``w``. The default accepts every place."""
        return None

    # -- proxy and trace -------------------------------------------------------------

    @abc.abstractmethod
    def match(self, rules: Sequence[Any], request: L7Request) -> L7Verdict:
        """Decide one request against the rules of one entry (empty = allow all)."""

    def request_from_trace(self, options: dict[str, Any]) -> L7Request:
        """Build a request from ``policy trace`` inputs (``--l7 KEY=VALUE`` pairs
        and the ``--http-*``/``--kafka-*`` shorthands, e.g. ``http_method``)."""
        if not self.trace_inputs:
            return L7Request(dict(options))
        return L7Request({k: v for k, v in options.items() if k in self.trace_inputs})

    def with_shorthands(self, options: Mapping[str, Any], prefix: str) -> dict[str, Any]:
        """``options`` where each ``--l7 KEY=VALUE`` trace input also stands as the
        parser's shorthand ``<prefix>_KEY`` (``--http-method`` -> ``http_method``);
        a shorthand given on the command line wins."""
        out = dict(options)
        for key in self.trace_inputs:
            if options.get(key) is not None and out.get(f"{prefix}_{key}") is None:
                out[f"{prefix}_{key}"] = options[key]
        return out

    def proxy_factory(self) -> Any:
        """Return a callable building the proxy server for this parser, or None."""
        return None

    def rule_json(self, rule: Any) -> dict[str, Any]:
        """How ``policy trace -o json`` shows one rule (without the parser name)."""
        if isinstance(rule, GenericRule):
            return rule.as_dict()
        return {"rule": repr(rule)}


def default_proxy_port(parser: str) -> int:
    """The installed parser's ``default_proxy_port`` (DEFAULT_PROXY_PORT when it
    is not installed or does not load: the policy then fails closed there)."""
    from axoneme.core.errors import PluginError
    from axoneme.core.plugins import l7_parser

    try:
        return int(l7_parser(parser).default_proxy_port)
    except PluginError:
        return DEFAULT_PROXY_PORT


def fqdn_parser() -> FQDNParser | None:
    """The installed parser that learns names for toFQDNs, if any (the first
    by name when several are: nothing here names one)."""
    from axoneme.core.plugins import registry

    for parser in registry().l7_parsers().values():
        if isinstance(parser, FQDNParser):
            return parser
    return None


class FQDNParser(L7Parser):
    """A DNS parser that also learns names for toFQDNs selectors.

    The agent checks ``isinstance(parser, FQDNParser)`` and ``policy trace``
    uses ``fqdn_matches``; nothing names the parser."""

    @abc.abstractmethod
    def fqdn_matches(self, selector: Any, name: str) -> bool:
        """Whether a toFQDNs selector (``FQDNPeer``: matchName/matchPattern)
        selects ``name`` (lower case, no trailing dot)."""

    @abc.abstractmethod
    def new_fqdn_cache(self, **kwargs: Any) -> Any:
        """A cache of names learned from DNS answers -> IPs with TTLs (one per node)."""

    @abc.abstractmethod
    def bind_engine(self, cache: Any, engine: Any) -> Any:
        """Keep ``engine.update_fqdn`` in step with ``cache``; returns an object
        with ``resync()`` and ``close()``."""

    @abc.abstractmethod
    def proxy_config(self, **kwargs: Any) -> Any:
        """The DNS proxy's extra configuration (reject rcode, timeouts, ...)."""


__all__ = ["DEFAULT_PROXY_PORT", "FQDNParser", "default_proxy_port", "fqdn_parser", "GenericRule", "L7Parser", "L7Request", "L7Verdict",
           "RuleContext"]
