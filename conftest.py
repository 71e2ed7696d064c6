"""Repository-wide pytest set-up.

Tests create kernel state (netns, links, tc filters, chains, processes)
that their fixtures remove in teardown. A SIGTERM (CI's time limit,
`timeout`, a runner stopping the job) would end pytest without teardown, so
it is turned into a KeyboardInterrupt: pytest then runs every finalizer
before exiting.
"""

from __future__ import annotations

import signal


def _sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: object) -> None:
    signal.signal(signal.SIGTERM, _sigterm)
