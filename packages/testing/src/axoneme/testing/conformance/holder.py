"""Hold one TCP connection from inside a pod: connect and exchange once
(prints "first ok|fail"), then wait until the control file exists and
exchange again on the SAME connection (prints "second ok|fail")."""

import os
import socket
import sys
import time


def exchange(s: socket.socket) -> str:
    try:
        s.sendall(b"ping\n")
        return "ok" if s.recv(64).startswith(b"ok") else "fail"
    except OSError:
        return "fail"


def main() -> None:
    ip, port, ctl = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    try:
        s = socket.create_connection((ip, port), timeout=2)
    except OSError:
        print("first fail", flush=True)
        return
    s.settimeout(2)
    print("first", exchange(s), flush=True)
    deadline = time.monotonic() + 120
    while not os.path.exists(ctl) and time.monotonic() < deadline:
        time.sleep(0.05)
    print("second", exchange(s), flush=True)
    s.close()


if __name__ == "__main__":
    main()
