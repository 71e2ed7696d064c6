"""The plugin registry: every plugin kind, loaded one way, once.

Three entry-point groups (names short and user-visible):

- ``axoneme.datapath``: enforcement backends, exactly one per node;
- ``axoneme.l7``: L7 parsers (``axoneme.core.l7.L7Parser``);
- ``axoneme.plugins``: pluggy hook implementations.

Rules the registry enforces:

1. A name is unique within a group: two distributions offering the same name
   make loading that name a ``PluginError`` naming both distributions (the
   listing shows it as failing), never a silent pick.
2. A plugin that is used (a datapath chosen, a parser a policy selects, a hook
   module at agent start) and cannot load raises ``PluginError`` naming it and
   the import error.
3. An allow-list (the agent config's ``plugins:`` key, ``NAME`` or
   ``KIND:NAME`` items, KIND one of datapath, l7, plugins) hides every plugin
   it does not name; naming a plugin that is not installed is an error.

The plugin manager is built by a function, never at import time.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import pluggy
from axoneme.core import hookspecs
from axoneme.core.errors import PluginError

LOG = logging.getLogger(__name__)

GROUP_DATAPATH = "axoneme.datapath"
GROUP_L7 = "axoneme.l7"
GROUP_PLUGINS = "axoneme.plugins"
GROUPS = (GROUP_DATAPATH, GROUP_L7, GROUP_PLUGINS)
KINDS = {GROUP_DATAPATH: "datapath", GROUP_L7: "l7", GROUP_PLUGINS: "plugins"}
_GROUP_OF_KIND = {kind: group for group, kind in KINDS.items()}


@dataclass(frozen=True, slots=True)
class PluginInfo:
    """One installed entry point (what ``axoneme plugins`` shows)."""

    group: str
    name: str
    entry_point: str  # module:attr
    distribution: str
    version: str
    duplicate_of: tuple[str, ...] = ()  # other distributions offering the same name

    @property
    def kind(self) -> str:
        return KINDS.get(self.group, self.group)


@dataclass
class _Loaded:
    obj: Any = None
    error: PluginError | None = None


@dataclass
class Registry:
    """Installed plugins of every group; loads each at most once.

    ``allow``: the allow-list (None = everything installed). ``source``
    returns the entry points of a group (tests pass their own)."""

    allow: frozenset[str] | None = None
    source: Callable[[str], Iterable[EntryPoint]] = field(default=lambda g: entry_points(group=g))
    _eps: dict[str, dict[str, list[EntryPoint]]] = field(default_factory=dict, init=False, repr=False)
    _loaded: dict[tuple[str, str], _Loaded] = field(default_factory=dict, init=False, repr=False)
    _lock: threading.RLock = field(default_factory=threading.RLock, init=False, repr=False)

    # -- what is installed --------------------------------------------------------

    def _group(self, group: str) -> dict[str, list[EntryPoint]]:
        with self._lock:
            eps = self._eps.get(group)
            if eps is None:
                eps = {}
                seen: set[tuple[str, str]] = set()
                for ep in self.source(group):
                    dist = _dist_name(ep)
                    if (ep.name, dist) in seen:  # one distribution seen twice on sys.path
                        continue
                    seen.add((ep.name, dist))
                    eps.setdefault(ep.name, []).append(ep)
                self._eps[group] = eps
            return eps

    def allowed(self, group: str, name: str) -> bool:
        return self.allow is None or name in self.allow or f"{KINDS.get(group, group)}:{name}" in self.allow

    def infos(self, group: str, *, include_hidden: bool = False) -> list[PluginInfo]:
        """The entry points of ``group`` sorted by name (allowed ones unless ``include_hidden``)."""
        out: list[PluginInfo] = []
        for name, eps in sorted(self._group(group).items()):
            if not include_hidden and not self.allowed(group, name):
                continue
            dists = [_dist_name(ep) for ep in eps]
            for ep, dist in zip(eps, dists, strict=True):
                out.append(PluginInfo(group, name, ep.value, dist, _dist_version(ep),
                                      tuple(d for d in dists if d != dist)))
        return out

    def names(self, group: str) -> list[str]:
        """Names of the allowed plugins of ``group``, sorted."""
        return sorted(n for n in self._group(group) if self.allowed(group, n))

    def installed(self, group: str) -> dict[str, str]:
        """Allowed entry points of ``group``: name -> ``module:attr``."""
        return {i.name: i.entry_point for i in self.infos(group)}

    def check_allow_list(self) -> None:
        """PluginError when the allow-list names a plugin that is not installed."""
        if self.allow is None:
            return
        missing: list[str] = []
        for item in sorted(self.allow):
            kind, sep, name = item.rpartition(":")
            groups = [_GROUP_OF_KIND[kind]] if sep and kind in _GROUP_OF_KIND else list(GROUPS)
            if sep and kind not in _GROUP_OF_KIND:
                raise PluginError(f"plugins allow-list item {item!r}: unknown kind {kind!r} "
                                  f"(datapath, l7 or plugins)")
            if not any(name in self._group(g) for g in groups):
                missing.append(item)
        if missing:
            raise PluginError(f"plugins allow-list names plugins that are not installed: "
                              f"{', '.join(missing)} (installed: {self._all_names()})")

    def _all_names(self) -> str:
        names = [f"{KINDS[g]}:{n}" for g in GROUPS for n in sorted(self._group(g))]
        return ", ".join(names) or "none"

    # -- loading ------------------------------------------------------------------

    def load(self, group: str, name: str) -> Any:
        """The object the entry point names (not called), loaded once.

        PluginError: not installed, hidden by the allow-list, offered by two
        distributions, or failing to import (the error is kept and raised
        again on every later call)."""
        key = (group, name)
        with self._lock:
            got = self._loaded.get(key)
            if got is None:
                got = self._loaded[key] = self._load(group, name)
        if got.error is not None:
            raise got.error
        return got.obj

    def _load(self, group: str, name: str) -> _Loaded:
        eps = self._group(group).get(name)
        if not eps:
            return _Loaded(error=PluginError(
                f"no {group} plugin named {name!r} is installed (installed: "
                f"{', '.join(self.names(group)) or 'none'})"))
        if not self.allowed(group, name):
            return _Loaded(error=PluginError(
                f"{group} plugin {name!r} is not in the plugins allow-list "
                f"(allowed: {', '.join(sorted(self.allow or ())) or 'none'})"))
        if len(eps) > 1:
            dists = " and ".join(f"{_dist_name(ep)} ({ep.value})" for ep in eps)
            return _Loaded(error=PluginError(f"{group} plugin {name!r} is offered by {dists}: "
                                             f"uninstall one"))
        try:
            return _Loaded(obj=eps[0].load())
        except Exception as e:
            LOG.debug("loading %s plugin %s failed", group, name, exc_info=True)
            return _Loaded(error=PluginError(
                f"{group} plugin {name!r} ({eps[0].value}, from {_dist_name(eps[0])}) failed to "
                f"load: {type(e).__name__}: {e}"))

    def load_error(self, group: str, name: str) -> PluginError | None:
        """The error loading ``name`` raises, or None when it loads."""
        try:
            self.load(group, name)
        except PluginError as e:
            return e
        return None

    def driver(self, group: str, name: str, *args: Any, **kwargs: Any) -> Any:
        """Load one driver by name and instantiate it with ``args``/``kwargs``."""
        cls = self.load(group, name)
        try:
            return cls(*args, **kwargs)
        except PluginError:
            raise
        except Exception as e:
            raise PluginError(f"{group} plugin {name!r} failed to start: {type(e).__name__}: {e}") from e

    def l7_parser(self, name: str) -> Any:
        """An instance of the ``axoneme.l7`` parser ``name`` (one per registry)."""
        key = (GROUP_L7, f"{name}#instance")
        with self._lock:
            got = self._loaded.get(key)
            if got is None:
                try:
                    got = _Loaded(obj=self.driver(GROUP_L7, name))
                except PluginError as e:
                    got = _Loaded(error=e)
                self._loaded[key] = got
        if got.error is not None:
            raise got.error
        return got.obj

    def l7_parsers(self) -> dict[str, Any]:
        """Every allowed L7 parser that loads, by name (failures are logged)."""
        out: dict[str, Any] = {}
        for name in self.names(GROUP_L7):
            try:
                out[name] = self.l7_parser(name)
            except PluginError as e:
                LOG.warning("%s", e)
        return out

    def hook_modules(self) -> list[tuple[str, Any]]:
        """(name, object) of every allowed ``axoneme.plugins`` entry point; PluginError if one fails."""
        return [(name, self.load(GROUP_PLUGINS, name)) for name in self.names(GROUP_PLUGINS)]


def _dist_name(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return str(dist.name) if dist is not None else "?"


def _dist_version(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return str(dist.version) if dist is not None else "?"


# -- the process's registry ----------------------------------------------------------

_REGISTRY: Registry | None = None
_REGISTRY_LOCK = threading.Lock()


def registry() -> Registry:
    """The process-wide registry (built on first use, without an allow-list)."""
    global _REGISTRY
    with _REGISTRY_LOCK:
        if _REGISTRY is None:
            _REGISTRY = Registry()
        return _REGISTRY


def configure(allow: Sequence[str] | None = None) -> Registry:
    """Replace the process-wide registry (the agent calls it with its config's
    ``plugins:`` allow-list before loading anything); checks the allow-list."""
    global _REGISTRY
    reg = Registry(allow=frozenset(allow) if allow is not None else None)
    reg.check_allow_list()
    with _REGISTRY_LOCK:
        _REGISTRY = reg
    return reg


def parse_allow_list(value: object, where: str) -> list[str] | None:
    """The ``plugins:`` config value: a list of plugin names (``NAME`` or
    ``KIND:NAME``), or None when absent. ConfigError naming ``where`` otherwise."""
    from axoneme.core.errors import ConfigError

    if value is None:
        return None
    if not isinstance(value, list):
        raise ConfigError(f"plugins must be a list of plugin names ({where})")
    out: list[str] = []
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            raise ConfigError(f"plugins[{i}] must be a plugin name ({where})")
        kind, sep, _ = item.strip().rpartition(":")
        if sep and kind not in _GROUP_OF_KIND:
            raise ConfigError(f"plugins[{i}]: unknown kind {kind!r} in {item!r} "
                              f"(NAME or KIND:NAME, KIND one of datapath, l7, plugins) ({where})")
        out.append(item.strip())
    return out


# -- compatibility (one registry underneath) ---------------------------------------------

def installed(group: str) -> dict[str, str]:
    """Entry points of ``group``: name -> ``module:attr``."""
    return registry().installed(group)


def load_driver(group: str, name: str, *args: Any, **kwargs: Any) -> Any:
    """Load exactly one driver by name and instantiate it; PluginError naming it otherwise."""
    return registry().driver(group, name, *args, **kwargs)


def load_class(group: str, name: str) -> Any:
    """The object an entry point names, without calling it."""
    return registry().load(group, name)


def l7_parser(name: str) -> Any:
    """The L7 parser instance ``name`` of the process's registry."""
    return registry().l7_parser(name)


def make_plugin_manager(load_entrypoints: bool = True) -> pluggy.PluginManager:
    """Build the pluggy manager with the hookspecs and every allowed ``axoneme.plugins`` entry point."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    if load_entrypoints:
        for name, obj in registry().hook_modules():
            if pm.is_registered(obj):
                continue
            try:
                pm.register(obj, name=name)
            except Exception as e:
                raise PluginError(f"{GROUP_PLUGINS} plugin {name!r} failed to register: {e}") from e
    return pm


__all__ = ["GROUPS", "GROUP_DATAPATH", "GROUP_L7", "GROUP_PLUGINS", "KINDS", "PluginInfo", "Registry",
           "configure", "installed", "l7_parser", "load_class", "load_driver", "make_plugin_manager",
           "parse_allow_list", "registry"]
