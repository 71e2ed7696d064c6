"""The kit's `offline` module (axoneme.testing.conformance.offline), on the datapaths of conftest.py."""

from axoneme.testing.conformance.offline import *  # noqa: F403
