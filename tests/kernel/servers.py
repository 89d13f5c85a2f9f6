"""Real servers for the group tests: nginx, haproxy and a pre-forking Python
server, each started in a private network namespace on loopback with its
configuration written here, and the truth each keeps about itself (nginx's
stub_status, haproxy's per-listener stats, each Python child's own count),
read from outside portscope. The clients are real ones too: ``ab`` and
``wrk``, run inside the namespace.

Installed from Debian packages by scripts/setup (nginx-light, haproxy,
apache2-utils, wrk); a missing one is a need missing (a failure under CI).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import Netns

from tests.needs import SLOWDOWN, missing

from tracer.nsenter import in_netns

HERE = Path(__file__).resolve().parent
START_TIMEOUT = 20.0 * SLOWDOWN


def need(*tools: str) -> None:
    for tool in tools:
        if not shutil.which(tool):
            missing(f"needs {tool} (scripts/setup installs it from Debian's packages)")


def connect_in(ns: Netns, port: int, timeout: float = 10.0) -> socket.socket:
    """A TCP connection to 127.0.0.1:``port`` made inside ``ns``."""
    fd = os.open(ns.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return in_netns(fd, lambda: socket.create_connection(("127.0.0.1", port), timeout))
    finally:
        os.close(fd)


def http_get(ns: Netns, port: int, path: str) -> str:
    """The body of GET ``path`` over HTTP/1.0 (one connection, closed)."""
    with connect_in(ns, port) as sock:
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: test\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.") or b" 200 " not in head.split(b"\r\n")[0]:
        raise AssertionError(f"GET {path} on {port}: {head[:200]!r}")
    return body.decode()


def wait_answering(ns: Netns, port: int, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"server exited ({proc.returncode}): {log.read_text()[-2000:]}")
        try:
            connect_in(ns, port, timeout=1.0).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError(f"server did not answer on {port}: "
                                     f"{log.read_text()[-2000:]}") from None
            time.sleep(0.05)


def children(pid: int) -> list[int]:
    """The child processes of ``pid``, ascending."""
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return sorted(int(p) for p in text.split())


def established_by_pid(ns: Netns, port: int) -> dict[int, int]:
    """Connections to local ``port`` that each process holds (``ss -tnp``)."""
    out = subprocess.run(["ip", "netns", "exec", ns.name, "ss", "-tnpH", "state", "established",
                          f"( sport = :{port} )"], capture_output=True, text=True, timeout=30,
                         check=True).stdout
    held: dict[int, int] = {}
    for line in out.splitlines():
        for pid in {int(p) for p in re.findall(r"pid=(\d+)", line)}:
            held[pid] = held.get(pid, 0) + 1
    return held


class Server:
    """A server process in ``ns`` with its files in a directory of its own."""

    def __init__(self, ns: Netns, name: str) -> None:
        self.ns = ns
        self.dir = Path(tempfile.mkdtemp(prefix=f"portscope-{name}-"))
        self.log = self.dir / "log"
        self.proc: subprocess.Popen | None = None

    def start(self, *cmd: str, port: int) -> None:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(["ip", "netns", "exec", self.ns.name, *cmd],
                                         stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        wait_answering(self.ns, port, self.proc, self.log)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid  # ip netns exec execs the server: the same process

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGCONT)
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=10 * SLOWDOWN)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):  # type: ignore[no-untyped-def]
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Nginx(Server):
    """nginx with ``workers`` worker processes and ``listen ... reuseport``
    (one socket per worker, each inherited by all), stub_status on
    ``status_port`` (a listener of its own, outside the group), keep-alive
    connections never closed by the server during a test."""

    def __init__(self, ns: Netns, port: int, status_port: int, workers: int = 4,
                 backlog: int = 511) -> None:
        need("nginx")
        super().__init__(ns, "nginx")
        self.port, self.status_port = port, status_port
        d = self.dir
        temp = " ".join(f"{k}_temp_path {d}/{k};" for k in
                        ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (d / "nginx.conf").write_text(f"""
