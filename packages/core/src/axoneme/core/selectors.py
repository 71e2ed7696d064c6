"""Kubernetes label selectors over identity labels (Cilium's EndpointSelector).

A selector key may carry a source (``k8s:app``, ``reserved:host``); without
one it matches labels of any source (Cilium's implied ``any:``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum

from axoneme.core.labels import SOURCE_ANY, SOURCES, Labels


class Operator(str, Enum):
    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


def split_selector_key(key: str) -> tuple[str, str]:
    """``k8s:app`` -> (k8s, app); ``app`` -> (any, app)."""
    head, sep, tail = key.partition(":")
    if sep and head in SOURCES:
        return head, tail
    return SOURCE_ANY, key


@dataclass(frozen=True, slots=True)
class Requirement:
    """One requirement: ``key`` (possibly source-prefixed) ``operator`` ``values``."""

    key: str
    operator: Operator
    values: frozenset[str] = frozenset()

    def matches(self, labels: Labels) -> bool:
        source, key = split_selector_key(self.key)
        label = labels.lookup(source, key)
        if self.operator is Operator.EXISTS:
            return label is not None
        if self.operator is Operator.DOES_NOT_EXIST:
            return label is None
        if self.operator is Operator.IN:
            return label is not None and label.value in self.values
        # NotIn: a missing key satisfies NotIn (Kubernetes semantics).
        return label is None or label.value not in self.values

    def __str__(self) -> str:
        if self.operator in (Operator.EXISTS, Operator.DOES_NOT_EXIST):
            return f"{self.key} {self.operator.value}"
        return f"{self.key} {self.operator.value} ({','.join(sorted(self.values))})"


@dataclass(frozen=True, slots=True)
class LabelSelector:
    """matchLabels plus matchExpressions, all ANDed. Empty selects everything."""

    requirements: frozenset[Requirement] = frozenset()

    @classmethod
    def build(
        cls,
        match_labels: Mapping[str, str] | None = None,
        match_expressions: Iterable[Requirement] = (),
    ) -> LabelSelector:
        reqs = {Requirement(k, Operator.IN, frozenset({v})) for k, v in (match_labels or {}).items()}
        reqs.update(match_expressions)
        return cls(frozenset(reqs))

    def matches(self, labels: Labels) -> bool:
        for r in self.requirements:  # a loop, not all() over a generator (B5ENGINE)
            if not r.matches(labels):
                return False
        return True

    @property
    def is_wildcard(self) -> bool:
        return not self.requirements

    def with_requirement(self, req: Requirement) -> LabelSelector:
        return LabelSelector(self.requirements | {req})

    def mentions_key(self, predicate_key: str) -> bool:
        """Whether any requirement is on ``predicate_key`` (source ignored)."""
        return any(split_selector_key(r.key)[1] == predicate_key for r in self.requirements)

    def mentions_key_prefix(self, prefix: str) -> bool:
        return any(split_selector_key(r.key)[1].startswith(prefix) for r in self.requirements)

    def __str__(self) -> str:
        if not self.requirements:
            return "{}"
        return "{" + ", ".join(sorted(str(r) for r in self.requirements)) + "}"
