"""``agent run --install-cni``: the conflist and the plugin where runtimes look."""

from __future__ import annotations

import logging
import os

from axoneme.agent._config import AgentConfig
from axoneme.agent._runtime import cni_binary
from axoneme.agent._statefile import write_json_atomic

LOG = logging.getLogger(__name__)

CONF_DIR = "/etc/cni/net.d"
BIN_DIR = "/opt/cni/bin"
CONFLIST = "05-axoneme.conflist"
NETWORK = "axoneme"


def conflist(api_socket: str) -> dict[str, object]:
    return {"cniVersion": "1.0.0", "name": NETWORK,
            "plugins": [{"type": "axoneme-cni", "agentSocket": api_socket}]}


def install_cni(config: AgentConfig, conf_dir: str = CONF_DIR, bin_dir: str = BIN_DIR) -> None:
    os.makedirs(conf_dir, exist_ok=True)
    os.makedirs(bin_dir, exist_ok=True)
    write_json_atomic(os.path.join(conf_dir, CONFLIST), conflist(config.api_socket))
    target = cni_binary(config.cni_bin)
    wrapper = os.path.join(bin_dir, "axoneme-cni")
    tmp = wrapper + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"#!/bin/sh\n# installed by axoneme agent run --install-cni\nexec {target} \"$@\"\n")
    os.chmod(tmp, 0o755)
    os.replace(tmp, wrapper)
    LOG.warning("installed CNI config %s and plugin %s", os.path.join(conf_dir, CONFLIST), wrapper)
