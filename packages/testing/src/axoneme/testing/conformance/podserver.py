"""A tiny server run inside every conformance pod: TCP and UDP on the ports
given on the command line. TCP: answer "ok <name>" to every chunk until the peer closes.
UDP: answer each datagram with "ok <name>". Stdlib only (runs in any pod)."""

import selectors
import socket
import sys


def main() -> None:
    name = sys.argv[1]
    ports = [int(p) for p in sys.argv[2:]] or [80, 81]
    sel = selectors.DefaultSelector()
    for port in ports:
        t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        t.bind(("0.0.0.0", port))
        t.listen(128)
        t.setblocking(False)
        sel.register(t, selectors.EVENT_READ, "tcp")
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.bind(("0.0.0.0", port))
        u.setblocking(False)
        sel.register(u, selectors.EVENT_READ, "udp")
    reply = f"ok {name}\n".encode()
    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            if key.data == "udp":
                try:
                    _, addr = sock.recvfrom(2048)
                    sock.sendto(reply, addr)
                except OSError:
                    pass
            elif key.data == "tcp":
                try:
                    conn, _ = sock.accept()
                except OSError:
                    continue
                conn.setblocking(False)
                sel.register(conn, selectors.EVENT_READ, "conn")
            else:
                # answer every chunk and keep the connection until the peer
                # closes it, so tests can hold an established connection
                try:
                    data = sock.recv(2048)
                    if data:
                        sock.sendall(reply)
                        continue
                except BlockingIOError:
                    continue
                except OSError:
                    pass
                sel.unregister(sock)
                sock.close()


if __name__ == "__main__":
    main()
