"""TIME_WAIT holders and ephemeral-port pressure, against real connections in
a private namespace: who closed first (after that process exited), time left
within the kernel's TIME_WAIT length, and a range filled to the brim making
the next connect() fail as predicted."""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from harness import Actor, Netns

from tracer.engine import EngineConfig
from tracer.loader import open_engine

REPO = Path(__file__).resolve().parents[2]
TCP_TIMEWAIT_LEN_MS = 60_000  # include/net/tcp.h


def timewait(*args: str, env: dict[str, str] | None = None) -> dict:
    result = subprocess.run([sys.executable, "-m", "tracer.cli", "timewait", "--json", *args],
                            cwd=REPO, capture_output=True, text=True, timeout=60,
                            env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture
def collector(root: None):
    """A running collector: its closer map is pinned for other processes."""
    with open_engine(EngineConfig()) as engine:
        yield engine


def test_closer_is_known_after_it_exited(collector, netns: Netns) -> None:
    server, closer = Actor(netns), Actor(netns)
    port = random.randint(20000, 29999)
    lfd = server.socket("tcp")
    server.bind(lfd, "127.0.0.1", port)
    server.listen(lfd, backlog=64)
    conns = []
    for _ in range(20):
        fd = closer.socket("tcp")
        assert closer.connect(fd, "127.0.0.1", port).ok
        conns.append((fd, server.accept(lfd)))
    for fd, _ in conns:
        closer.close(fd)  # the client closes first: its side will hold the TIME_WAIT
    closer_pid = closer.pid
    closer.exit()
    for _, accepted in conns:
        server.close(accepted)  # the server answers with its FIN: TIME_WAIT proper

    doc = timewait("--netns", netns.name, "--by", "process")
    assert doc["time_wait"] == 20 and doc["attributed"] == 20, doc
    assert len(doc["groups"]) == 1 and f"[{closer_pid}]" in doc["groups"][0]["key"]
    group = doc["groups"][0]
    assert 0 < group["min_left_ms"] <= group["max_left_ms"] <= TCP_TIMEWAIT_LEN_MS
    assert sum(b["count"] for b in doc["time_left_histogram"]) == 20

    by_remote = timewait("--netns", netns.name, "--by", "remote")
    assert [g["key"] for g in by_remote["groups"]] == [f"127.0.0.1:{port}"]


def test_without_a_collector_the_closer_is_unknown(netns: Netns, tmp_path: Path) -> None:
    """Other collectors may run on the host (the test session's own tracer):
    an empty pin directory stands for a host where none runs."""
    server, client = Actor(netns), Actor(netns)
    port = random.randint(20000, 29999)
    lfd = server.socket("tcp")
    server.bind(lfd, "127.0.0.1", port)
    server.listen(lfd)
    fd = client.socket("tcp")
    client.connect(fd, "127.0.0.1", port)
    accepted = server.accept(lfd)
    client.close(fd)
    server.close(accepted)
    doc = timewait("--netns", netns.name, "--by", "process",
                   env={"PORTSCOPE_PIN_DIR": str(tmp_path)})
    assert doc["time_wait"] == 1 and doc["attributed"] == 0 and doc["collectors"] == 0
    assert doc["groups"][0]["key"] == "unknown"
    assert any("closer unknown" in n or "is unknown" in n for n in doc["notes"])


def test_full_ephemeral_range_predicts_eaddrnotavail(netns: Netns) -> None:
    netns.sysctl("net/ipv4/ip_local_port_range", "40000 40009")  # ten ports
    server, client = Actor(netns), Actor(netns)
    port = random.randint(20000, 29999)
    lfd = server.socket("tcp")
    server.bind(lfd, "127.0.0.1", port)
    server.listen(lfd, backlog=64)
    for _ in range(9):
        assert client.connect(client.socket("tcp"), "127.0.0.1", port).ok

    almost = timewait("--netns", netns.name)["pressure"]
    assert [(p["destination"], p["in_use"], p["capacity"], p["level"]) for p in almost] == [
        (f"127.0.0.1:{port}", 9, 10, "warning")]

    assert client.connect(client.socket("tcp"), "127.0.0.1", port).ok
    full = timewait("--netns", netns.name)["pressure"]
    assert [(p["in_use"], p["capacity"], p["level"]) for p in full] == [(10, 10, "full")]
    refused = client.connect(client.socket("tcp"), "127.0.0.1", port)
    assert refused.errno == errno.EADDRNOTAVAIL, refused.describe()
