"""The dns L7 parser: ``rules.dns`` matching for the proxy and ``policy trace``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from axoneme.core.l7 import L7Parser, L7Request, L7Verdict
from axoneme.l7.dns._match import _fields, normalize_name, rule_matches

__all__ = ["DnsParser"]


class DnsParser(L7Parser):
    """``rules.dns[]``: a query is allowed when one entry's matchName or
    matchPattern selects its name. Only the query name counts (not the
    qtype), as in Cilium. An empty rule list allows every query."""

    name = "dns"

    def match(self, rules: Sequence[Any], request: L7Request) -> L7Verdict:
        raw = request.fields.get("qname", request.fields.get("query"))
        if raw is None:
            return L7Verdict(False, None, "dns request without a query name")
        qname = normalize_name(str(raw))
        if not rules:
            return L7Verdict(True, None, "no rules.dns entries: every query is allowed")
        for i, rule in enumerate(rules):
            if rule_matches(rule, qname):
                name, pattern = _fields(rule)
                what = f"matchName {name!r}" if name else f"matchPattern {pattern!r}"
                return L7Verdict(True, i, f"rules.dns[{i}] {what} matches {qname!r}")
        return L7Verdict(False, None, f"no rules.dns entry matches {qname!r}")

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
