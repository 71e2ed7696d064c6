"""The kit's `failclosed` module (axoneme.testing.conformance.failclosed), on the datapaths of conftest.py."""

from axoneme.testing.conformance.failclosed import *  # noqa: F403
