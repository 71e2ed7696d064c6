"""The kit's `cilium` module (axoneme.testing.conformance.cilium), on the datapaths of conftest.py."""

from axoneme.testing.conformance.cilium import *  # noqa: F403
