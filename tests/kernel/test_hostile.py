"""Real processes with hostile names fail real binds while every command and
the terminal UI run: nothing they chose reaches a terminal raw, every event
stays one line, and the machine formats keep their exact bytes.

Three processes (tests/kernel/hostile.c) name themselves with
``prctl(PR_SET_NAME)`` after what a terminal acts on (a title change, a
screen clear, a forged output line), run from an executable whose path
holds escapes, a newline and a byte that is not UTF-8, with such a command
line, in a cgroup (a ``.scope``, so shown as their unit) named the same
way. Each holds a listener, a reuseport group and a UDP socket, fails a
bind to its own port every 100 ms and leaves TIME_WAIT sockets it closed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest
from harness import Netns
from terminal import START_S, Terminal

from tests.hostile import NAMES, assert_safe, assert_safe_bytes
from tests.needs import missing, need_tool
from tracer.cgroups import cgroup2_root
from tracer.text import printable

ROOT = Path(__file__).resolve().parents[2]
PORTSCOPE = [sys.executable, "-m", "tracer.cli"]
COMMS = (NAMES["title"], NAMES["clear"], "ok\n12:00:00 bin")  # the kernel keeps 15 bytes
EXE_DIR = b"ps-\x1b]2;EXE\x07\ndir"
EXE_NAME = b"ev\x1b[2Jil\xff"
ARGS = [b"\x1b]2;ARG\x07", b"\nforged 12:00:00 bind", "\u202eRTL".encode(), b"\xfe\xff"]
CGROUP = "ps-\x1b]2;CG\x07\u202ex.scope"  # the kernel refuses a newline here
EVENT_LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d{6} ")


class Hostiles:
    def __init__(self, ns: Netns, exe: bytes, cgroup: str, base: int) -> None:
        self.ns, self.exe, self.cgroup, self.base = ns, exe, cgroup, base
        self.procs: list[subprocess.Popen] = []

    def port(self, i: int) -> int:
        return self.base + 10 * i

    def start(self) -> None:
        for i, comm in enumerate(COMMS):
            proc = subprocess.Popen(
                [b"nsenter", f"--net={self.ns.path}".encode(), self.exe, comm.encode(),
                 str(self.port(i)).encode(), *ARGS], stdout=subprocess.PIPE)
            self.procs.append(proc)
            assert proc.stdout and proc.stdout.readline() == b"ready\n", "a helper did not start"
            with open(os.path.join(self.cgroup, "cgroup.procs"), "w") as f:
                f.write(str(proc.pid))

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def hostiles(root: None) -> Iterator[Hostiles]:
    need_tool("gcc")
    need_tool("nsenter")
    cg_root = cgroup2_root()
    if not cg_root:
        missing("needs cgroup v2 (the helpers run in a cgroup with a hostile name)")
    tmp = tempfile.mkdtemp(prefix="portscope-hostile-").encode()
    exe_dir = os.path.join(tmp, EXE_DIR)
    os.mkdir(exe_dir)
    exe = os.path.join(exe_dir, EXE_NAME)
    subprocess.run([b"gcc", b"-O1", b"-o", exe, str(ROOT / "tests/kernel/hostile.c").encode()],
                   check=True)
    cgroup = os.path.join(cg_root, CGROUP)
    os.mkdir(cgroup)
    ns = Netns()
    helpers = Hostiles(ns, exe, cgroup, 21000 + os.getpid() % 500 * 10)
    try:
        helpers.start()
        yield helpers
    finally:
        helpers.stop()
        ns.close()
        for _ in range(50):
            try:
                os.rmdir(cgroup)
                break
            except OSError:
                time.sleep(0.1)
        subprocess.run(["rm", "-rf", tmp])


def portscope(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*PORTSCOPE, *args], cwd=ROOT, capture_output=True, timeout=timeout)


def assert_safe_result(result: subprocess.CompletedProcess[bytes], what: str) -> str:
    assert b"Traceback" not in result.stderr, result.stderr.decode(errors="replace")
    assert_safe_bytes(result.stdout, f"{what} stdout")
    assert_safe_bytes(result.stderr, f"{what} stderr")
    return result.stdout.decode()


def shown(text: str) -> str:
    """How a terminal surface writes ``text``."""
    return printable(text)


# ---- line output ------------------------------------------------------------------------


def test_trace_prints_every_event_as_one_safe_line(hostiles: Hostiles) -> None:
    result = portscope("trace", "--duration", "2.5")
    out = assert_safe_result(result, "trace")
    lines = out.splitlines()
    assert lines[0].startswith("TIME ")
    for line in lines[1:]:
        assert EVENT_LINE.match(line) or line.startswith("    blocked by: "), \
            f"a line that is neither an event nor its blockers: {line!r}"
    for pid, comm in zip(hostiles.pids, COMMS):
        mine = [ln for ln in lines if f" {pid} " in ln and "EADDRINUSE" in ln]
        assert mine, f"no failure of pid {pid} traced"
        assert all(shown(comm) in ln for ln in mine)
    blocked = [ln for ln in lines if ln.startswith("    blocked by: ")]
    assert any(shown(COMMS[0]) in ln for ln in blocked)


def test_trace_json_keeps_the_exact_names(hostiles: Hostiles) -> None:
    result = portscope("trace", "--json", "--comm", COMMS[0], "--count", "3", "--duration", "20")
    assert result.returncode == 0, result.stderr
    docs = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert len(docs) == 3
    for doc in docs:
        assert doc["comm"] == COMMS[0] and doc["pid"] == hostiles.pids[0]
        assert doc["unit"] == CGROUP  # from the cgroup path, exactly


def test_ports_why_and_groups_name_the_owners_safely(hostiles: Hostiles) -> None:
    ns = hostiles.ns.name
    for i, comm in enumerate(COMMS):
        port = hostiles.port(i)
        out = assert_safe_result(portscope("ports", str(port), "--netns", ns), "ports")
        label = f"{shown(comm)}[{hostiles.pids[i]}] ({shown(CGROUP)})"
        rows = [ln for ln in out.splitlines() if ln.startswith(str(hostiles.ns.inode))]
        held = [ln for ln in rows if " LISTEN " in ln or " udp4 " in ln]
        assert len(held) == 2 and all(ln.endswith(label) for ln in held), rows
        why = portscope("why", str(port), "--addr", "127.0.0.1", "--netns", ns)
        assert why.returncode == 5
        out = assert_safe_result(why, "why")
        assert f"held by {shown(comm)}[{hostiles.pids[i]}]" in out
        groups = portscope("groups", str(port + 1), "--netns", ns, "--interval", "0.5")
        out = assert_safe_result(groups, "groups")
        assert out.count(f"{shown(comm)}[{hostiles.pids[i]}]") == 2  # two members


def test_timewait_by_process_names_the_closer_safely(hostiles: Hostiles) -> None:
    # A collector must be running when the connections close: trace is one.
    collector = subprocess.Popen([*PORTSCOPE, "trace", "--duration", "30"], cwd=ROOT,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert collector.stderr and b"tracing with" in collector.stderr.readline()
        time.sleep(1.5)
        result = portscope("timewait", "--by", "process", "--netns", hostiles.ns.name)
    finally:
        collector.send_signal(signal.SIGTERM)
        collector.wait(30)
    out = assert_safe_result(result, "timewait")
    for pid, comm in zip(hostiles.pids, COMMS):
        assert f"{shown(comm)}[{pid}] uid 0" in out


@pytest.fixture(scope="module")
def journal(hostiles: Hostiles, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hostile") / "journal.db"
    rec = subprocess.Popen([*PORTSCOPE, "record", "-o", str(path), "--snapshot-interval", "1"],
                           cwd=ROOT, stderr=subprocess.PIPE)
    assert rec.stderr and b"recording to" in rec.stderr.readline()
    time.sleep(3)
    rec.send_signal(signal.SIGTERM)
    assert rec.wait(30) == 0
    return path


def test_report_shows_the_journal_safely_and_its_json_exactly(hostiles: Hostiles,
                                                              journal: Path) -> None:
    out = assert_safe_result(portscope("report", str(journal)), "report")
    assert f"{shown(COMMS[0])}" in out
    result = portscope("report", str(journal), "--json")
    doc = json.loads(result.stdout)
    mine = [e for e in doc["timeline"] if e["pids"] == [hostiles.pids[0]]]
    assert mine and all(e["comm"] == COMMS[0] for e in mine)
    exes = {e["exe"] for e in mine if e.get("exe")}
    assert exes == {os.fsdecode(hostiles.exe)}  # the exact bytes, \xff included
    assert os.fsencode(exes.pop()) == hostiles.exe


def test_export_keeps_names_exact_in_its_labels(hostiles: Hostiles) -> None:
    from prometheus_client.parser import text_string_to_metric_families
    from test_export import free_port, http_get, stop, wait_for

    port = free_port()
    proc = subprocess.Popen([*PORTSCOPE, "export", "--listen", f"127.0.0.1:{port}",
                             "--interval", "1"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}/metrics"

        def comms() -> set[str]:
            text = http_get(url)
            return {s.labels["comm"] for f in text_string_to_metric_families(text)
                    if f.name == "portscope_failures" for s in f.samples}

        found = wait_for(lambda: set(COMMS) <= comms() and comms(), 60, "the hostile names",
                         proc)
        assert set(COMMS) <= found
    finally:
        stop(proc)


# ---- the terminal UI -----------------------------------------------------------------------


def _title_oracle() -> str:
    """Prove that this tmux takes window titles from escape sequences (so
    that an unchanged title below means something); returns its default."""
    term = Terminal("printf '\\033]2;ORACLE-TITLE\\007'; sleep 30")
    try:
        term.wait_for(lambda _: term.state("pane_title") == "ORACLE-TITLE", 10)
    finally:
        term.close()
    term = Terminal("sleep 30")
    try:
        return term.state("pane_title")
    finally:
        term.close()


def _no_escape_took_effect(term: Terminal, default_title: str, screen: str) -> None:
    assert term.state("pane_title") == default_title, "a process name set the terminal's title"
    assert "PWND" not in term.state("pane_title")
    assert_safe(screen, "the screen")


def test_the_ui_shows_hostile_names_escaped(hostiles: Hostiles) -> None:
    title = _title_oracle()
    term = Terminal(f"{sys.executable} -m tracer.cli ui; sleep 30", width=120, height=40)
    try:
        term.wait_for(lambda s: "live · " in s, START_S)
        term.keys("2")
        _, screen = term.wait_for(lambda s: shown(COMMS[0])[:12] in s and "EADDRINUSE" in s, 30)
        _no_escape_took_effect(term, title, screen)
        # The screen was not cleared by the second name: the table is still there.
        _, screen = term.wait_for(lambda s: "TIME" in s and "BLOCKED BY" in s, 5)
        term.keys("3")  # Ports: every owner's name, escaped in its cell
        _, screen = term.wait_for(lambda s: all(shown(c)[:9] in s for c in COMMS), 30)
        _no_escape_took_effect(term, title, screen)
        term.keys("q")
        term.wait_for(lambda s: term.state("alternate_on") == "0", 20)
    finally:
        term.close()


def test_replay_shows_hostile_names_escaped(hostiles: Hostiles, journal: Path) -> None:
    title = _title_oracle()
    term = Terminal(f"{sys.executable} -m tracer.cli replay {journal} --speed 100; sleep 30",
                    width=120, height=40)
    try:
        term.keys("end")
        term.keys("2")
        _, screen = term.wait_for(lambda s: shown(COMMS[0])[:12] in s, 30)
        _no_escape_took_effect(term, title, screen)
    finally:
        term.close()
