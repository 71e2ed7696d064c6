"""The pytest plugin of axoneme-testing (entry point ``pytest11``: ``axoneme``).

``pytest --axoneme-datapath NAME[:MODE]`` (repeatable or comma-separated) runs
the conformance suite against the installed ``axoneme.datapath`` entry point
NAME, with DatapathConfig.mode MODE (``--datapath-opt mode=MODE`` for the
agent). Given no test paths, it runs exactly the kit's modules
(``axoneme.testing.conformance``); given paths, it parametrizes what they hold.

Which tests a datapath gets:

- every datapath: the offline contract checks (marker ``axoneme_offline``);
- a datapath that leaves nothing in the kernel (it keeps the Datapath
  default ``cleanup``, as NoopDatapath does; it enforces nothing): the
  offline reference semantics (marker ``axoneme_in_memory``);
- every other datapath: the kernel part (marker ``axoneme_kernel``): root,
  network namespaces and real traffic; skipped only on a missing machine
  capability, the reason printed.

A project can give a default list of datapaths and judge what its machine
lacks through two hooks (``pytest_axoneme_datapaths``,
``pytest_axoneme_machine_lacks``) in a conftest.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from axoneme.testing import capability
from axoneme.testing.conformance.fixtures import (  # noqa: F401 - fixtures of the plugin
    conformance_agent,
    conformance_guard,
    conformance_kernel_datapath,
    conformance_node,
    conformance_topology,
    conformance_world,
)

CONFORMANCE = Path(__file__).resolve().parent / "conformance"
#: the kit's test modules, in the order they run
KIT_MODULES = ("offline", "semantics", "k8s", "cilium", "failclosed")
MARKERS = {
    "axoneme_offline": "axoneme-testing: offline contract checks (no root, no kernel)",
    "axoneme_in_memory": "axoneme-testing: for datapaths that leave nothing in the kernel only",
    "axoneme_kernel": "axoneme-testing: kernel part (root, netns, real traffic)",
    "conformance": "the datapath conformance suite",
    "privileged": "needs root, BPF, netns (skips with a reason when not root)",
}
_SPEC = re.compile(r"^([A-Za-z0-9_][A-Za-z0-9_.-]*)(?::([A-Za-z0-9_.-]+))?$")


@dataclass(frozen=True)
class DatapathSpec:
    """One datapath under test: the entry point name and its mode ("" = default)."""

    name: str
    mode: str = ""

    @property
    def id(self) -> str:
        return f"{self.name}-{self.mode}" if self.mode else self.name

    @property
    def label(self) -> str:
        return f"{self.name}/{self.mode}" if self.mode else self.name

    def __str__(self) -> str:
        return self.id


def parse_specs(values: list[str] | tuple[str, ...], source: str = "--axoneme-datapath") -> list[DatapathSpec]:
    """``["ebpf,iptables:ipset", "noop"]`` -> specs, in order, without repeats."""
    out: list[DatapathSpec] = []
    for value in values:
        for item in str(value).split(","):
            item = item.strip()
            if not item:
                continue
            m = _SPEC.match(item)
            if m is None:
                raise pytest.UsageError(f"{source}: {item!r} is not NAME or NAME:MODE "
                                        f"(an axoneme.datapath entry point name, e.g. noop or iptables:ipset)")
            spec = DatapathSpec(m.group(1), m.group(2) or "")
            if spec not in out:
                out.append(spec)
    return out


def leaves_nothing_in_the_kernel(cls: type | None) -> bool:
    """A datapath keeping the Datapath default ``cleanup`` (nothing to remove):
    it holds its state in memory and enforces nothing (NoopDatapath-like)."""
    if cls is None:
        return False
    from axoneme.core.datapath import Datapath

    return getattr(cls, "cleanup", None) is Datapath.cleanup


def _class(name: str) -> type | None:
    """The datapath class, or None when it does not load (the offline contract
    test then fails with the loader's error)."""
    from axoneme.core.datapath import datapath_class
    from axoneme.core.errors import ConfigError, PluginError

    try:
        return datapath_class(name)
    except (PluginError, ConfigError):
        return None


class Hooks:
    """Hooks a project's conftest.py may implement."""

    @pytest.hookspec(firstresult=True)
    def pytest_axoneme_datapaths(self, config: pytest.Config) -> list[str] | None:
        """The datapaths under test when ``--axoneme-datapath`` is not given
        (items as the option takes them). Asked per directory (a conftest's
        answer holds for the tests below it)."""

    @pytest.hookspec(firstresult=True)
    def pytest_axoneme_machine_lacks(self, config: pytest.Config, name: str, mode: str) -> str | None:
        """Called when datapath ``name`` (``mode``) says it is unavailable: what
        this machine lacks for it (the test skips with it), ``""`` when it has
        everything (the test fails: a broken datapath is never skipped), or
        None when the implementation does not know that datapath."""


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.add_hookspecs(Hooks)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("axoneme", "axoneme datapath conformance (axoneme-testing)")
    group.addoption("--axoneme-datapath", action="append", default=[], dest="axoneme_datapath",
                    metavar="NAME[:MODE]",
                    help="run the conformance suite against the installed axoneme.datapath entry "
                         "point NAME (MODE: its DatapathConfig.mode); repeatable or comma-separated")


def kit_files() -> list[str]:
    return [str(CONFORMANCE / f"{m}.py") for m in KIT_MODULES]


def pytest_configure(config: pytest.Config) -> None:
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")
    given = config.getoption("axoneme_datapath", default=[]) or []
    parse_specs(given)  # a bad item is a usage error before anything runs
    if given and config.args_source is not pytest.Config.ArgsSource.ARGS:
        # `pytest --axoneme-datapath NAME` with no paths: the kit itself
        config.args = kit_files()


class KitModule(pytest.Module):
    """A kit module imported by its package name (wherever it is installed,
    whatever the project's import mode), not as a loose file."""

    def _getobj(self) -> Any:
        import importlib

        return importlib.import_module(f"axoneme.testing.conformance.{self.path.stem}")


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makemodule(module_path: Path, parent: Any) -> pytest.Module | None:
    if module_path.parent == CONFORMANCE and module_path.stem in KIT_MODULES:
        # a node id naming the kit's module wherever it is installed (outside the rootdir)
        return KitModule.from_parent(parent, path=module_path,
                                     nodeid=f"axoneme/testing/conformance/{module_path.name}")
    return None


def datapaths(config: pytest.Config, node: Any = None) -> list[DatapathSpec]:
    """The datapaths under test: the option, else a conftest's default."""
    given = config.getoption("axoneme_datapath", default=[]) or []
    if given:
        return parse_specs(given)
    hook = node.ihook if node is not None else config.hook
    default = hook.pytest_axoneme_datapaths(config=config)
    if default:
        return parse_specs(default, "pytest_axoneme_datapaths")
    raise pytest.UsageError("the axoneme conformance suite needs the datapath under test: "
                            "pytest --axoneme-datapath NAME[:MODE] (an installed axoneme.datapath "
                            "entry point)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "axoneme_datapath" not in metafunc.fixturenames:
        return
    specs = datapaths(metafunc.config, metafunc.definition)
    if metafunc.definition.get_closest_marker("axoneme_kernel"):
        specs = [s for s in specs if not leaves_nothing_in_the_kernel(_class(s.name))]
    elif metafunc.definition.get_closest_marker("axoneme_in_memory"):
        specs = [s for s in specs if leaves_nothing_in_the_kernel(_class(s.name))]
    metafunc.parametrize("axoneme_datapath", specs, ids=[s.id for s in specs], scope="module")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A part that applies to none of the datapaths under test is not a test
    (e.g. the kernel part of ``--axoneme-datapath noop``): deselected, not skipped."""
    keep, drop = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        if "axoneme_datapath" in getattr(item, "fixturenames", ()) and not (
                callspec is not None and isinstance(callspec.params.get("axoneme_datapath"), DatapathSpec)):
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def _judge(config: pytest.Config) -> capability.MachineLacks | None:
    hook = config.hook.pytest_axoneme_machine_lacks
    if not hook.get_hookimpls():
        return None

    def lacks(name: str, mode: str) -> str | None:
        answer = hook(config=config, name=name, mode=mode)
        return answer or None  # "" (has everything) and no answer alike: the datapath is broken

    return lacks


@pytest.fixture(scope="session")
def axoneme_probe(pytestconfig: pytest.Config) -> Callable[[str, str], str | None]:
    """``probe(name, mode)``: None when the datapath runs here, else the missing
    machine capability (skip); a broken datapath fails the test."""
    cache: dict[tuple[str, str], str | None] = {}
    judge = _judge(pytestconfig)

    def probe(name: str, mode: str = "") -> str | None:
        if (name, mode) not in cache:
            lacks = capability.lacks_root()
            cache[(name, mode)] = (f"datapath {name} kernel part: {lacks}" if lacks else
                                   capability.probe_datapath(name, mode, judge))
        return cache[(name, mode)]

    return probe


@pytest.fixture(scope="module")
def axoneme_datapath_class(axoneme_datapath: DatapathSpec) -> type:
    """The class of the datapath under test (loaded through its entry point)."""
    from axoneme.core.datapath import datapath_class

    return datapath_class(axoneme_datapath.name)


def pytest_report_header(config: pytest.Config) -> list[str]:
    given = config.getoption("axoneme_datapath", default=[]) or []
    if not given:
        return []
    parts = []
    for spec in parse_specs(given):
        cls = _class(spec.name)
        kind = ("not loadable" if cls is None else
                "offline part only: leaves nothing in the kernel" if leaves_nothing_in_the_kernel(cls)
                else "offline and kernel parts")
        parts.append(f"{spec.label} ({kind})")
    return ["axoneme-testing: datapaths under test: " + ", ".join(parts)]


_KIT_MARKERS = ("axoneme_offline", "axoneme_kernel", "axoneme_in_memory")
_REPORTED: list[tuple[str, str]] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and any(k in report.keywords for k in _KIT_MARKERS):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _REPORTED.append((report.nodeid, str(reason).removeprefix("Skipped: ")))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _REPORTED:
        terminalreporter.section("axoneme-testing: skipped (a missing machine capability)")
        for nodeid, reason in _REPORTED:
            terminalreporter.line(f"{nodeid}: {reason}")
