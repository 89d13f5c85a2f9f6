"""`portscope trace` as a user runs it: a real process, real conflicts in a
private network namespace, its stdout parsed, Ctrl-C to stop."""

from __future__ import annotations

import json
import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.needs import SLOWDOWN, need_root, need_tool

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.kernel

# Runs in its own network namespace: a listener, then a second bind that the
# kernel refuses. Prints its pid and the errno it got.
CONFLICT = """
import os, socket, sys
port = int(sys.argv[1])
a = socket.socket(); a.bind(("0.0.0.0", port)); a.listen()
b = socket.socket(socket.AF_INET6)
b.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    b.bind(("::", port)); err = 0
except OSError as e:
    err = e.errno
print(os.getpid(), err, os.stat(f"/proc/self/ns/net").st_ino, b.fileno() and os.fstat(b.fileno()).st_ino)
"""


class Tracer:
    """A running `portscope trace` whose stdout lines can be awaited."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tracer.cli", "trace", *args],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=0,
        )
        self.stderr_lines: list[str] = []
        self._pending = b""
        self._wait_stderr("tracing with", timeout=10 * SLOWDOWN)

    def _wait_stderr(self, needle: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.stderr_lines.append(line)
            if needle in line:
                return
        self.proc.kill()
        raise AssertionError(f"tracer never said {needle!r}: {''.join(self.stderr_lines)}")

    def lines(self, count: int, timeout: float = 5 * SLOWDOWN) -> list[str]:
        """The next ``count`` stdout lines (fewer if the timeout passes).

        Under emulation a refused bind's line can come seconds late: the
        first explained failure loads the socket iterators.

        Reads the raw pipe: a buffered reader would hide buffered lines
        from select()."""
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while self._pending.count(b"\n") < count and time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.1)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                self._pending += chunk
        *complete, rest = self._pending.split(b"\n")
        taken, keep = complete[:count], complete[count:]
        self._pending = b"\n".join(keep + [rest])
        return [line.decode() + "\n" for line in taken]

    def interrupt(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGINT)
        _, err = self.proc.communicate(timeout=10)
        return self.proc.returncode, "".join(self.stderr_lines) + err


@pytest.fixture(autouse=True)
def _root() -> None:
    need_root()
    need_tool("unshare")


def provoke_conflict(port: int) -> tuple[int, int, int, int]:
    out = subprocess.run(["unshare", "-n", sys.executable, "-c", CONFLICT, str(port)],
                         capture_output=True, text=True, check=True, timeout=30).stdout.split()
    pid, err, netns, inode = map(int, out)
    return pid, err, netns, inode


def test_json_stream_reports_the_failure_with_requested_address():
    port = random.randint(20000, 60000)
    tracer = Tracer("--json", "--port", str(port))
    pid, err, netns, inode = provoke_conflict(port)
    assert err == 98, "the kernel should refuse [::]:port over 0.0.0.0:port"
    lines = tracer.lines(1)
    code, stderr = tracer.interrupt()
    assert len(lines) == 1, f"expected exactly the failure (errors only): {lines} {stderr}"
    event = json.loads(lines[0])
    assert event["call"] == "bind" and event["result"] == "EADDRINUSE" and event["errno"] == 98
    assert (event["pid"], event["netns"], event["inode"]) == (pid, netns, inode)
    assert (event["family"], event["addr_family"], event["addr"], event["port"]) == (
        "ipv6", "ipv6", "::", port)
    assert event["options"] == ["reuseaddr"]
    assert code == 0
    assert "1 events shown, 0 lost" in stderr


def test_all_shows_successes_and_human_lines_are_aligned():
    port = random.randint(20000, 60000)
    tracer = Tracer("--all", "--port", str(port))
    header = tracer.lines(1)
    provoke_conflict(port)
    lines = tracer.lines(3)  # bind ok, listen ok, bind EADDRINUSE
    code, _ = tracer.interrupt()
    assert code == 0
    assert header[0].split()[:3] == ["TIME", "CALL", "RESULT"]
    calls = [(ln.split()[1], ln.split()[2]) for ln in lines]
    assert calls == [("bind", "ok"), ("listen", "ok"), ("bind", "EADDRINUSE")], lines
    assert f"[::]:{port}" in lines[2] and f"0.0.0.0:{port}" in lines[0]
    # Columns line up under the header.
    assert lines[2].index("EADDRINUSE") == header[0].index("RESULT")


def test_count_stops_by_itself():
    port = random.randint(20000, 60000)
    proc = subprocess.Popen([sys.executable, "-m", "tracer.cli", "trace", "--json", "--count", "1",
                             "--port", str(port)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 10 * SLOWDOWN  # the probes load first (a while, emulated)
    while proc.poll() is None and time.monotonic() < deadline:
        provoke_conflict(port)
        time.sleep(0.1)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert len(out.splitlines()) == 1 and json.loads(out)["port"] == port


BURST = """
import socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
a = socket.socket(); a.bind(("127.0.0.1", port)); a.listen()
failed = 0
for _ in range(n):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        failed += 1
    s.close()
