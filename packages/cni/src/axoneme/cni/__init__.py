"""axoneme-cni: the CNI plugin (spec 1.0.0 / 1.1.0)."""
