"""The dns L7 parser: ``rules.dns`` matching for the proxy and ``policy trace``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from axoneme.core.l7 import FQDNParser, L7Request, L7Verdict, RuleContext
from axoneme.core.mapstate import Direction
from axoneme.core.policy.fqdn import fqdn_selector
from axoneme.core.policy.walk import Walker
from axoneme.l7.dns._match import match_query, normalize_name
from axoneme.l7.dns._rules import DNSRule

__all__ = ["DnsParser"]


class DnsParser(FQDNParser):
    """``rules.dns[]``: a query is allowed when one entry's matchName or
    matchPattern selects its name. Only the query name counts (not the
    qtype), as in Cilium. An empty rule list allows every query. Egress only,
    on port 53 over UDP and TCP; also learns names for toFQDNs."""

    name = "dns"
    rules_field = "dns"
    transport = ("TCP", "UDP")
    default_proxy_port = 15053
    directions = frozenset({Direction.EGRESS})
    trace_inputs = {
        "query": "the query name, e.g. api.example.com (also dns_query, qname)",
        "qtype": "the query type (default A)",
    }

    def parse_rule(self, value: object, path: str, w: Walker) -> DNSRule | None:
        """One ``rules.dns[]`` item: Cilium's FQDNSelector (matchName | matchPattern)."""
        pair = fqdn_selector(w, value, path)
        return DNSRule(pair[0], pair[1]) if pair is not None else None

    def is_empty_rule(self, rule: Any) -> bool:
        return bool(rule == DNSRule())

    def check_context(self, ctx: RuleContext, w: Walker) -> None:
        if ctx.port_items == 0:
            w.problem(ctx.ports_path, "port 53 must be specified for DNS rules")

    def match(self, rules: Sequence[Any], request: L7Request) -> L7Verdict:
        return match_query(rules, request)

    def request_from_trace(self, options: dict[str, Any]) -> L7Request:
        """``{"dns_query": name}`` (also ``qname``/``query``; ``dns_qtype``,
        default A) -> a request with fields ``qname`` (normalised) and ``qtype``."""
        name = options.get("dns_query", options.get("qname", options.get("query")))
        fields: dict[str, Any] = {}
        if name is not None:
            fields["qname"] = normalize_name(str(name))
        fields["qtype"] = str(options.get("dns_qtype", options.get("qtype", "A"))).upper()
        return L7Request(fields)

    def new_fqdn_cache(self, **kwargs: Any) -> Any:
        """An ``FQDNCache`` (kwargs: min_ttl, max_ips_per_name, clock, on_change),
        for an agent that loads this parser by entry point and may not import
        the package: one cache per node, shared by its DNS proxies."""
        from axoneme.l7.dns._cache import FQDNCache
        return FQDNCache(**kwargs)

    def bind_engine(self, cache: Any, engine: Any) -> Any:
        """``FQDNSelectorSync(cache, engine)``: keeps ``engine.update_fqdn`` in
        step with ``cache`` (``resync()`` after policy changes, ``close()``)."""
        from axoneme.l7.dns._sync import FQDNSelectorSync
        return FQDNSelectorSync(cache, engine)

    def proxy_config(self, **kwargs: Any) -> Any:
        """A ``DnsProxyConfig`` (kwargs: reject_rcode, upstream_timeout, ...) for
        an agent that reaches this parser only by entry point."""
        from axoneme.l7.dns._proxy import DnsProxyConfig
        return DnsProxyConfig(**kwargs)

    def fqdn_matches(self, selector: Any, name: str) -> bool:
        """Whether a toFQDNs selector (matchName/matchPattern) selects ``name``."""
        from axoneme.l7.dns._match import rule_matches
        return bool(rule_matches(selector, name))

    def proxy_factory(self) -> Any:
        """``dns_proxy_factory``: the core ``ProxyFactory`` signature
        ``(sock, *, direction, policy_for, flow_sink, connect_upstream=None,
        config=None)`` plus the DNS extras ``cache=``, ``on_answer=``,
        ``dns_config=``; returns a ``DnsProxy`` (``await start()`` /
        ``await stop()``). See ``axoneme.l7.dns._proxy``."""
        from axoneme.l7.dns._proxy import dns_proxy_factory
        return dns_proxy_factory
