"""Who a process is, beyond comm[pid], on the command line: `why -v` and
`ports -v` put each holder's command line and executable under it; `trace`
shows the caller's systemd unit on its line, and with -v its command line.
Real processes in a private namespace, in a cgroup named like a unit; what
is expected is read from /proc here, not from portscope.

Presentation, not kernel behaviour: native only (NATIVE_ONLY)."""

from __future__ import annotations

import os
import random
import secrets
from pathlib import Path

import pytest
from harness import Actor, Netns
from test_filters import portscope
from test_trace_cli import Tracer

from tests.needs import missing
from tracer.cgroups import cgroup2_root


def command_line(pid: int) -> str:
    """The command line, and the executable when the command line does not
    start with it (what -v is to show), read from /proc here."""
    args = " ".join(a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                    if a)
    exe = os.readlink(f"/proc/{pid}/exe")
    return args if args.startswith(exe) else f"{args}  (exe {exe})"


@pytest.fixture
def unit(root: None):
    """A cgroup named like a systemd unit; removed after the test."""
    base = cgroup2_root()
    if not base or not os.access(base, os.W_OK):
        missing("needs a writable cgroup2 hierarchy (to put a process in a systemd unit)")
    path = Path(base) / f"psv-{secrets.token_hex(3)}.service"
    path.mkdir()
    try:
        yield path
    finally:
        try:
            path.rmdir()
        except OSError:
            pass


def in_unit(actor: Actor, unit: Path) -> None:
    (unit / "cgroup.procs").write_text(str(actor.pid))


def test_why_and_ports_v_show_each_holders_command_line(netns: Netns, unit: Path):
    holder = Actor(netns, comm=b"psv-holder")
    in_unit(holder, unit)
    port = random.randint(20000, 29000)
    fd = holder.socket("tcp")
    assert holder.bind(fd, "127.0.0.1", port).ok
    holder.listen(fd)
    cmdline = command_line(holder.pid)
    want = f"psv-holder[{holder.pid}]: {cmdline}"

    why = portscope("why", str(port), "--addr", "127.0.0.1", "--netns", str(netns.inode), "-v")
    assert why.returncode == 5, why.stderr  # a conflict (see Exit status)
    assert want in why.stdout, why.stdout
    assert f"held by psv-holder[{holder.pid}] ({unit.name})" in why.stdout
    assert want not in portscope("why", str(port), "--addr", "127.0.0.1",
                                 "--netns", str(netns.inode)).stdout  # only with -v

    ports = portscope("ports", str(port), "--netns", str(netns.inode), "-v")
    assert ports.returncode == 0, ports.stderr
    rows = ports.stdout.splitlines()
    at = next(i for i, ln in enumerate(rows) if f"psv-holder[{holder.pid}] ({unit.name})" in ln)
    assert rows[at + 1].strip() == want


def test_trace_shows_the_callers_unit_and_with_v_its_command_line(netns: Netns, unit: Path):
    port = random.randint(30000, 32000)
    holder, caller = Actor(netns), Actor(netns, comm=b"psv-caller")
    in_unit(caller, unit)
    fd = holder.socket("tcp")
    assert holder.bind(fd, "0.0.0.0", port).ok
    holder.listen(fd)
    tracer = Tracer("--port", str(port), "-v", "--no-explain")
    try:
        assert caller.bind(caller.socket("tcp"), "0.0.0.0", port).errno == 98
        lines = tracer.lines(3)  # the header, the event, its caller
    finally:
        tracer.interrupt()
    lines = [ln.rstrip("\n") for ln in lines]
    event = next(ln for ln in lines if "EADDRINUSE" in ln)
    assert f" {caller.pid} " in event and "psv-caller" in event
    assert event.endswith(f"unit={unit.name}"), event
    assert lines[lines.index(event) + 1] == f"    caller: {command_line(caller.pid)}"
