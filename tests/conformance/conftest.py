"""The repository's conformance run: the axoneme-testing kit (packages/testing,
a pytest plugin) against every built-in datapath, exactly the way a third
party runs it against theirs (``pytest --axoneme-datapath NAME``).

The test modules here only name the kit's modules; this conftest gives the
datapaths under test (a ``--axoneme-datapath`` on the command line wins) and
judges what this machine lacks for them (tests/_capability.py): a built-in
datapath that says it is unavailable on a machine that has everything it
needs fails instead of skipping.
"""

from __future__ import annotations

import _capability  # tests/ is on sys.path (tests/conftest.py)
import pytest

BUILTIN_DATAPATHS = ["ebpf", "iptables:plain", "iptables:ipset", "noop"]


def pytest_axoneme_datapaths(config: pytest.Config) -> list[str]:
    return BUILTIN_DATAPATHS


def pytest_axoneme_machine_lacks(config: pytest.Config, name: str, mode: str) -> str:
    return _capability.machine_lacks(name, mode) or ""  # "": it has everything, a skip would hide a bug
