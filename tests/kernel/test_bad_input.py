"""Damaged input and absurd arguments, provoked for real: one sentence on
stderr and the documented exit status, never a traceback, never a silent
misbehaviour, and nothing left behind (no empty journal, no stale pin
counted as a collector, no side files beside a journal that was only read).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from harness import Actor, Netns

from tests.needs import need_tool
from tracer.closers import PIN_DIR
from tracer.errors import ExitStatus

ROOT = Path(__file__).resolve().parents[2]
PORTSCOPE = [sys.executable, "-m", "tracer.cli"]


def portscope(*args: str, timeout: float = 60, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PORTSCOPE, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, **kw)  # type: ignore[call-overload]


STATUS_LINES = ("portscope: tracing with", "portscope: recording to", "portscope: counting with",
                "portscope: 32-bit programs' calls are not seen",
                "portscope: 0 events")


def one_sentence(result: subprocess.CompletedProcess[str], status: int, words: str) -> str:
    """The error as one sentence (after the status lines a command prints
    while it runs: the plan it started with, its closing count)."""
    assert result.returncode == status, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    lines = [ln for ln in result.stderr.splitlines()
             if ln.strip() and not ln.startswith(STATUS_LINES)]
    assert len(lines) == 1 and lines[0].startswith("portscope: "), result.stderr
    assert words in lines[0], lines[0]
    return lines[0]


def capless(*argv: str) -> subprocess.CompletedProcess[str]:
    """uid 0 with every capability dropped: not permitted, like any user."""
    setpriv = need_tool("setpriv")
    return subprocess.run([setpriv, "--bounding-set=-all", "--inh-caps=-all",
                           "--securebits=+noroot,+noroot_locked", *PORTSCOPE, *argv],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


# ---- --netns that names no network namespace -------------------------------------------


@pytest.fixture(scope="module")
def fifo(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("fifo") / "fifo")
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("command", [["ports"], ["why", "80"], ["timewait"],
                                     ["groups", "--interval", "0.2"]], ids=lambda c: c[0])
@pytest.mark.parametrize("spec,words", [
    ("/etc/passwd", "is not a network namespace"),
    ("/proc/self/ns/mnt", "is not a network namespace"),
    ("/tmp", "is not a network namespace"),
    ("fifo", "is not a network namespace"),
    ("pid:999999999", "does not exist"),
    ("no-such-name", "does not exist"),
    ("", "invalid --netns ''"),
])
def test_netns_that_is_not_one(root: None, fifo: str, command: list[str], spec: str,
                               words: str) -> None:
    spec = fifo if spec == "fifo" else spec
    result = portscope(*command, "--netns", spec, timeout=30)  # a FIFO must not block it
    one_sentence(result, ExitStatus.USAGE, words)


# ---- values the kernel cannot take -----------------------------------------------------


@pytest.mark.parametrize("argv,words", [
    (["trace", "--ring-size", "4G"], "invalid ring buffer size '4G'"),
    (["trace", "--pid", "4294967296"], "invalid pid '4294967296'"),
    (["trace", "--pid", "4294967297"], "invalid pid '4294967297'"),
    (["report", "x.db", "--since", "inf"], "invalid time 'inf'"),
    (["report", "x.db", "--since", "1e20"], "invalid time '1e20'"),
    (["replay", "x.db", "--from", "inf"], "invalid time 'inf'"),
    (["timewait", "--watch", "--interval", "inf"], "invalid interval 'inf'"),
    (["export", "--interval", "inf"], "invalid interval 'inf'"),
    (["record", "--snapshot-interval", "inf"], "invalid interval 'inf'"),
    (["why", "80", "--addr", ""], "invalid address ''"),
    (["why", "80", "--netns", ""], "invalid --netns ''"),
])
def test_absurd_values_are_refused(root: None, argv: list[str], words: str) -> None:
    one_sentence(portscope(*argv), ExitStatus.USAGE, words)


def test_a_refused_record_leaves_no_journal(root: None, tmp_path: Path) -> None:
    journal = tmp_path / "j.db"
    one_sentence(portscope("record", "-o", str(journal), "--ring-size", "4G"), ExitStatus.USAGE,
                 "ring buffer size")
    assert not journal.exists()


def test_record_without_privileges_creates_no_journal(root: None, tmp_path: Path) -> None:
    journal = tmp_path / "out" / "j.db"
    one_sentence(capless("record", "-o", str(journal)), ExitStatus.NO_PERMISSION, "needs root")
    assert not journal.exists() and not journal.parent.exists()


def test_btf_fifo_is_refused_without_blocking(root: None, fifo: str) -> None:
    one_sentence(portscope("trace", "--btf", fifo, "--duration", "1", timeout=20),
                 ExitStatus.UNSUPPORTED, "is not a regular file")


def test_doctor_refuses_a_bad_plan_variable(root: None) -> None:
    result = portscope("doctor", env={**os.environ, "PORTSCOPE_PLAN": "bogus"})
    one_sentence(result, ExitStatus.USAGE, "PORTSCOPE_PLAN='bogus' is not a probe plan")


def test_not_permitted_names_no_probe_question_mark(root: None) -> None:
    """ports without privileges: the sentence says what was refused."""
    for argv in (["ports", "22"], ["why", "22"]):
        result = capless(*argv)
        assert result.returncode == ExitStatus.NO_PERMISSION, result.stderr
        assert "probe ?" not in result.stderr and "Traceback" not in result.stderr
        one_sentence(result, ExitStatus.NO_PERMISSION, "")


# ---- write errors ----------------------------------------------------------------------


def test_trace_to_a_full_disk(root: None) -> None:
    one_sentence(portscope("trace", "-o", "/dev/full", "--duration", "1"), ExitStatus.ERROR,
                 "cannot write to /dev/full: No space left on device")


def test_trace_stdout_to_a_full_disk(root: None) -> None:
    with open("/dev/full", "w") as full:
        result = subprocess.run([*PORTSCOPE, "trace", "--duration", "1"], cwd=ROOT, stdout=full,
                                stderr=subprocess.PIPE, text=True, timeout=60)
    assert result.returncode == ExitStatus.ERROR, result.stderr
    assert "No space left on device" in result.stderr and "Traceback" not in result.stderr


def test_record_jsonl_to_a_full_disk_keeps_the_journal(root: None, netns: Netns,
                                                       tmp_path: Path) -> None:
    journal = tmp_path / "j.db"
    rec = subprocess.Popen([*PORTSCOPE, "record", "-o", str(journal), "--jsonl", "/dev/full"],
                           cwd=ROOT, stderr=subprocess.PIPE, text=True)
    assert rec.stderr and "recording to" in rec.stderr.readline()
    actor = Actor(netns)
    fd = actor.socket("tcp")
    actor.bind(fd, "127.0.0.1", 20999)
    actor.listen(fd)
    time.sleep(1.5)
    rec.send_signal(signal.SIGTERM)
    _, err = rec.communicate(timeout=60)
    assert rec.returncode == ExitStatus.ERROR, err
    assert "Traceback" not in err and err.count("cannot write to /dev/full") == 1, err
    with sqlite3.connect(f"file:{journal}?mode=ro", uri=True) as conn:
        n = conn.execute("SELECT count(*) FROM events WHERE netns = ?", (netns.inode,)).fetchone()[0]
        ended = conn.execute("SELECT ended FROM sessions").fetchone()[0]
    assert n >= 2 and ended is not None  # the bind and the listen; a clean end


# ---- reading a journal never writes ------------------------------------------------------


@pytest.fixture
def recorded(root: None, netns: Netns, tmp_path: Path) -> Path:
    journal = tmp_path / "rw" / "j.db"
    rec = subprocess.Popen([*PORTSCOPE, "record", "-o", str(journal), "--snapshot-interval", "1"],
                           cwd=ROOT, stderr=subprocess.PIPE, text=True)
    assert rec.stderr and "recording to" in rec.stderr.readline()
    server, intruder = Actor(netns), Actor(netns)
    fd = server.socket("tcp")
    server.bind(fd, "0.0.0.0", 20998)
    server.listen(fd)
    intruder.bind(intruder.socket("tcp"), "0.0.0.0", 20998)
    time.sleep(1.5)
    rec.send_signal(signal.SIGTERM)
    assert rec.wait(60) == 0
    return journal


def test_a_journal_in_a_directory_the_reader_cannot_write(recorded: Path) -> None:
    """0644 in a 0755 directory of root's, read by nobody: it reads, and
    leaves nothing beside it."""
    python = need_tool("/usr/bin/python3")
    with tempfile.TemporaryDirectory() as tmp:
        top = Path(tmp)
        top.chmod(0o755)
        (top / "journals").mkdir(mode=0o755)
        journal = top / "journals" / "j.db"
        shutil.copy(recorded, journal)
        journal.chmod(0o644)
        shutil.copytree(ROOT / "tracer", top / "tracer")
        result = subprocess.run([python, "-m", "tracer.cli", "report", str(journal)], cwd=top,
                                user=65534, group=65534, extra_groups=[], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert "EADDRINUSE" in result.stdout
        assert sorted(os.listdir(journal.parent)) == ["j.db"]


def test_a_journal_on_a_read_only_file_system(recorded: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "ro"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mnt)], check=True)
    try:
        shutil.copy(recorded, mnt / "j.db")
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        before = (mnt / "j.db").read_bytes()
        for argv in (["report", str(mnt / "j.db")], ["report", str(mnt / "j.db"), "--json"]):
            result = portscope(*argv)
            assert result.returncode == 0, result.stderr
        from tracer.replay import open_replay

        replay = open_replay(str(mnt / "j.db"))
        replay.end_()
        assert replay.snapshot().conflicts_total >= 1
        replay.close()
        assert (mnt / "j.db").read_bytes() == before
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_report_leaves_no_side_files(recorded: Path) -> None:
    for _ in range(3):
        assert portscope("report", str(recorded)).returncode == 0
    assert sorted(os.listdir(recorded.parent)) == ["j.db"]


# ---- collectors ----------------------------------------------------------------------------


def test_a_killed_collectors_pin_is_not_a_running_collector(root: None) -> None:
    proc = subprocess.Popen([*PORTSCOPE, "trace", "--duration", "60"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr and "tracing with" in proc.stderr.readline()
        pin = f"{PIN_DIR}/closers-{proc.pid}"
        assert os.path.exists(pin)
        doc = json.loads(portscope("timewait", "--json").stdout)
        assert doc["collectors"] >= 1
        before = doc["collectors"]
        proc.kill()
        proc.wait()
        assert os.path.exists(pin)  # SIGKILL: nothing could remove it
        doc = json.loads(portscope("timewait", "--json").stdout)
        assert doc["collectors"] == before - 1
    finally:
        proc.kill()
        for path in glob.glob(f"{PIN_DIR}/closers-{proc.pid}"):
            os.unlink(path)


def test_a_port_zero_listeners_close_carries_its_port(root: None, netns: Netns,
                                                      tmp_path: Path) -> None:
    journal = tmp_path / "j.db"
    rec = subprocess.Popen([*PORTSCOPE, "record", "-o", str(journal)], cwd=ROOT,
                           stderr=subprocess.PIPE, text=True)
    assert rec.stderr and "recording to" in rec.stderr.readline()
    actor = Actor(netns)
    listener = actor.socket("tcp")
    truth = actor.listen(listener)  # no bind: the kernel picks the port
    assert truth.errno == 0 and truth.bound_port
    actor.close(listener)
    bound = actor.socket("tcp")
    second = actor.bind(bound, "127.0.0.1", 0)
    actor.listen(bound)
    actor.close(bound)
    time.sleep(1)
    rec.send_signal(signal.SIGTERM)
    assert rec.wait(60) == 0
    with sqlite3.connect(f"file:{journal}?mode=ro", uri=True) as conn:
        closes = [r[0] for r in conn.execute(
            "SELECT port FROM events WHERE call = 'listen_close' AND netns = ? ORDER BY id",
            (netns.inode,))]
    assert closes == [truth.bound_port, second.bound_port]
