"""The offline part: what a datapath declares and implements, checked without
root and without the kernel, for every datapath under test.

- its entry point loads a Datapath subclass named as the entry point, with
  every abstract method implemented;
- its capabilities are names core knows, and each one it declares is backed
  by the method that implements it;
- its options are well formed (name, type, default of that type, help,
  choices holding the default; no repeats), ``check_options`` fills in every
  default and refuses an unknown option naming it; a mode asked for is one
  it accepts;
- ``build_datapath`` builds it without touching the kernel (no pin directory
  appears), and it reports a status naming itself and numeric metrics.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from axoneme.testing.conformance.fixtures import supported_options

pytestmark = [pytest.mark.conformance, pytest.mark.axoneme_offline]

OPTION_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
OPTION_TYPES = (str, int, float, bool)
# a declared capability is backed by overriding this Datapath method
BACKED_BY = {"fail_closed": "endpoint_fail_closed", "ipcache_dump": "dump_ipcache", "events": "events"}


def test_entry_point_loads_a_datapath(axoneme_datapath: Any) -> None:
    from axoneme.core.datapath import Datapath, datapath_class

    cls = datapath_class(axoneme_datapath.name)
    assert isinstance(cls, type) and issubclass(cls, Datapath), cls
    assert cls.name == axoneme_datapath.name, \
        f"entry point {axoneme_datapath.name!r} loads {cls.__name__} named {cls.name!r}"
    missing = sorted(getattr(cls, "__abstractmethods__", ()))
    assert not missing, f"{cls.__name__} does not implement {', '.join(missing)}"


def test_capabilities_are_known_and_implemented(axoneme_datapath_class: type) -> None:
    from axoneme.core.datapath import CAPABILITIES, Datapath

    cls = axoneme_datapath_class
    caps = cls.capabilities  # type: ignore[attr-defined]
    assert isinstance(caps, frozenset), f"capabilities must be a frozenset, not {type(caps).__name__}"
    unknown = sorted(caps - CAPABILITIES)
    assert not unknown, f"unknown capabilities {unknown} (core knows {sorted(CAPABILITIES)})"
    for cap, method in BACKED_BY.items():
        if cap in caps:
            assert getattr(cls, method) is not getattr(Datapath, method), \
                f"declares {cap!r} but keeps the default {method}()"


def test_options_are_well_formed(axoneme_datapath: Any, axoneme_datapath_class: type) -> None:
    from axoneme.core.datapath import DatapathOption, check_options
    from axoneme.core.errors import ConfigError

    cls = axoneme_datapath_class
    options = cls.options  # type: ignore[attr-defined]
    assert isinstance(options, tuple), f"options must be a tuple, not {type(options).__name__}"
    names: list[str] = []
    for opt in options:
        assert isinstance(opt, DatapathOption), f"{opt!r} is not a DatapathOption"
        where = f"option {opt.name!r}"
        assert isinstance(opt.name, str) and OPTION_NAME.match(opt.name), f"{where}: bad name"
        assert opt.type in OPTION_TYPES, f"{where}: type {opt.type!r} is not one of str/int/float/bool"
        assert isinstance(opt.default, opt.type) and not (
            opt.type is int and isinstance(opt.default, bool)), f"{where}: default {opt.default!r}"
        assert isinstance(opt.help, str) and opt.help.strip(), f"{where}: no help"
        if opt.choices:
            assert all(isinstance(c, str) for c in opt.choices), f"{where}: choices are strings"
            assert str(opt.default) in opt.choices, f"{where}: default not among its choices"
        names.append(opt.name)
    assert len(names) == len(set(names)), f"an option is declared twice: {names}"
    values = check_options(cls, {})
    assert set(names) <= set(values), f"check_options does not fill in every default: {values}"
    if names:
        with pytest.raises(ConfigError, match="no_such_option"):
            check_options(cls, {"no_such_option": 1})
    if axoneme_datapath.mode:
        assert not names or "mode" in names, \
            f"{axoneme_datapath.label}: the datapath declares no 'mode' option"
        assert check_options(cls, {"mode": axoneme_datapath.mode})["mode"] == axoneme_datapath.mode


def test_builds_without_touching_the_kernel(axoneme_datapath: Any, axoneme_datapath_class: type,
                                            tmp_path: Path) -> None:
    from axoneme.core.datapath import Datapath, DatapathStatus, build_datapath

    pins = tmp_path / "bpffs"
    wanted: dict[str, Any] = {"bpffs_root": str(pins)}
    if axoneme_datapath.mode:
        wanted["mode"] = axoneme_datapath.mode
    dp = build_datapath(axoneme_datapath.name, state_dir=str(tmp_path / "state"),
                        pod_cidr="10.244.0.0/16",
                        options=supported_options(axoneme_datapath_class, wanted))
    assert isinstance(dp, Datapath) and type(dp) is axoneme_datapath_class
    assert dp.config.state_dir == str(tmp_path / "state")
    assert not pins.exists(), "building the datapath pinned something: that is start()'s job"
    status = dp.status()
    assert isinstance(status, DatapathStatus) and status.name == axoneme_datapath.name, status
    metrics = dp.metrics()
    assert isinstance(metrics, Mapping), metrics
    bad = {k: v for k, v in metrics.items() if not isinstance(k, str) or isinstance(v, bool)
           or not isinstance(v, int | float)}
    assert not bad, f"metrics must map names to numbers: {bad}"
