"""Plugin loading: stevedore decides what is loaded, pluggy is how it talks.

The plugin manager is built by a function, never at import time.
"""

from __future__ import annotations

import logging
from importlib.metadata import entry_points
from typing import Any

import pluggy
from axoneme.core import hookspecs
from axoneme.core.errors import PluginError

LOG = logging.getLogger(__name__)

GROUP_DATAPATH = "axoneme.datapath"
GROUP_L7 = "axoneme.l7"
GROUP_PLUGINS = "axoneme.plugins"
GROUPS = (GROUP_DATAPATH, GROUP_L7, GROUP_PLUGINS)


def installed(group: str) -> dict[str, str]:
    """Entry points of ``group``: name -> ``module:attr``."""
    return {ep.name: ep.value for ep in entry_points(group=group)}


def load_driver(group: str, name: str, *args: Any, **kwargs: Any) -> Any:
    """Load exactly one driver by name (stevedore DriverManager).

    Fails loudly: an unknown or broken plugin raises PluginError naming it.
    """
    from stevedore import driver
    from stevedore.exception import NoMatches

    if name not in installed(group):
        choices = ", ".join(sorted(installed(group))) or "none"
        raise PluginError(f"no {group} plugin named {name!r} is installed (installed: {choices})")
    try:
        mgr = driver.DriverManager(
            namespace=group, name=name, invoke_on_load=bool(args or kwargs),
            invoke_args=args, invoke_kwds=kwargs, on_load_failure_callback=_raise,
        )
    except NoMatches as e:  # pragma: no cover - guarded above
        raise PluginError(f"no {group} plugin named {name!r}") from e
    except PluginError:
        raise
    except Exception as e:
        raise PluginError(f"{group} plugin {name!r} failed to load: {e}") from e
    return mgr.driver


def load_class(group: str, name: str) -> Any:
    """The object an entry point names, without calling it."""
    for ep in entry_points(group=group):
        if ep.name == name:
            try:
                return ep.load()
            except Exception as e:
                raise PluginError(f"{group} plugin {name!r} failed to load: {e}") from e
    choices = ", ".join(sorted(installed(group))) or "none"
    raise PluginError(f"no {group} plugin named {name!r} is installed (installed: {choices})")


def _raise(manager: Any, entrypoint: Any, exc: BaseException) -> None:
    raise PluginError(f"plugin {entrypoint.name!r} failed to load: {exc}") from exc


def make_plugin_manager(load_entrypoints: bool = True) -> pluggy.PluginManager:
    """Build the pluggy manager with the hookspecs and every ``axoneme.plugins`` entry point."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    if load_entrypoints:
        try:
            pm.load_setuptools_entrypoints(GROUP_PLUGINS)
        except Exception as e:
            raise PluginError(f"an {GROUP_PLUGINS} plugin failed to load: {e}") from e
    return pm
