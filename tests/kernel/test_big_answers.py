"""Big answers stay readable: a port with hundreds of TIME_WAIT sockets is
one line of `portscope ports` (REMOTE addr:* xN) unless --all, the first N
lines with --top; `timewait --by remote` groups a server's clients by
address (their ports are all different) and our own connections by the
service they went to. The counts are checked against ss, run in the same
namespace, never against portscope's own JSON.

Presentation, not kernel behaviour: native only (NATIVE_ONLY)."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import Netns

REPO = Path(__file__).resolve().parents[2]
CONNECTIONS = 200  # each way
PORT = 18321  # below the namespace's ephemeral range (32768-60999)


def portscope(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "tracer.cli", *args], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def ss_time_wait(ns: Netns, which: str, port: int = PORT) -> int:
    """TIME_WAIT sockets with ``sport`` or ``dport`` = ``port``, as ss counts them."""
    out = subprocess.run(["ip", "netns", "exec", ns.name, "ss", "-tanH", "state", "time-wait",
                          f"{which} = :{port}"], capture_output=True, text=True, check=True)
    return len(out.stdout.splitlines())


# Two services in one process: on PORT the server closes first (TIME_WAIT
# on the server's side, one per client port); on PORT + 1 the client does
# (TIME_WAIT on the client's side, towards that service).
STORM = """
import socket, sys, threading
port, n = int(sys.argv[1]), int(sys.argv[2])
def serve(srv, first):
    while True:
        c, _ = srv.accept()
        if not first:
            while c.recv(4096):
                pass
        c.close()
for p, first in ((port, True), (port + 1, False)):
    srv = socket.socket()
    srv.bind(("127.0.0.1", p))
    srv.listen(1024)
    threading.Thread(target=serve, args=(srv, first), daemon=True).start()
for p, first in ((port, True), (port + 1, False)):
    for _ in range(n):
        c = socket.create_connection(("127.0.0.1", p))
        if first:
            while c.recv(4096):
                pass
        c.close()
print("ready", flush=True)
sys.stdin.read()
"""


def closing(ns: Netns) -> list[str]:
    out = subprocess.run(["ip", "netns", "exec", ns.name, "ss", "-tanH", "state", "fin-wait-1",
                          "state", "fin-wait-2", "state", "close-wait", "state", "last-ack",
                          "state", "closing"], capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


@pytest.fixture
def storm(netns: Netns):
    proc = subprocess.Popen(["ip", "netns", "exec", netns.name, sys.executable, "-c", STORM,
                             str(PORT), str(CONNECTIONS)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        # The last closes reach TIME_WAIT a moment after the client returns:
        # counted once no connection of the namespace is still closing.
        for _ in range(100):
            if not closing(netns):
                break
            time.sleep(0.05)
        assert not closing(netns)
        yield netns
    finally:
        proc.kill()
        proc.wait()


def time_wait_counts(text: str) -> list[int]:
    """Each TIME_WAIT line's count: xN of a summary, else 1."""
    counts = []
    for line in text.splitlines():
        if " TIME_WAIT " in line:
            m = re.search(r":\* x([\d,]+)", line)
            counts.append(int(m.group(1).replace(",", "")) if m else 1)
    return counts


def test_a_servers_time_wait_is_one_line_unless_all(storm: Netns):
    ns = str(storm.inode)
    server_side = ss_time_wait(storm, "sport")
    assert server_side >= CONNECTIONS * 0.9
    summary = time_wait_counts(portscope("ports", str(PORT), "--netns", ns))
    assert sum(summary) == server_side
    assert len(summary) == (1 if server_side >= 3 else server_side)
    every = time_wait_counts(portscope("ports", str(PORT), "--netns", ns, "--all"))
    assert every == [1] * server_side
    # --top: the first lines, and how many more there are
    top = portscope("ports", "--netns", ns, "--top", "1")
    table = [ln for ln in top.splitlines() if ln.startswith(ns)]
    assert len(table) == 1
    assert re.search(r"\.\.\. [\d,]+ more line\(s\)", top)


def test_timewait_by_remote_groups_clients_by_address_and_our_connections_by_service(
        storm: Netns):
    ns = str(storm.inode)
    server_side = ss_time_wait(storm, "sport", PORT)
    client_side = ss_time_wait(storm, "dport", PORT + 1)
    assert min(server_side, client_side) >= CONNECTIONS * 0.9
    assert ss_time_wait(storm, "dport", PORT) == ss_time_wait(storm, "sport", PORT + 1) == 0
    text = portscope("timewait", "--netns", ns, "--by", "remote")
    groups = {m.group(1): int(m.group(2))
              for m in re.finditer(r"^(\S+)\s+(\d+)\s+\d+-\d+$", text, re.M)}
    # on the server: the clients' ports all differ, their address is the group;
    # on the client: the service it went to
    assert groups == {"127.0.0.1": server_side, f"127.0.0.1:{PORT + 1}": client_side}, text
    by_port = portscope("timewait", "--netns", ns, "--by", "port")
    assert re.search(rf"^{PORT}\s+{server_side}\s", by_port, re.M), by_port
    assert re.search(rf"^ephemeral\s+{client_side}\s", by_port, re.M), by_port
    # --top 1: the biggest group, the rest summed on one line
    top = portscope("timewait", "--netns", ns, "--by", "remote", "--top", "1")
    smaller = min(server_side, client_side)
    assert re.search(rf"^1 more group\(s\)\s+{smaller}\s", top, re.M), top
