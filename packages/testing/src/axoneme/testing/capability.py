"""Skip only on a missing machine capability; a broken datapath fails.

The one definition of the test gating ("needs root", "needs these tools",
"needs the bpf filesystem") and of the datapath probe every suite uses:

- ``require_root(what)`` / ``require_tools(*names)`` / ``require_bpffs()`` skip
  the test with the reason when this machine (or user) lacks it;
- ``probe_datapath(name, mode, machine_lacks)``: None when the datapath can run
  here, else the reason to skip. The datapath's own ``probe()`` raising
  DatapathUnavailable is a reason to skip only when this machine lacks what
  the datapath needs: ``machine_lacks(name, mode)`` says what (a string) or
  that it has everything (None: the test fails, a broken datapath is never
  skipped). Without a judge (``machine_lacks=None``, a third-party datapath
  nobody here knows the needs of) the datapath's own reason is the skip
  reason. Anything else -- not installed, an ImportError, a compile error --
  fails.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable

import pytest

MachineLacks = Callable[[str, str], "str | None"]


def lacks_root() -> str | None:
    return None if os.geteuid() == 0 else "not root"


def require_root(what: str) -> None:
    """Skip unless root; ``what`` says what the test makes (netns, veth, BPF maps...)."""
    if lacks_root():
        pytest.skip(f"needs root: {what}")


def lacks_tools(*names: str) -> str | None:
    missing = [n for n in names if shutil.which(n) is None]
    return f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed" if missing else None


def require_tools(*names: str) -> None:
    why = lacks_tools(*names)
    if why:
        pytest.skip(why)


def lacks_bpffs() -> str | None:
    return None if os.path.isdir("/sys/fs/bpf") else "no /sys/fs/bpf (kernel without the bpf filesystem)"


def require_bpffs() -> None:
    why = lacks_root() or lacks_bpffs()
    if why:
        pytest.skip(f"needs root and the bpf filesystem: {why}")


def probe_datapath(name: str, mode: str = "", machine_lacks: MachineLacks | None = None) -> str | None:
    """None if ``name`` (in ``mode``) can run here, else the capability it lacks (skip).

    Fails the test on anything that is not a missing capability.
    """
    from axoneme.core import plugins
    from axoneme.core.datapath import DatapathConfig
    from axoneme.core.errors import DatapathUnavailable

    label = f"{name}/{mode}" if mode else name
    if name not in plugins.installed("axoneme.datapath"):
        pytest.fail(f"datapath {name!r} is not installed (the suite asks for it): install its "
                    f"distribution (an axoneme.datapath entry point named {name!r})")
    cls = plugins.load_class("axoneme.datapath", name)  # ImportError etc.: a broken plugin fails
    bpffs = f"/sys/fs/bpf/axoneme-probe-{secrets.token_hex(3)}"
    try:
        cls(DatapathConfig(state_dir="/tmp", mode=mode, bpffs_root=bpffs)).probe()
    except DatapathUnavailable as e:
        if machine_lacks is None:
            return f"datapath {label} unavailable: {e}"
        lacks = machine_lacks(name, mode)
        if lacks is None:
            pytest.fail(f"datapath {label} says it is unavailable ({e}) but this machine has "
                        f"everything it needs: a broken datapath fails, it is not skipped")
        return f"datapath {label} unavailable: {e} (this machine: {lacks})"
    finally:
        shutil.rmtree(bpffs, ignore_errors=True)
    return None
