"""SIGINT, SIGTERM and SIGHUP stop every long-running command the same way:
at a safe point, with every probe detached, the pinned map removed, the
journal's session closed, the terminal given back; exit status 0.

SIGHUP is what an ssh session that drops sends; SIGTERM what systemd and
the kubelet send. Before, the UI died by either with the terminal left in
the alternate screen with mouse reporting on, and trace, record and export
died on SIGHUP without cleaning up.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from terminal import START_S, Terminal
from test_export import free_port

from tracer.closers import PIN_DIR

ROOT = Path(__file__).resolve().parents[2]
PORTSCOPE = [sys.executable, "-m", "tracer.cli"]
SIGNALS = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]


def started(argv: list[str], ready: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([*PORTSCOPE, *argv], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    line = proc.stderr.readline()
    assert ready in line, line
    return proc


def stopped_cleanly(proc: subprocess.Popen[str], sig: int) -> str:
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"still running 30 s after {signal.Signals(sig).name}")
    assert proc.returncode == 0, (signal.Signals(sig).name, proc.returncode, err)
    assert "Traceback" not in err, err
    assert not os.path.exists(f"{PIN_DIR}/closers-{proc.pid}"), "the pinned map was left behind"
    return err


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_trace(root: None, sig: int) -> None:
    err = stopped_cleanly(started(["trace"], "tracing with"), sig)
    assert "events shown" in err  # the closing count: it stopped, it was not killed


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_record(root: None, sig: int, tmp_path: Path) -> None:
    journal = tmp_path / "j.db"
    err = stopped_cleanly(started(["record", "-o", str(journal)], "recording to"), sig)
    assert "events recorded" in err
    with sqlite3.connect(f"file:{journal}?mode=ro", uri=True) as conn:
        ended = conn.execute("SELECT ended FROM sessions").fetchall()
    assert ended and all(e[0] is not None for e in ended), "the session was not closed"


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_export(root: None, sig: int) -> None:
    proc = started(["export", "--listen", f"127.0.0.1:{free_port()}", "--no-groups"],
                   "tracing with")
    stopped_cleanly(proc, sig)


@pytest.mark.parametrize("argv,ready", [
    (["groups", "--watch"], "counting with"),
    (["timewait", "--watch", "--interval", "0.2"], None),
], ids=["groups", "timewait"])
def test_watching_commands(root: None, argv: list[str], ready: str | None) -> None:
    for sig in (signal.SIGTERM, signal.SIGHUP):
        proc = subprocess.Popen([*PORTSCOPE, *argv], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        assert proc.stdout and proc.stderr
        if ready:
            assert ready in proc.stderr.readline()
        else:
            proc.stdout.readline()  # the first refresh is on screen
        stopped_cleanly(proc, sig)


def _ui_pid(term: Terminal) -> int:
    shell = term.state("pane_pid")
    out = subprocess.run(["pgrep", "-P", shell], capture_output=True, text=True).stdout.split()
    assert len(out) == 1, out
    return int(out[0])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=lambda s: signal.Signals(s).name)
def test_the_ui_gives_the_terminal_back(root: None, sig: int) -> None:
    term = Terminal(f"{sys.executable} -m tracer.cli ui; echo portscope exited $?; sleep 30")
    try:
        term.wait_for(lambda s: "live · " in s, START_S)
        assert term.state("alternate_on") == "1"  # the oracle: the UI is in the alternate screen
        pid = _ui_pid(term)
        os.kill(pid, sig)
        term.wait_for(lambda s: "portscope exited 0" in s, 30)
        assert term.state("alternate_on") == "0", "left in the alternate screen"
        assert term.state("mouse_any_flag") == "0", "mouse reporting left on"
        deadline = time.monotonic() + 5
        while os.path.exists(f"{PIN_DIR}/closers-{pid}") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not os.path.exists(f"{PIN_DIR}/closers-{pid}"), "the pinned map was left behind"
    finally:
        term.close()


@pytest.mark.parametrize("command", ["ui", "replay tests/data/journal.db --speed 100"],
                         ids=["ui", "replay"])
def test_a_terminal_that_goes_away_while_the_ui_quits_leaves_nothing_behind(
        root: None, command: str) -> None:
    """q, and the terminal closes while the UI is leaving it (an ssh session
    dropped as one quits). It used to leave the process running for ever,
    probes attached (Textual's writer died on the closed terminal and its
    shutdown waited for it), or end it half-way through its clean-up (a
    SIGCONT from the kernel woke Textual's handler after the app had ended).
    Each round: the process ends, and the live UI's pinned map goes with it."""
    from tracer.runtime import GIVE_UP_S

    for delay in (0.1, 0.2, 0.3):
        term = Terminal(f"{sys.executable} -m tracer.cli {command}; sleep 30")
        try:
            term.wait_for(lambda s: "portscope" in s, START_S)
            pid = _ui_pid(term)
            term.keys("q")
            time.sleep(delay)
        finally:
            term.hang_up()
        deadline = time.monotonic() + 3 * GIVE_UP_S + 5  # runtime._Ending: at most 2 x, then 2 x
        while not _ended(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _ended(pid), f"left running (after q, {delay} s): {_stat(pid)}"
        assert not os.path.exists(f"{PIN_DIR}/closers-{pid}"), "the pinned map was left behind"


def _stat(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "gone"


def _ended(pid: int) -> bool:
    """Whether the process has exited. Its shell died with the terminal, so
    it was re-parented: to PID 1, or to this test process once an actor has
    made it a child subreaper (harness._become_subreaper), and then it waits
    here as a zombie until reaped."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass  # not ours: PID 1 reaps it
    stat = _stat(pid)
    return stat == "gone" or stat.rsplit(")", 1)[1].split()[0] == "Z"
