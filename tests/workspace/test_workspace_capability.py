"""Skips are for missing machine capabilities only (tests/_capability.py): a datapath
that fails to import, fails to compile its programs, or calls itself unavailable on
a machine that has everything it needs fails the test instead of skipping it."""

from __future__ import annotations

from typing import Any

import _capability  # tests/ is on sys.path (tests/conftest.py)
import pytest
from axoneme.core.errors import DatapathProgramError, DatapathUnavailable


class _Broken:
    exc: BaseException = RuntimeError()

    def __init__(self, config: Any) -> None:
        self.config = config

    def probe(self) -> None:
        raise self.exc


def _with_class(monkeypatch: Any, exc: BaseException | None = None,
                load_error: BaseException | None = None) -> None:
    import axoneme.core.plugins as plugins

    def load_class(group: str, name: str) -> type:
        if load_error is not None:
            raise load_error
        return type("Broken", (_Broken,), {"exc": exc})

    monkeypatch.setattr(plugins, "load_class", load_class)
    monkeypatch.setattr(plugins, "installed", lambda group: {"ebpf": None, "iptables": None})


def test_an_import_error_of_our_datapath_fails(monkeypatch: Any) -> None:
    _with_class(monkeypatch, load_error=ImportError("cannot import name 'EbpfDatapath'"))
    with pytest.raises(ImportError):
        _capability.probe_datapath("ebpf")


def test_a_compile_error_fails(monkeypatch: Any) -> None:
    _with_class(monkeypatch, DatapathProgramError("compile from_container.c", None, "error: x"))
    with pytest.raises(DatapathProgramError):
        _capability.probe_datapath("ebpf")


def test_unavailable_on_a_capable_machine_fails(monkeypatch: Any) -> None:
    _with_class(monkeypatch, DatapathUnavailable("bcc is not importable: boom"))
    monkeypatch.setattr(_capability, "machine_lacks", lambda name, mode="": None)
    with pytest.raises(pytest.fail.Exception, match="has everything it needs"):
        _capability.probe_datapath("ebpf")


def test_unavailable_on_a_machine_that_lacks_it_skips(monkeypatch: Any) -> None:
    _with_class(monkeypatch, DatapathUnavailable("no ipset"))
    monkeypatch.setattr(_capability, "machine_lacks", lambda name, mode="": "no ipset binary")
    reason = _capability.probe_datapath("iptables", "ipset")
    assert reason == "datapath iptables/ipset unavailable: no ipset (this machine: no ipset binary)"


def test_an_uninstalled_datapath_that_is_asked_for_fails(monkeypatch: Any) -> None:
    import axoneme.core.plugins as plugins

    monkeypatch.setattr(plugins, "installed", lambda group: {})
    with pytest.raises(pytest.fail.Exception, match="not installed"):
        _capability.probe_datapath("ebpf")


def test_noop_needs_nothing_and_non_root_lacks_kernel_datapaths(monkeypatch: Any) -> None:
    assert _capability.machine_lacks("noop") is None
    monkeypatch.setattr(_capability.os, "geteuid", lambda: 1000)
    assert _capability.machine_lacks("ebpf") == "not root"
    assert _capability.machine_lacks("iptables", "plain") == "not root"
