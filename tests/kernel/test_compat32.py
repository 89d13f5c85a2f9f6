"""32-bit callers: bind(), listen() and connect() made by a 32-bit program
(tests/kernel/compat32.c, built with gcc -m32), through their own system
calls and through socketcall(2), against what the probe plan in use says it
sees (Engine.compat_callers).

Under the fentry plan they reach __sys_bind and the others like 64-bit calls;
under the kprobe plan the compat entry points are probed; under the
tracepoint plan the system-call tracepoints do not fire for them, and the
test proves that this is still so (if a kernel starts firing them, the
claim portscope makes, in doctor, trace and the README, must change)."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
from harness import MUST_HAPPEN_S, EventCollector, Netns

from tests.needs import missing, need_tool
from tracer.records import CallEvent

pytestmark = pytest.mark.kernel

SOURCE = Path(__file__).with_name("compat32.c")
PORT = 23000  # inside the test's own namespace: nothing else binds there


@dataclass(frozen=True)
class Call:
    """One call as the program saw it."""

    call: str
    route: str  # direct | socketcall
    inode: int
    errno: int
    port: int


@pytest.fixture(scope="module")
def compat32() -> Iterator[str]:
    need_tool("gcc")
    if not os.path.exists("/proc/sys/abi/vsyscall32"):
        missing("this kernel runs no 32-bit programs (no IA32 emulation)")
    with tempfile.TemporaryDirectory(prefix="portscope-compat32-") as tmp:
        exe = os.path.join(tmp, "compat32")
        built = subprocess.run(["gcc", "-m32", "-O1", "-Wall", "-o", exe, str(SOURCE)],
                               capture_output=True, text=True)
        if built.returncode:
            missing(f"gcc -m32 cannot build a 32-bit program (package gcc-multilib): "
                    f"{built.stderr.strip()[-300:]}")
        yield exe


def run_program(exe: str, netns: Netns) -> tuple[subprocess.Popen[str], list[Call]]:
    proc = subprocess.Popen(["ip", "netns", "exec", netns.name, exe, str(PORT)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    calls = []
    for _ in range(14):  # 2 for the holder, 6 per route
        what, route, inode, err, port = proc.stdout.readline().split()
        calls.append(Call(what, route, int(inode), int(err), int(port)))
    return proc, calls


def event_of(call: Call, events: list[CallEvent]) -> CallEvent | None:
    return next((e for e in events if e.inode == call.inode and e.call == call.call), None)


def test_32bit_calls_are_traced_where_the_plan_says(tracer: EventCollector, netns: Netns,
                                                      compat32: str) -> None:
    tracer.follow(netns.inode)
    proc, calls = run_program(compat32, netns)
    try:
        failed = [c for c in calls if c.errno]
        # What the program met is what the kernel does (the ground truth).
        assert [(c.call, c.route, c.errno) for c in failed] == [
            ("bind", "direct", 98), ("listen", "direct", 98), ("connect", "direct", 111),
            ("bind", "socketcall", 98), ("listen", "socketcall", 98),
            ("connect", "socketcall", 111)]
        seen = tracer.engine.compat_callers
        if seen == "yes":
            events = tracer.collect(lambda evs: all(event_of(c, evs) for c in failed), MUST_HAPPEN_S)
            for c in failed:
                e = event_of(c, events)
                assert e is not None, f"no event for the 32-bit {c.call} ({c.route})"
                assert (e.pid, e.comm, e.errno, e.family, e.protocol) == (
                    proc.pid, "compat32", c.errno, "ipv4", "tcp"), (c, e)
                if c.call == "listen":
                    assert (e.port, e.bound_port) == (c.port, c.port), (c, e)
                else:
                    assert (e.addr_family, e.addr, e.port) == ("ipv4", "127.0.0.1", c.port), (c, e)
                if c.errno == 98:
                    # The blocker capture works for them too: the holder of the port.
                    assert e.capture is not None and e.capture.sockets, (c, e)
        else:
            assert seen.startswith("no: "), seen
            # Give them every chance to arrive, then prove none did.
            time.sleep(min(MUST_HAPPEN_S, 2.0))
            events = tracer.collect(lambda evs: False, 1.0)
            assert [event_of(c, events) for c in failed] == [None] * len(failed), (
                f"the plan says 32-bit calls are not seen ({seen}), but they were")
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=30)
