"""The bcc engine (`--engine bcc`): the same probe source, compiled at run time
against the running kernel's headers.

Two kinds of tests:

* everywhere: what a user sees when bcc cannot run (no headers, no bcc
  module, a plan bcc does not have, not root), provoked for real;
* marked ``bcc``: the engine at work. They need a kernel whose headers are
  installed, so they run in the kernel matrix's bcc cell (scripts/kernel-matrix
  boots Debian's kernel with its headers and sets PORTSCOPE_ENGINE=bcc), and
  are deselected elsewhere (conftest.py). The kernel is the oracle twice
  over: events are compared with what the calls really did (the rest of the
  suite runs under bcc in that cell), and with what the libbpf engine's CO-RE
  build reports for the very same calls, field by field.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import Actor, Netns, expect_outcome, pick_port
from test_error_paths import assert_one_sentence, portscope

from tests.needs import missing, need_root, need_tool
from tracer.errors import ExitStatus

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.kernel



@pytest.fixture(autouse=True)
def _root() -> None:
    need_root()


# ---- when bcc cannot run: one sentence each ----------------------------------


def test_no_kernel_headers() -> None:
    """/lib/modules hidden behind an empty tmpfs, in a private mount
    namespace: the headers are really not there for this process."""
    unshare = need_tool("unshare")
    if Path("/sys/kernel/kheaders.tar.xz").exists():
        missing("this kernel carries its headers (CONFIG_IKHEADERS): cannot hide them")
    script = ("mount -t tmpfs none /lib/modules && "
              f"exec {sys.executable} -m tracer.cli trace --engine bcc --plan tracepoint "
              "--duration 1")
    result = subprocess.run([unshare, "-m", "--propagation", "private", "sh", "-c", script],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert_one_sentence(result, ExitStatus.UNSUPPORTED, "none are installed for")
    assert f"linux-headers-{os.uname().release}" in result.stderr


def test_no_bcc_module() -> None:
    """A Python that cannot import bcc (the module blocked in sys.modules)."""
    code = ("import sys; sys.modules['bcc'] = None; from tracer.cli import main; "
            "sys.exit(main(['trace', '--engine', 'bcc', '--plan', 'tracepoint', "
            "'--duration', '1']))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert_one_sentence(result, ExitStatus.UNSUPPORTED, "install python3-bpfcc")


def test_no_fentry_plan() -> None:
    result = portscope("trace", "--engine", "bcc", "--plan", "fentry", "--duration", "1")
    assert_one_sentence(result, ExitStatus.UNSUPPORTED, "no fentry plan")


def test_engine_variable_checked() -> None:
    result = portscope("trace", "--duration", "1", env={"PORTSCOPE_ENGINE": "llvm"})
    assert_one_sentence(result, ExitStatus.USAGE, "is not an engine")


def test_doctor_reports_bcc() -> None:
    """doctor says whether bcc could run, and why not, in both forms."""
    from tracer.bcc_engine import headers_dir

    result = portscope("doctor", "--json", timeout=300)
    report = json.loads(result.stdout)["bcc"]
    has_headers = headers_dir(os.uname().release) is not None
    assert (report["problem"] is None) == has_headers, report
    human = portscope("doctor", timeout=300).stdout
    assert "bcc engine: " + ("available" if has_headers else "not available") in human


# ---- the engine at work (kernels with headers: the matrix's bcc cell) ------------


def _engines(**config: object):
    """A bcc engine and a libbpf engine with the same plan and filters."""
    from tracer.engine import EngineConfig
    from tracer.loader import open_engine

    bcc = open_engine(EngineConfig(engine="bcc", **config))  # type: ignore[arg-type]
    try:
        core = open_engine(EngineConfig(engine="libbpf", plan=bcc.plan, **config))  # type: ignore[arg-type]
    except BaseException:
        bcc.close()
        raise
    return bcc, core


def _events(engine, netns: int, count: int, timeout: float = 10.0) -> list[dict]:
    from dataclasses import asdict

    from tracer.events import Clock, decode

    clock, out = Clock(), []
    deadline = time.monotonic() + timeout
    while len(out) < count and time.monotonic() < deadline:
        for raw in engine.poll(100):
            event = decode(raw, clock)
            if event.netns == netns:
                row = asdict(event)
                row.pop("time")
                out.append(row)
    return out


@pytest.mark.bcc
def test_same_events_as_libbpf(netns: Netns) -> None:
    """Both builds attached at once see the same calls: every field of
    every event must agree (only the timestamp differs)."""
    bcc, core = _engines(errors_only=False)
    try:
        assert bcc.engine == "bcc" and core.engine == "libbpf"
        a, b = Actor(netns), Actor(netns, uid=1234)
        port = pick_port()
        holder = a.socket("tcp", reuseaddr=True)
        v6 = a.socket("tcp", "ipv6", v6only=True, reuseport=True)
        truths = [
            a.bind(holder, "127.0.0.1", port),
            a.listen(holder),
            b.bind(b.socket("tcp", reuseaddr=True, reuseport=True), "127.0.0.1", port),
            a.bind(v6, "::1", port),
            a.bind(a.socket("udp", freebind=True), "127.0.0.2", port),
            a.bind(a.socket("tcp", bind_address_no_port=True), "127.0.0.1", 0),
            # Nothing listens there: the namespace is new, and the port is
            # never the holder's (two draws of pick_port() once were).
            a.connect(a.socket("tcp"), "127.0.0.1", port + 10000),
        ]
        expect_outcome(truths[2], errno.EADDRINUSE)
        expect_outcome(truths[6], errno.ECONNREFUSED)
        got_bcc = _events(bcc, netns.inode, len(truths))
        got_core = _events(core, netns.inode, len(truths))
    finally:
        bcc.close()
        core.close()
    assert len(got_core) == len(truths), got_core
    key = lambda e: (e["tid"], e["inode"], e["call"])  # noqa: E731
    assert sorted(got_bcc, key=key) == sorted(got_core, key=key)
    assert {e["plan"] for e in got_bcc} == {bcc.plan.value}


@pytest.mark.bcc
def test_trace_command_with_bcc(netns: Netns) -> None:
    """`portscope trace --engine bcc --json`, end to end: the banner says
    so, and a conflict provoked afterwards arrives as a JSON line."""
    port = pick_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tracer.cli", "trace", "--engine", "bcc", "--json",
         "--port", str(port)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        banner = proc.stderr.readline()  # printed once the probes are attached
        assert "compiled here by bcc" in banner, banner
        a = Actor(netns)
        a.bind(a.socket("tcp"), "127.0.0.1", port)
        failed = a.bind(a.socket("tcp"), "127.0.0.1", port)
        expect_outcome(failed, errno.EADDRINUSE)
        line = proc.stdout.readline()
    finally:
        proc.terminate()
        proc.wait(30)
    event = json.loads(line)
    assert (event["pid"], event["port"]) == (failed.pid, port), event
    assert event["errno"] in (errno.EADDRINUSE, "EADDRINUSE"), event