worker_processes {workers};
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  {temp}
  keepalive_requests 100000000;
  keepalive_timeout 300s;
  server {{ listen 127.0.0.1:{port} reuseport backlog={backlog};
           location / {{ return 200 "ok\\n"; }} }}
  server {{ listen 127.0.0.1:{status_port}; location = /status {{ stub_status; }} }}
}}
""")
        self.start("nginx", "-c", str(d / "nginx.conf"), "-e", str(d / "error.log"),
                   port=status_port)
        deadline = time.monotonic() + START_TIMEOUT
        while len(self.workers()) < workers and time.monotonic() < deadline:
            time.sleep(0.05)

    def workers(self) -> list[int]:
        return children(self.pid)

    def accepts(self) -> int:
        """stub_status's accepts: every connection nginx accepted, on every
        listener (the status request itself included)."""
        body = http_get(self.ns, self.status_port, "/status")
        return int(body.splitlines()[2].split()[0])


class HAProxy(Server):
    """haproxy with ``threads`` threads and one ``bind`` per thread on the
    same address (SO_REUSEPORT: one group), per-listener stats on a CLI socket."""

    def __init__(self, ns: Netns, port: int, threads: int = 4) -> None:
        need("haproxy")
        super().__init__(ns, "haproxy")
        self.port = port
        binds = "\n".join(f"  bind 127.0.0.1:{port} name b{i} thread {i}"
                          for i in range(1, threads + 1))
        (self.dir / "haproxy.cfg").write_text(f"""
global
  nbthread {threads}
  stats socket {self.dir}/stats.sock mode 600 level admin
defaults
  mode http
  timeout connect 5s
  timeout client 300s
  timeout server 300s
frontend fe
  option socket-stats
{binds}
  http-request return status 200 content-type text/plain string ok
""")
        self.start("haproxy", "-f", str(self.dir / "haproxy.cfg"), "-db", port=port)

    def command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(self.dir / "stats.sock"))
            s.sendall(line.encode() + b"\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return data.decode()

    def sessions_by_listener(self) -> dict[str, int]:
        """``stot`` (sessions accepted) of each bind line, by its name."""
        lines = self.command("show stat").splitlines()
        head = lines[0].lstrip("# ").split(",")
        stot = head.index("stot")
        out = {}
        for line in lines[1:]:
            cells = line.split(",")
            if len(cells) > stot and cells[0] == "fe" and cells[1].startswith("b"):
                out[cells[1]] = int(cells[stot] or 0)
        return out

    def threads(self) -> list[int]:
        return sorted(int(t) for t in os.listdir(f"/proc/{self.pid}/task"))


class PreforkServer(Server):
    """tests/kernel/prefork_server.py: the parent listens on ``children``
    SO_REUSEPORT sockets, then forks; child i accepts (blocking) on socket i
    only and answers HTTP/1.0; each child writes its count when told to stop."""

    def __init__(self, ns: Netns, port: int, count: int = 3) -> None:
        super().__init__(ns, "prefork")
        self.port, self.count = port, count
        self.start(sys.executable, str(HERE / "prefork_server.py"), str(port), str(count),
                   str(self.dir), port=port)
        deadline = time.monotonic() + START_TIMEOUT
        while len(self.children()) < count and time.monotonic() < deadline:
            time.sleep(0.05)

    def children(self) -> list[int]:
        return children(self.pid)

    def served(self) -> dict[int, int]:
        """Connections each child accepted, by pid (asks them with SIGUSR1)."""
        kids = self.children()
        for pid in kids:
            (self.dir / f"{pid}.count").unlink(missing_ok=True)
            os.kill(pid, signal.SIGUSR1)
        deadline = time.monotonic() + START_TIMEOUT
        out: dict[int, int] = {}
        while len(out) < len(kids) and time.monotonic() < deadline:
            for pid in kids:
                f = self.dir / f"{pid}.count"
                if pid not in out and f.exists() and f.read_text().endswith("\n"):
                    out[pid] = int(f.read_text())
            time.sleep(0.02)
        return out


def run_client(ns: Netns, *cmd: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    """A load generator (ab, wrk) run to its end inside ``ns``."""
    need(cmd[0])
    return subprocess.run(["ip", "netns", "exec", ns.name, *cmd], capture_output=True,
                          text=True, timeout=timeout * SLOWDOWN)


def start_client(ns: Netns, *cmd: str) -> subprocess.Popen:
    need(cmd[0])
    return subprocess.Popen(["ip", "netns", "exec", ns.name, *cmd], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
