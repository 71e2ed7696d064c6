"""``agent run --install-cni``: the conflist and the plugin where runtimes look.

Standalone mode installs a wrapper script that runs the plugin of the
agent's own installation. In Kubernetes mode the agent runs in a container
and the runtime (containerd, on the host) runs the plugin: the wrapper would
point into the image. There the plugin is a self-contained zipapp (what
``python3 -m zipapp`` makes, shebang ``/usr/bin/env python3``) of
``axoneme.cni`` and the ``axoneme.core`` modules it imports, built at install
time from the installed package files. Those must need the standard library
only: the build checks every import and refuses anything else. When the
installation has the native fast path (``axoneme-cni-native`` beside this
interpreter: scripts/k8s-images builds it into the image, static, with no
fallback path compiled in), that is installed as ``axoneme-cni`` and the
zipapp beside it as ``axoneme-cni-python``, which the native plugin runs for
everything it does not answer itself; without it the zipapp is
``axoneme-cni``, as before.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import zipapp

from axoneme.agent._config import AgentConfig
from axoneme.agent._runtime import cni_binary
from axoneme.agent._statefile import write_json_atomic
from axoneme.core.errors import AxonemeError

LOG = logging.getLogger(__name__)

CONF_DIR = "/etc/cni/net.d"
BIN_DIR = "/opt/cni/bin"
CONFLIST = "05-axoneme.conflist"
NETWORK = "axoneme"
PLUGIN = "axoneme-cni"
PYTHON_PLUGIN = "axoneme-cni-python"  # the native plugin's fallback beside it (native/main.go)
NATIVE = "axoneme-cni-native"
PLUGIN_MODULE = "axoneme.cni.plugin"
INTERPRETER = "/usr/bin/env python3"


def conflist(api_socket: str) -> dict[str, object]:
    return {"cniVersion": "1.0.0", "name": NETWORK,
            "plugins": [{"type": PLUGIN, "agentSocket": api_socket}]}


def install_cni(config: AgentConfig, conf_dir: str | None = None,
                bin_dir: str | None = None) -> None:
    conf_dir = conf_dir or config.cni_conf_dir or CONF_DIR
    bin_dir = bin_dir or config.cni_bin_dir or BIN_DIR
    os.makedirs(conf_dir, exist_ok=True)
    os.makedirs(bin_dir, exist_ok=True)
    plugin = os.path.join(bin_dir, PLUGIN)
    # the plugin first: a runtime that sees the conflist must find it
    if config.k8s_mode and not config.cni_bin:
        what = install_k8s_plugin(bin_dir, native_plugin())
    else:
        target = cni_binary(config.cni_bin)
        _write_executable(plugin, f"#!/bin/sh\n# installed by axoneme agent run --install-cni\n"
                                  f"exec {target} \"$@\"\n")
        what = f"wrapper of {target}"
    write_json_atomic(os.path.join(conf_dir, CONFLIST), conflist(config.api_socket))
    LOG.warning("installed CNI config %s and plugin %s (%s)", os.path.join(conf_dir, CONFLIST),
                plugin, what)


def native_plugin() -> str | None:
    """The native fast path beside this interpreter, if this installation has it."""
    here = os.path.join(os.path.dirname(sys.executable), NATIVE)
    return here if os.access(here, os.X_OK) else None


def install_k8s_plugin(bin_dir: str, native: str | None) -> str:
    """Kubernetes mode: the plugin files in ``bin_dir``, each written atomically, the
    fallback before the plugin that runs it; what was installed, for the log."""
    plugin = os.path.join(bin_dir, PLUGIN)
    if native is None:
        modules = build_zipapp(plugin)
        return f"zipapp of {len(modules)} modules; no native plugin ({NATIVE}) in this installation"
    modules = build_zipapp(os.path.join(bin_dir, PYTHON_PLUGIN))
    _install_file(native, plugin)
    return f"native {native}, its fallback {PYTHON_PLUGIN} a zipapp of {len(modules)} modules"


def _install_file(src: str, dest: str) -> None:
    with open(src, "rb") as f:
        _install_bytes(f.read(), dest)


def _write_executable(path: str, text: str) -> None:
    _install_bytes(text.encode(), path)


def _install_bytes(data: bytes, dest: str) -> None:
    """``data`` as ``dest`` (mode 0755), written under a temporary name of its own and renamed:
    a runtime never runs a partial file, and agents of several nodes sharing one host directory
    (scripts/cluster --nodes N) never write into each other's copy."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest), prefix=f".{os.path.basename(dest)}.")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.chmod(tmp, 0o755)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# -- the zipapp -------------------------------------------------------------------------------

def plugin_modules(root: str = PLUGIN_MODULE) -> dict[str, str]:
    """Module name -> source file of ``root`` and every axoneme module it
    imports, transitively. AxonemeError naming the module and the import when
    one needs anything beyond the standard library."""
    found: dict[str, str] = {}
    todo = [root]
    while todo:
        name = todo.pop()
        if name in found:
            continue
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            raise AxonemeError(f"CNI plugin zipapp: cannot find the source of {name}")
        found[name] = spec.origin
        with open(spec.origin, encoding="utf-8") as f:
            tree = ast.parse(f.read(), spec.origin)
        for node in ast.walk(tree):
            for imported in _imports(node, name, spec.submodule_search_locations is not None):
                top = imported.split(".")[0]
                if top == "axoneme":
                    todo.append(imported)
                elif top not in sys.stdlib_module_names and top != "__future__":
                    raise AxonemeError(f"CNI plugin zipapp: {name} imports {imported}, which "
                                       f"is not in the standard library ({spec.origin})")
    return found


def _imports(node: ast.AST, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        parts = module.split(".")
        keep = len(parts) - node.level + (1 if is_package else 0)
        base = ".".join(parts[:keep] + ([base] if base else []))
    out = [base]
    for a in node.names:  # `from axoneme.core import names`: a module or a name
        sub = f"{base}.{a.name}"
        if base.startswith("axoneme") and importlib.util.find_spec(base) is not None:
            try:
                if importlib.util.find_spec(sub) is not None:
                    out.append(sub)
            except (ImportError, ValueError):
                pass
    return out


def build_zipapp(target: str) -> list[str]:
    """Write the plugin zipapp to ``target`` (atomically); its module names."""
    modules = plugin_modules()
    with tempfile.TemporaryDirectory(prefix="axoneme-cni-") as tmp:
        src = os.path.join(tmp, "src")
        for name, origin in modules.items():
            parts = name.split(".")
            if origin.endswith("__init__.py"):
                dest = os.path.join(src, *parts, "__init__.py")
            else:
                dest = os.path.join(src, *parts[:-1], parts[-1] + ".py")
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.copyfile(origin, dest)
        # packages on the way: empty __init__ (the real ones import far more
        # than the plugin needs; inside the archive they are plain packages)
        for name in modules:
            parts = name.split(".")
            for i in range(1, len(parts)):
                init = os.path.join(src, *parts[:i], "__init__.py")
                if not os.path.exists(init):
                    with open(init, "w") as f:
                        f.write("")
        with open(os.path.join(src, "__main__.py"), "w") as f:
            f.write(f"import sys\n\nfrom {PLUGIN_MODULE} import main\n\nsys.exit(main())\n")
        out = os.path.join(tmp, "plugin.pyz")
        zipapp.create_archive(src, out, interpreter=INTERPRETER)
        os.chmod(out, 0o755)
        _install_file(out, target)
    return sorted(modules)
