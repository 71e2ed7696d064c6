"""Errors of the agent's services (the API maps them to HTTP statuses)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from axoneme.core.errors import AxonemeError
from axoneme.core.lockfile import LockHeld

DROPPED_POLICIES_FILE = "dropped-policies.json"  # --drop-unparseable-policies keeps them here


class BadRequest(AxonemeError):
    """Bad input from an API client (HTTP 400, CLI exit 2)."""

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        self.problems = list(problems)
        super().__init__(message)


class NotFound(BadRequest):
    """HTTP 404."""


class Conflict(BadRequest):
    """HTTP 409."""


class TryAgain(AxonemeError):
    """HTTP 503: not possible yet (a pod the API server has not told us about);
    the CNI plugin answers error 11, so the runtime retries."""


class StateWriteError(AxonemeError):
    """The state file could not be written; the change that needed it is refused."""


class PersistedPolicyError(AxonemeError):
    """Persisted policies no longer parse: the agent refuses to start (exit 1)
    rather than stop enforcing them without a word."""

    def __init__(self, state_file: str, bad: Sequence[tuple[str, str]]) -> None:
        self.bad = list(bad)
        which = "; ".join(f"persisted policy {key} no longer parses: {why}"
                          for key, why in self.bad)
        it = "it" if len(self.bad) == 1 else "them"
        super().__init__(
            f"{which} (state {state_file}); refusing to start rather than stop enforcing "
            f"{it}. Fix the document in the state file, "
            f"or start once with `axoneme agent run --drop-unparseable-policies` (drops "
            f"{it} loudly, keeps a copy in "
            f"{os.path.join(os.path.dirname(state_file), DROPPED_POLICIES_FILE)} and lists "
            f"{it} in `axoneme status`), then apply a corrected version")


class StateDirLocked(AxonemeError):
    """Another agent serves this state dir (``agent run`` exits 1)."""

    def __init__(self, state_dir: str, err: LockHeld) -> None:
        self.state_dir = state_dir
        self.pid = err.pid
        who = f"agent pid {err.pid}" if err.pid else "another agent"
        if err.info:
            who += f" ({err.info})"
        super().__init__(f"state dir {state_dir} is in use by {who}; two agents on one "
                         f"state dir overwrite each other's state: stop it first or use "
                         f"another --state-dir")


def problem_text(err: BaseException, limit: int = 5) -> str:
    """``field: problem; ...`` of a parse error (at most ``limit`` problems)."""
    problems = getattr(err, "problems", None)
    if problems:
        parts = [f"{p.field}: {p.message}" if getattr(p, "field", "") else str(getattr(p, "message", p))
                 for p in problems[:limit]]
        more = len(problems) - limit
        return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")
    text = f"{type(err).__name__}: {err}"
    return text if len(text) <= 300 else text[:300] + "..."
