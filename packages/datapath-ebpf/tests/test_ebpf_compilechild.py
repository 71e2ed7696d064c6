"""The tc programs are compiled in a child process (issue 17: RSS).

A started datapath holds the programs' and maps' fds the child handed over;
the process that started it never imports bcc nor maps libbcc or LLVM (their
relocated data and the compile's heap stayed in an agent that compiled
in-process: ~23 MB of anon memory at rest). Checked in a fresh interpreter:
other tests here import bcc themselves.
"""

from __future__ import annotations

import json
import subprocess
import sys

from axoneme.testing.capability import require_bpffs

_SCRIPT = r"""
import json, shutil, sys, uuid
from axoneme.core.datapath import DatapathConfig
from axoneme.datapath.ebpf import EbpfDatapath, _bpf
root = f"/sys/fs/bpf/axoneme-test-{uuid.uuid4().hex[:8]}"
dp = EbpfDatapath(DatapathConfig(bpffs_root=root))
try:
    dp.start()
    maps = open("/proc/self/maps").read()
    out = {"bcc": any(m == "bcc" or m.startswith("bcc.") for m in sys.modules),
           "llvm": "libLLVM" in maps or "libbcc" in maps,
           "loaded": type(dp.bpf()).__name__,
           "progs": sorted(n for n, p in dp.bpf().programs.items() if p.fd > 0),
           "policy_fd": dp.map_fd("ax_policy") > 0,
           "metrics": dp.metrics()["compile_seconds"] > 0}
finally:
    dp.cleanup()
    shutil.rmtree(root, ignore_errors=True)
print(json.dumps(out))
"""


def test_the_datapath_holds_fds_and_no_compiler() -> None:
    require_bpffs()  # loads BPF programs and pins maps
    from axoneme.datapath.ebpf import _bpf

    res = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True,
                         timeout=120, check=True)
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got == {"bcc": False, "llvm": False, "loaded": "Loaded",
                   "progs": sorted(_bpf.PROGRAMS), "policy_fd": True, "metrics": True}
