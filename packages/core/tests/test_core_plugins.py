"""The plugin registry (axoneme.core.plugins): one way to load every plugin kind."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest
from axoneme.core.errors import ConfigError, PluginError
from axoneme.core.plugins import (
    GROUP_DATAPATH,
    GROUP_L7,
    GROUP_PLUGINS,
    Registry,
    make_plugin_manager,
    parse_allow_list,
)


@dataclass
class Dist:
    name: str
    version: str = "1.0"


@dataclass
class FakeEP:
    """What the registry uses of an importlib.metadata.EntryPoint."""

    name: str
    target: Callable[[], Any]
    dist: Dist = field(default_factory=lambda: Dist("dist-a"))
    value: str = "pkg.mod:Obj"
    loads: int = 0

    def load(self) -> Any:
        self.loads += 1
        return self.target()


class Thing:
    pass


def broken() -> Any:
    raise ImportError("No module named 'nowhere'")


def registry(eps: dict[str, list[FakeEP]], allow: Iterable[str] | None = None) -> Registry:
    return Registry(allow=frozenset(allow) if allow is not None else None,
                    source=lambda group: eps.get(group, []))


def test_loads_once_and_lists_distribution_and_version() -> None:
    ep = FakeEP("x", lambda: Thing, Dist("axoneme-x", "2.3"), "x.mod:Thing")
    reg = registry({GROUP_L7: [ep]})
    assert reg.load(GROUP_L7, "x") is Thing and reg.load(GROUP_L7, "x") is Thing
    assert ep.loads == 1
    (info,) = reg.infos(GROUP_L7)
    assert (info.kind, info.name, info.distribution, info.version, info.entry_point) == (
        "l7", "x", "axoneme-x", "2.3", "x.mod:Thing")
    assert reg.installed(GROUP_L7) == {"x": "x.mod:Thing"}
    assert isinstance(reg.driver(GROUP_L7, "x"), Thing)


def test_duplicate_names_name_both_distributions() -> None:
    reg = registry({GROUP_DATAPATH: [FakeEP("dp", lambda: Thing, Dist("first")),
                                     FakeEP("dp", lambda: Thing, Dist("second"))]})
    with pytest.raises(PluginError) as e:
        reg.load(GROUP_DATAPATH, "dp")
    assert "first" in str(e.value) and "second" in str(e.value) and "'dp'" in str(e.value)
    assert {i.distribution: i.duplicate_of for i in reg.infos(GROUP_DATAPATH)} == {
        "first": ("second",), "second": ("first",)}
    assert reg.load_error(GROUP_DATAPATH, "dp") is not None


def test_a_broken_plugin_fails_loudly_every_time() -> None:
    ep = FakeEP("bad", broken, Dist("axoneme-bad"))
    reg = registry({GROUP_L7: [ep]})
    for _ in range(2):
        with pytest.raises(PluginError) as e:
            reg.load(GROUP_L7, "bad")
        msg = str(e.value)
        assert "'bad'" in msg and "axoneme-bad" in msg and "No module named 'nowhere'" in msg
    assert ep.loads == 1
    assert reg.l7_parsers() == {}  # logged, not raised: the others still load


def test_unknown_plugin_lists_what_is_installed() -> None:
    reg = registry({GROUP_L7: [FakeEP("http", lambda: Thing)]})
    with pytest.raises(PluginError, match=r"no axoneme.l7 plugin named 'echo'.*installed: http"):
        reg.load(GROUP_L7, "echo")


def test_allow_list_hides_the_rest() -> None:
    eps = {GROUP_L7: [FakeEP("http", lambda: Thing), FakeEP("kafka", lambda: Thing)],
           GROUP_DATAPATH: [FakeEP("ebpf", lambda: Thing), FakeEP("kafka", lambda: Thing)]}
    reg = registry(eps, allow=["http", "datapath:ebpf"])
    assert reg.names(GROUP_L7) == ["http"] and reg.names(GROUP_DATAPATH) == ["ebpf"]
    with pytest.raises(PluginError, match="allow-list"):
        reg.load(GROUP_L7, "kafka")
    assert [i.name for i in reg.infos(GROUP_L7, include_hidden=True)] == ["http", "kafka"]
    reg.check_allow_list()
    with pytest.raises(PluginError, match=r"not installed: echo, l7:nope"):
        registry(eps, allow=["http", "echo", "l7:nope"]).check_allow_list()
    with pytest.raises(PluginError, match="unknown kind"):
        registry(eps, allow=["parser:http"]).check_allow_list()


def test_parse_allow_list() -> None:
    assert parse_allow_list(None, "a.yaml") is None
    assert parse_allow_list(["http", " l7:dns "], "a.yaml") == ["http", "l7:dns"]
    for bad, text in (("http", "must be a list"), ([1], r"plugins\[0\]"), (["x:y"], "unknown kind")):
        with pytest.raises(ConfigError, match=text) as e:
            parse_allow_list(bad, "a.yaml")
        assert "(a.yaml)" in str(e.value)


def test_hook_modules_come_from_the_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    from axoneme.core import hookspecs, plugins

    class Hooks:
        seen: list[Any] = []

        @hookspecs.hookimpl
        def axoneme_flow_observed(self, flow: Any) -> None:
            self.seen.append(flow)

    hooks = Hooks()
    monkeypatch.setattr(plugins, "_REGISTRY", registry({GROUP_PLUGINS: [FakeEP("h", lambda: hooks)]}))
    pm = make_plugin_manager()
    pm.hook.axoneme_flow_observed(flow="f")
    assert Hooks.seen == ["f"]
    monkeypatch.setattr(plugins, "_REGISTRY", registry({GROUP_PLUGINS: [FakeEP("h", broken)]}))
    with pytest.raises(PluginError, match="'h'"):
        make_plugin_manager()
