"""The kit's `k8s` module (axoneme.testing.conformance.k8s), on the datapaths of conftest.py."""

from axoneme.testing.conformance.k8s import *  # noqa: F403
