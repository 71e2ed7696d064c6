"""The kit's `semantics` module (axoneme.testing.conformance.semantics), on the datapaths of conftest.py."""

from axoneme.testing.conformance.semantics import *  # noqa: F403
