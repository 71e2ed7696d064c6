"""Run a transparent DnsProxy (for the privileged netns test).

``python dns_tproxy_runner.py PORT RESOLVER_IP`` inside the router netns:
listens on 0.0.0.0:PORT with IP_TRANSPARENT, allows ``api.twitter.com`` and
``*.example.com`` for queries to RESOLVER_IP:53 only, prints ``READY``, one
``FLOW <json>`` line per flow, and on SIGTERM ``CACHE <snapshot json>``.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys

from axoneme.core.marks import MARK_MAGIC_FROM_PROXY
from axoneme.l7.dns import DnsProxy, DnsProxyConfig, DNSRule, FQDNCache

RULES = (DNSRule(match_name="api.twitter.com"), DNSRule(match_pattern="*.example.com"))


async def main() -> None:
    port, resolver = int(sys.argv[1]), sys.argv[2]
    cache = FQDNCache()

    def policy_for(src_ip: str, dst_ip: str, dst_port: int):
        # only the redirected resolver is covered: proves the original
        # destination came through TPROXY
        return RULES if (dst_ip, dst_port) == (resolver, 53) else None

    def sink(flow) -> None:
        print("FLOW " + json.dumps(flow.to_json()), flush=True)

    proxy = DnsProxy(DnsProxyConfig(listen_host="0.0.0.0", listen_port=port, transparent=True,
                                    upstream_mark=MARK_MAGIC_FROM_PROXY),
                     policy_for=policy_for, cache=cache, flow_sink=sink)
    await proxy.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("READY", flush=True)
    await stop.wait()
    await proxy.stop()
    print("CACHE " + json.dumps(cache.snapshot()), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
