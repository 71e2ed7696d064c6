"""axoneme's test kit: the datapath conformance suite as a pytest plugin.

``pip install axoneme-testing`` registers the plugin (entry point ``pytest11``);
``pytest --axoneme-datapath NAME`` then runs the conformance suite against the
installed ``axoneme.datapath`` entry point NAME (repeatable or comma-separated,
``NAME:MODE`` for a datapath mode). Two parts, by marker:

- ``axoneme_offline``: no root, no kernel: the datapath's declarations
  (capabilities, options) are well formed, it implements the contract, and a
  datapath that needs no kernel follows the NoopDatapath reference (sync,
  apply, dump, MapState.lookup agreement on generated cases);
- ``axoneme_kernel``: root, network namespaces, real traffic through an agent
  (``axoneme agent run``) or the datapath itself; skipped only on a missing
  machine capability, with the reason printed.

Modules: ``plugin`` (the pytest plugin), ``netns`` (namespaces with their own
resolver, servers that accept before a test sees them), ``capability``
(root/tool/BPF gating and the datapath probe), ``conformance`` (the suite).
"""

from axoneme.testing.capability import probe_datapath, require_bpffs, require_root, require_tools
from axoneme.testing.netns import add_netns, del_netns, free_pod_cidr, wait_accepting

__all__ = [
    "add_netns",
    "del_netns",
    "free_pod_cidr",
    "probe_datapath",
    "require_bpffs",
    "require_root",
    "require_tools",
    "wait_accepting",
]
