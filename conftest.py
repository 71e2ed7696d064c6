"""Repository-wide pytest set-up.

Tests create kernel state (netns, links, tc filters, chains, processes)
that their fixtures remove in teardown. A SIGTERM (CI's time limit,
`timeout`, a runner stopping the job) would end pytest without teardown, so
in the pytest process itself it is turned into a KeyboardInterrupt: pytest
then runs every finalizer before exiting. A forked child (pyroute2 and
multiprocessing fork) inherits the handler; there it must not unwind into
the parent's fixtures, so it exits at once as SIGTERM would.
"""

from __future__ import annotations

import os
import signal

_PYTEST_PID = os.getpid()


def _sigterm(signum: int, frame: object) -> None:
    if os.getpid() != _PYTEST_PID:
        os._exit(128 + signum)
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: object) -> None:
    global _PYTEST_PID
    _PYTEST_PID = os.getpid()
    signal.signal(signal.SIGTERM, _sigterm)
