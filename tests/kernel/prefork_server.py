"""A pre-forking HTTP/1.0 server, as many Python and Perl servers are: the
parent opens N SO_REUSEPORT listeners (one group), then forks N children,
each of which inherits all N and accepts, blocking, on its own one only.

    prefork_server.py PORT N DIR

On SIGUSR1 a child writes how many connections it accepted to DIR/PID.count.
"""

from __future__ import annotations

import os
import signal
import socket
import sys


def child(listener: socket.socket, out_dir: str) -> None:
    accepted = 0

    def report(*_: object) -> None:
        path = os.path.join(out_dir, f"{os.getpid()}.count")
        with open(path + ".tmp", "w") as f:
            f.write(f"{accepted}\n")
        os.replace(path + ".tmp", path)

    signal.signal(signal.SIGUSR1, report)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    while True:
        try:
            conn, _ = listener.accept()
        except InterruptedError:
            continue
        accepted += 1
        with conn:
            try:
                conn.settimeout(10)
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
            except OSError:
                pass


def main() -> None:
    port, count, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    listeners = []
    for _ in range(count):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", port))
        s.listen(512)
        listeners.append(s)
    kids = []
    for i in range(count):
        pid = os.fork()
        if pid == 0:
            child(listeners[i], out_dir)
            os._exit(0)
        kids.append(pid)

    def stop(*_: object) -> None:
        for pid in kids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    while True:
        signal.pause()


if __name__ == "__main__":
    main()