print(failed)
"""


def test_interrupt_right_after_a_burst_loses_nothing(tmp_path):
    """Ctrl-C straight after a burst: what is in the ring buffer still gets out."""
    port = random.randint(20000, 60000)
    out_path = tmp_path / "events.jsonl"
    with out_path.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tracer.cli", "trace", "--json",
                                 "--port", str(port)], cwd=REPO, stdout=out,
                                stderr=subprocess.PIPE, text=True)
        assert "tracing with" in proc.stderr.readline()
        failed = int(subprocess.run(["unshare", "-n", sys.executable, "-c", BURST, str(port),
                                     "20000"], capture_output=True, text=True, check=True,
                                    timeout=60).stdout)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert failed == 20000
    events = [json.loads(line) for line in out_path.read_text().splitlines()]
    assert len(events) == failed, err
    assert f"{failed} events shown, 0 lost" in err


HOLD = """
import os, socket, sys, time
port = int(sys.argv[1])
a = socket.socket(); a.bind(("0.0.0.0", port)); a.listen()
b = socket.socket(socket.AF_INET6)
try:
    b.bind(("::", port))
except OSError:
    pass
print(os.getpid(), flush=True)
time.sleep(3)  # keep the namespace and the listener while the tracer looks
"""


def test_each_eaddrinuse_names_its_blocker_on_the_spot():
    port = random.randint(20000, 60000)
    tracer = Tracer("--json", "--port", str(port))
    holder = subprocess.Popen(["unshare", "-n", sys.executable, "-c", HOLD, str(port)],
                              stdout=subprocess.PIPE, text=True)
    try:
        pid = int(holder.stdout.readline())
        lines = tracer.lines(1)
    finally:
        holder.kill()
        holder.wait()
    tracer.interrupt()
    event = json.loads(lines[0])
    assert event["result"] == "EADDRINUSE"
    # The same process holds the listener that refused its own second bind.
    [blocker] = event["blockers"]
    owners = blocker.pop("owners")
    why = blocker.pop("why")
    assert blocker == {"pids": [pid], "comm": event["comm"], "state": "LISTEN",
                       "local": f"0.0.0.0:{port}", "remote": "0.0.0.0:0",
                       "rule": "listener", "held": "owners", "overlap": "dual_stack"}
    assert "listening" in why and "IPV6_V6ONLY" in why  # the rule as a sentence
    # who the holder is, read with the port's inventory
    assert [o["pid"] for o in owners] == [pid]
    assert owners[0]["exe"] == os.path.realpath(sys.executable)
    assert "socket" in owners[0]["cmdline"]
    # ... and the explanation says why, as data: the errno, the rule, the fixes.
    x = event["explanation"]
    assert x["errno"] == "EADDRINUSE" and [r["rule"] for r in x["reasons"]] == ["conflict"]
    assert {f["kind"] for f in x["fixes"]} >= {"stop_holder"}
    assert all(f["params"]["for"] == "conflict" for f in x["fixes"])
