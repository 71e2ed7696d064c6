"""Run inside a source pod: probe many targets concurrently with short
timeouts and print a JSON list of booleans (reachable or not).

argv[1]: JSON list of [ip, port, proto] (proto tcp|udp|icmp; for icmp the
port is the ICMP echo type and is ignored: a ping is sent). Stdlib only."""

import concurrent.futures
import json
import socket
import subprocess
import sys

TIMEOUT = 1.0


def tcp(ip: str, port: int) -> bool:
    try:
        with socket.create_connection((ip, port), timeout=TIMEOUT) as s:
            s.settimeout(TIMEOUT)
            s.sendall(b"probe\n")
            return s.recv(64).startswith(b"ok")
    except OSError:
        return False


def udp(ip: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(TIMEOUT / 2)
        for _ in range(2):  # one retry: UDP may lose the first datagram to ARP
            try:
                s.sendto(b"probe", (ip, port))
                return s.recv(64).startswith(b"ok")
            except OSError:
                continue
    return False


def icmp(ip: str) -> bool:
    r = subprocess.run(["ping", "-c", "1", "-W", "1", ip], capture_output=True)
    return r.returncode == 0


def probe(target: list) -> bool:
    ip, port, proto = target
    if proto == "tcp":
        return tcp(ip, int(port))
    if proto == "udp":
        return udp(ip, int(port))
    return icmp(ip)


def main() -> None:
    targets = json.loads(sys.argv[1])
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(64, max(1, len(targets)))) as ex:
        print(json.dumps(list(ex.map(probe, targets))))


if __name__ == "__main__":
    main()
