"""The error hierarchy of axoneme.

Library errors are converted at the boundary (``raise DatapathProgramError(op,
e.errno) from e``) so callers only ever catch these.
"""

from __future__ import annotations

from dataclasses import dataclass


class AxonemeError(Exception):
    """Base of every error axoneme raises on purpose."""


class ConfigError(AxonemeError):
    """Bad configuration (agent flags, config file, CNI network config)."""


class PluginError(AxonemeError):
    """A configured plugin could not be found or loaded."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One problem in one document: where it is and what is wrong.

    ``file`` is the path as given by the user (or ``<stdin>``/``<api>``),
    ``document`` the 0-based index of the YAML document (or List item), and
    ``field`` the field path, e.g. ``spec.ingress[0].toPorts[0].ports[0].port``.
    """

    file: str
    document: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = self.file
        if self.document is not None:
            where += f", document {self.document}"
        if self.field:
            where += f", {self.field}"
        return f"{self.message} ({where})"


class PolicyError(AxonemeError):
    """A policy could not be accepted."""


class InvalidRule(PolicyError):
    """One or more documents are invalid; ``problems`` lists every one of them."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(str(p) for p in self.problems) or "invalid policy")


class IdentityError(AxonemeError):
    """Identity allocation failed (space exhausted, conflicting store)."""


class DatapathError(AxonemeError):
    """The datapath failed."""


class DatapathUnavailable(DatapathError):
    """The datapath cannot run on this node; the message says why."""


class DatapathProgramError(DatapathError):
    """A kernel operation failed; keeps the errno of the underlying error."""

    def __init__(self, op: str, errno: int | None = None, detail: str = "") -> None:
        self.op = op
        self.errno = errno
        self.detail = detail
        msg = f"{op} failed"
        if errno is not None:
            msg += f" (errno {errno})"
        if detail:
            msg += f": {detail}"
        super().__init__(msg)


class MapFullError(DatapathError):
    """A kernel map is full: reported and counted, never a silent allow."""
