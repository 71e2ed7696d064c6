"""The datapath conformance suite of axoneme-testing (see ``axoneme.testing``).

Test modules (collected by the plugin, run against ``--axoneme-datapath``):
``offline`` (contract), ``semantics`` (generated cases: the NoopDatapath
reference offline, MapState.lookup in the kernel), ``k8s`` and ``cilium``
(policy scenarios through an agent, real traffic), ``failclosed`` (the
datapath driven directly). ``fixtures`` holds their fixtures, ``_harness``
and ``_cases`` the agent/topology machinery, and ``podserver.py``,
``prober.py``, ``holder.py`` the stdlib scripts run inside the pods.
"""
