"""The policy repository: applied policies, revisioned, rules indexed by subject."""

from __future__ import annotations

import dataclasses
import ipaddress
import operator
from collections.abc import Iterator, Mapping

from axoneme.core.labels import Labels
from axoneme.core.policy._selectorcache import Selector, SelectorCache, cidr_prefixes
from axoneme.core.policy.api import CIDRPeer, EndpointPeer, Peer, Policy, PolicyRef, Rule
from axoneme.core.selectors import LabelSelector

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_first = operator.itemgetter(0)
_second = operator.itemgetter(1)


def policy_selectors(policy: Policy) -> list[Selector]:
    """Every selector a policy needs cached: pod subjects and peers (with repeats)."""
    out: list[Selector] = []
    for rule in policy.rules:
        if not rule.node_selector:
            out.append(rule.subject)
        for pr in rule.rules:
            for peer in pr.peers or ():
                out.append(peer.selector if isinstance(peer, EndpointPeer) else peer)
    return out


def with_peers(policy: Policy, held: Mapping[int, Peer]) -> Policy:
    """``policy`` with each peer whose ``id`` is in ``held`` replaced by the
    (equal) selector there; the rules without such a peer stay as they are."""
    rules: list[Rule] = []
    for rule in policy.rules:
        prs = tuple(dataclasses.replace(pr, peers=tuple(held.get(id(p), p) for p in pr.peers))
                    if pr.peers and any(id(p) in held for p in pr.peers) else pr
                    for pr in rule.rules)
        changed = any(a is not b for a, b in zip(prs, rule.rules, strict=True))
        rules.append(dataclasses.replace(rule, rules=prs) if changed else rule)
    return dataclasses.replace(policy, rules=tuple(rules))


def policy_cidrs(policy: Policy) -> list[IPNetwork]:
    """Prefixes (with repeats) that need CIDR identities: every CIDR and except."""
    out: list[IPNetwork] = []
    for rule in policy.rules:
        for pr in rule.rules:
            for peer in pr.peers or ():
                if isinstance(peer, CIDRPeer):
                    out.extend(cidr_prefixes(peer))
    return out


class PolicyRepository:
    """Policies by ref; pod-selecting rules grouped by subject selector.

    ``revision`` bumps on every change. Grouping by subject means finding the
    rules of an endpoint costs one set lookup per distinct subject, using the
    selector cache's selections.
    """

    def __init__(self) -> None:
        self.revision = 0
        self._policies: dict[PolicyRef, Policy] = {}
        self._by_subject: dict[LabelSelector, dict[tuple[PolicyRef, int], Rule]] = {}

    def __len__(self) -> int:
        return len(self._policies)

    def __contains__(self, ref: object) -> bool:
        return ref in self._policies

    def __iter__(self) -> Iterator[Policy]:
        return iter(self._policies.values())

    def get(self, ref: PolicyRef) -> Policy | None:
        return self._policies.get(ref)

    def policies(self) -> list[Policy]:
        return [self._policies[r] for r in sorted(self._policies)]

    def _index(self, policy: Policy, add: bool) -> None:
        for pos, rule in enumerate(policy.rules):
            if rule.node_selector:
                continue  # host firewall rules never select pods
            bucket = self._by_subject.setdefault(rule.subject, {})
            if add:
                bucket[(policy.ref, pos)] = rule
            else:
                bucket.pop((policy.ref, pos), None)
                if not bucket:
                    del self._by_subject[rule.subject]

    def put(self, policy: Policy) -> Policy | None:
        """Insert or replace; returns the previous version."""
        old = self._policies.get(policy.ref)
        if old is not None:
            self._index(old, add=False)
        self._policies[policy.ref] = policy
        self._index(policy, add=True)
        self.revision += 1
        return old

    def remove(self, ref: PolicyRef) -> Policy | None:
        old = self._policies.pop(ref, None)
        if old is not None:
            self._index(old, add=False)
            self.revision += 1
        return old

    def restore(self, ref: PolicyRef, old: Policy | None) -> None:
        """Undo a ``put`` (no revision bump: the change never became visible)."""
        cur = self._policies.pop(ref, None)
        if cur is not None:
            self._index(cur, add=False)
        if old is not None:
            self._policies[ref] = old
            self._index(old, add=True)
        self.revision -= 1

    def rules_for(self, identity: int, cache: SelectorCache) -> list[Rule]:
        """Rules whose subject selects ``identity``, in a stable order."""
        found: list[tuple[tuple[PolicyRef, int], Rule]] = []
        # Only the selectors that select this identity (the cache's reverse
        # index), not every subject: cost follows the endpoint, not the repository.
        for subject in cache.selectors_of(identity):
            bucket = self._by_subject.get(subject)  # type: ignore[call-overload]
            if bucket is not None:
                found.extend(bucket.items())
        if len(found) > 1:
            found.sort(key=_first)
        return list(map(_second, found))  # C calls only (B5ENGINE)

    def host_rules(self, node_labels: Labels) -> list[Rule]:
        """Host policy rules (CCNP nodeSelector) whose selector selects a node
        with ``node_labels``, in a stable order (the host endpoint's rules)."""
        return [rule for ref in sorted(self._policies) for rule in self._policies[ref].rules
                if rule.node_selector and rule.subject.matches(node_labels)]

    def subjects(self) -> list[LabelSelector]:
        return list(self._by_subject)


__all__ = ["PolicyRepository", "policy_selectors", "policy_cidrs"]
