"""axoneme dns L7: ``rules.dns`` matching, the DNS proxy and the toFQDNs cache.

- ``DnsParser``: the ``axoneme.l7`` entry point (``match``, ``request_from_trace``,
  ``proxy_factory`` -> ``DnsProxy``).
- ``match_name`` / ``match_pattern`` / ``validate_name`` / ``validate_pattern``:
  Cilium's matchName / matchPattern semantics.
- ``FQDNCache``: names learned from answers -> IPs with TTLs, change
  notifications, snapshot/restore.
- ``FQDNSelectorSync``: keeps a policy engine's toFQDNs selectors in step
  with a cache.
- ``DnsProxy`` + ``DnsProxyConfig``: the asyncio UDP/TCP proxy (transparent or
  with an explicit upstream).
"""

from axoneme.l7.dns._cache import (
    DEFAULT_MAX_IPS_PER_NAME,
    DEFAULT_MIN_TTL,
    FQDNCache,
    FQDNEntry,
)
from axoneme.l7.dns._match import (
    compile_pattern,
    match_exact,
    match_name,
    match_pattern,
    normalize_name,
    rule_matches,
    validate_name,
    validate_pattern,
)
from axoneme.l7.dns._parser import DnsParser
from axoneme.l7.dns._proxy import DnsProxy, DnsProxyConfig, DnsProxyStats, dns_proxy_factory
from axoneme.l7.dns._rules import DNSRule
from axoneme.l7.dns._sync import FQDNEngine, FQDNSelectorSync
from axoneme.l7.dns._wire import DnsAnswer, DnsQuery, MalformedMessage, parse_answer, parse_query

__all__ = ["DNSRule",
    "DnsParser", "match_name", "match_pattern", "match_exact", "normalize_name",
    "rule_matches", "validate_name", "validate_pattern", "compile_pattern",
    "FQDNCache", "FQDNEntry", "DEFAULT_MIN_TTL", "DEFAULT_MAX_IPS_PER_NAME",
    "DnsProxy", "DnsProxyConfig", "DnsProxyStats", "dns_proxy_factory",
    "FQDNEngine", "FQDNSelectorSync",
    "DnsAnswer", "DnsQuery", "MalformedMessage", "parse_answer", "parse_query",
]
