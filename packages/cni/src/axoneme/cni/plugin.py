"""Entry point of the axoneme-cni executable."""

from __future__ import annotations

import json
import sys


def main() -> int:
    json.dump({"cniVersion": "1.0.0", "code": 999, "msg": "axoneme-cni: not implemented yet"}, sys.stdout)
    return 1
