"""The DNS proxy's calls into the agent: the policy of a query, the answer learned.

``policy_verdict`` asks the agent's ``policy_for`` for the ``rules.dns`` of
the entry that redirected the query (per query, so a policy change applies
to the next one) and matches the name; no DNS policy is a refusal (fail
closed). ``learn_answer`` puts an answer's names and IPs into the FQDN cache
and holds the answer until the agent's ``on_answer`` hook (the datapath
update of toFQDNs) is done, or ``max_delay`` seconds have passed.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable, Sequence
from typing import Any

from axoneme.core.flow import FlowEndpoint
from axoneme.core.l7 import L7Request, L7Verdict
from axoneme.core.l7proxy import Addr, ProxyPolicy
from axoneme.core.l7proxy import PolicyFor as CorePolicyFor
from axoneme.core.mapstate import Direction
from axoneme.l7.dns._cache import FQDNCache
from axoneme.l7.dns._proxyconfig import DnsProxyStats, OnAnswer, PolicyFor
from axoneme.l7.dns._wire import DnsAnswer, DnsQuery

LOG = logging.getLogger(__name__)

Match = Callable[[Sequence[Any], L7Request], L7Verdict]


async def maybe_await(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value


async def policy_verdict(query: DnsQuery, client: Addr, server: Addr, *,
                         policy_for: PolicyFor | None, core_policy_for: CorePolicyFor | None,
                         direction: Direction, match: Match
                         ) -> tuple[L7Verdict, tuple[FlowEndpoint, FlowEndpoint] | None]:
    """The verdict, and the flow endpoints when the policy names them."""
    try:
        if core_policy_for is not None:
            got = await maybe_await(core_policy_for(
                client[0], client[1], server[0], server[1], direction))
        else:
            assert policy_for is not None
            got = await maybe_await(policy_for(client[0], server[0], server[1]))
    except Exception:
        LOG.exception("dns proxy: policy_for(%s, %s, %d) failed", client[0], server[0],
                      server[1])
        return L7Verdict(False, None, "policy lookup failed"), None
    eps = None
    if isinstance(got, ProxyPolicy):
        eps = (got.source, got.destination)
        got = got.rules
    if got is None:
        return L7Verdict(False, None, f"no DNS policy for {client[0]} -> "
                                      f"{server[0]}:{server[1]}"), None
    return match(got, L7Request({"qname": query.qname, "qtype": query.qtype})), eps


async def learn_answer(answer: DnsAnswer, *, cache: FQDNCache | None,
                       on_answer: OnAnswer | None, stats: DnsProxyStats,
                       max_delay: float) -> None:
    """Cache the answer, then hold it until the agent's hook is done."""
    if answer.rcode != 0 or not answer.ips:
        return
    if cache is not None:
        try:
            changed = cache.record_answer(answer)
            stats.learned_names += len(changed)
        except Exception:
            LOG.exception("dns proxy: caching %s failed", answer.qname)
    if on_answer is None:
        return
    hook = on_answer
    ips = frozenset(answer.ips)
    ttl = answer.ttl if cache is None else max(answer.ttl, cache.min_ttl)

    async def one(name: str) -> None:
        try:
            await maybe_await(hook(name, ips, ttl))
        except Exception:
            LOG.exception("dns proxy: on_answer(%s) failed", name)

    try:
        await asyncio.wait_for(asyncio.gather(*(one(n) for n in answer.names)), max_delay)
    except TimeoutError:
        LOG.warning("dns proxy: datapath update for %s took longer than %.3fs; "
                    "relaying the answer anyway", answer.qname, max_delay)
