"""Labels with sources, in Cilium's canonical ``source:key=value`` form."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, ValuesView
from dataclasses import dataclass

# Sources a label may carry. ``any`` only appears in selectors: it matches a
# label of every source.
SOURCE_K8S = "k8s"
SOURCE_RESERVED = "reserved"
SOURCE_CIDR = "cidr"
SOURCE_CONTAINER = "container"
SOURCE_FQDN = "fqdn"
SOURCE_UNSPEC = "unspec"
SOURCE_ANY = "any"
SOURCES = frozenset(
    {SOURCE_K8S, SOURCE_RESERVED, SOURCE_CIDR, SOURCE_CONTAINER, SOURCE_FQDN, SOURCE_UNSPEC, SOURCE_ANY}
)

# Identity-relevant labels the agent adds to every pod (Cilium's names).
POD_NAMESPACE_LABEL = "io.kubernetes.pod.namespace"
NAMESPACE_LABELS_PREFIX = "io.cilium.k8s.namespace.labels."
SERVICE_ACCOUNT_LABEL = "io.cilium.k8s.policy.serviceaccount"
CLUSTER_LABEL = "io.cilium.k8s.policy.cluster"
POLICY_NAME_LABEL = "io.cilium.k8s.policy.name"
POLICY_NAMESPACE_LABEL = "io.cilium.k8s.policy.namespace"

# Kubernetes label syntax: optional DNS-subdomain prefix, then a name.
_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_PREFIX = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
_KEY_RE = re.compile(rf"^({_PREFIX}/)?{_NAME}$")
_VALUE_RE = re.compile(rf"^({_NAME})?$")


def valid_label_key(key: str) -> bool:
    """Whether ``key`` is a valid Kubernetes label key (prefix/name)."""
    if "/" in key and len(key.split("/", 1)[0]) > 253:
        return False
    return bool(_KEY_RE.match(key))


def valid_label_value(value: str) -> bool:
    """Whether ``value`` is a valid Kubernetes label value (may be empty)."""
    return len(value) <= 63 and bool(_VALUE_RE.match(value))


@dataclass(frozen=True, slots=True, order=True)
class Label:
    """One label: ``source:key=value``. ``value`` may be empty."""

    source: str
    key: str
    value: str = ""

    def __str__(self) -> str:
        if self.value:
            return f"{self.source}:{self.key}={self.value}"
        return f"{self.source}:{self.key}"

    @classmethod
    def parse(cls, text: str, default_source: str = SOURCE_K8S) -> Label:
        """Parse ``[source:]key[=value]``.

        The source is recognised only when the text before the first ``:`` is
        a known source, so keys such as ``app.kubernetes.io/name`` survive.
        """
        source = default_source
        rest = text
        head, sep, tail = text.partition(":")
        if sep and head in SOURCES:
            source, rest = head, tail
        key, _, value = rest.partition("=")
        return cls(source, key, value)


_RESERVED_KEYS: dict[str, str] = {}  # reserved label name -> its "reserved:<name>" key


class Labels(Mapping[str, Label]):
    """An immutable set of labels keyed by ``source:key`` (one value per key)."""

    __slots__ = ("_by_key", "_hash")

    def __init__(self, labels: Iterable[Label] = ()) -> None:
        self._by_key: dict[str, Label] = {}
        for label in labels:
            if label.source == SOURCE_RESERVED:  # a few names, in every CIDR identity: one string each
                key = _RESERVED_KEYS.get(label.key)
                if key is None:
                    key = f"{SOURCE_RESERVED}:{label.key}"
                    if len(_RESERVED_KEYS) < 64:  # bounded: any text can claim the source
                        _RESERVED_KEYS[label.key] = key
            else:
                key = f"{label.source}:{label.key}"
            self._by_key[key] = label
        self._hash: int | None = None

    @classmethod
    def from_strings(cls, texts: Iterable[str], default_source: str = SOURCE_K8S) -> Labels:
        return cls(Label.parse(t, default_source) for t in texts)

    def __getitem__(self, key: str) -> Label:
        return self._by_key[key]

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._by_key))

    def __len__(self) -> int:
        return len(self._by_key)

    def values(self) -> ValuesView[Label]:
        """The labels, in no particular order (``sorted_labels`` sorts): no
        sort of the keys as the Mapping mixin would (the selector cache reads
        every identity's labels)."""
        return self._by_key.values()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Labels):
            return self._by_key == other._by_key
        return NotImplemented

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(frozenset(self._by_key.values()))
        return self._hash

    def __repr__(self) -> str:
        return f"Labels({self.sorted_strings()!r})"

    def sorted_labels(self) -> list[Label]:
        return sorted(self._by_key.values())

    def sorted_strings(self) -> list[str]:
        """Canonical form: sorted ``source:key=value`` strings (identity key)."""
        return [str(label) for label in self.sorted_labels()]

    def lookup(self, source: str, key: str) -> Label | None:
        """Find the label for a selector key (``source`` may be ``any``)."""
        if source != SOURCE_ANY:
            return self._by_key.get(f"{source}:{key}")
        for label in self._by_key.values():
            if label.key == key:
                return label
        return None

    def union(self, other: Iterable[Label]) -> Labels:
        return Labels([*self._by_key.values(), *other])



class PrefixLabels(Labels):
    """The labels of a CIDR identity, ``cidr:<prefix>`` and ``reserved:world``
    (Cilium), made when read from the prefix the identity holds anyway: a
    100k-prefix policy's identities keep no dict, ``Label`` or key strings
    each (issue 17: agent RSS). Equal to, and hashes as, the ``Labels`` of
    the same two labels; ``lookup`` (what selectors ask) builds nothing."""

    __slots__ = ("_prefix",)

    def __init__(self, prefix: object) -> None:  # an ipaddress network
        self._prefix = prefix
        self._hash = None

    @property  # the base class's slot, read-only here
    def _by_key(self) -> dict[str, Label]:  # type: ignore[override]
        text = self.text
        return {f"{SOURCE_CIDR}:{text}": Label(SOURCE_CIDR, text), _WORLD_KEY: _WORLD}

    @property
    def text(self) -> str:
        """The prefix as the ``cidr`` label's key (``:`` of IPv6 written ``-``)."""
        return str(self._prefix).replace(":", "-")

    def __len__(self) -> int:
        return 2

    def lookup(self, source: str, key: str) -> Label | None:
        if key == "world":
            return _WORLD if source in (SOURCE_RESERVED, SOURCE_ANY) else None
        if source in (SOURCE_CIDR, SOURCE_ANY) and key == self.text:
            return Label(SOURCE_CIDR, key)
        return None


_WORLD = Label(SOURCE_RESERVED, "world")
_WORLD_KEY = f"{SOURCE_RESERVED}:world"
