"""``portscope replay``: the terminal UI over a journal, moved through in time
with keys (Textual's pilot). The journal is written with tracer.journal's
writer API, no kernel needed: four events (a bind, an EADDRINUSE with its
recorded blocker, an EADDRNOTAVAIL, an EADDRINUSE whose explanation
failed) and two snapshots (one listener; then a reuseport group joins)."""

from __future__ import annotations

import dataclasses
import errno
import os
import sqlite3
from pathlib import Path

import pytest
from textual.widgets import Input

from tracer import cli
from tracer import journal as jr
from tracer.errors import ExitStatus, UsageError
from tracer.records import (
    BlockerSummary,
    CallEvent,
    EventExplanation,
    Options,
    Owner,
    RecordedSnapshot,
    SocketRecord,
)
from tracer.replay import JournalReplay, open_replay
from tracer.state import StateModel
from tracer.text import clock_text
from tui.app import make_app
from tui.table import VirtualTable

from tests.recorded_session import aio, text_of

T0 = 1_800_000_000.0
NETNS = 4026531840
SIZE = (100, 30)

BIND = CallEvent(
    time=T0 + 10, call="bind", pid=100, tid=100, uid=0, sock_uid=0, comm="svc", cgroup_id=1,
    netns=NETNS, family="ipv4", protocol="tcp", addr_family="ipv4", addr="0.0.0.0", port=8080,
    bound_addr="0.0.0.0", bound_port=8080, options=Options(frozenset(), 0), inode=7,
    errno=0, plan="tracepoint", addr_unreadable=False, get_port=None)
BLOCKER = [{"pids": [100], "comm": "svc", "state": "LISTEN", "local": "0.0.0.0:8080",
            "rule": "listener"}]
EVENTS = [
    (BIND, None),
    (dataclasses.replace(BIND, time=T0 + 20, pid=200, tid=200, comm="intruder", inode=8,
                         errno=errno.EADDRINUSE, bound_addr="", bound_port=0), BLOCKER),
    (dataclasses.replace(BIND, time=T0 + 100, call="connect", pid=300, tid=300, comm="client",
                         addr="10.0.0.1", port=443, inode=9, errno=errno.EADDRNOTAVAIL,
                         bound_addr="", bound_port=0), None),
    (dataclasses.replace(BIND, time=T0 + 200, pid=400, tid=400, comm="late", port=9090,
                         inode=10, errno=errno.EADDRINUSE, bound_addr="", bound_port=0),
     {"error": "the socket's namespace is gone"}),
]


def owners(pid: int, comm: str) -> tuple[Owner, ...]:
    return (Owner(pid, comm, f"/usr/bin/{comm}", uid=0, user="root"),)


SVC = SocketRecord(NETNS, "tcp", "ipv4", "LISTEN", "0.0.0.0", 8080, 0, 0, 7, 70, frozenset(),
                   None, None, None, owners(100, "svc"))
WORKERS = [SocketRecord(NETNS, "tcp", "ipv4", "LISTEN", "0.0.0.0", 9090, 0, 0, 11 + i,
                        110 + i, frozenset({"reuseport"}), 5, 2, False, owners(500 + i, "worker"))
           for i in range(2)]


def spot(blockers: object) -> EventExplanation | None:
    """The explainer's answer that recorded these blockers (or this error)."""
    if blockers is None:
        return None
    if isinstance(blockers, dict):
        return EventExplanation(error=str(blockers["error"]))
    return EventExplanation(tuple(BlockerSummary(tuple(b["pids"]), b["comm"], b["state"],
                                                 b["local"], b["rule"])
                                  for b in blockers))  # type: ignore[union-attr]


def build(path: Path) -> Path:
    w = jr.JournalWriter(str(path))
    try:
        w.start_session("tracepoint", 2.0)
        w.add_snapshot(RecordedSnapshot(T0 + 5, 0.01, "periodic", [SVC], {"namespaces": 1}))
        w.add_calls([(ev, None, spot(b)) for ev, b in EVENTS])
        w.add_snapshot(RecordedSnapshot(T0 + 150, 0.01, "periodic", [SVC, *WORKERS],
                                   {"namespaces": 1}))
        w.commit()
        w.end_session()
    finally:
        w.close()
    return path


@pytest.fixture
def journal(tmp_path: Path) -> Path:
    return build(tmp_path / "journal.db")


def column(app, selector: str, label: str) -> list[str]:
    t = app.query_one(selector, VirtualTable)
    i = [c.label for c in t.columns].index(label)
    return [r.cells[i] for r in t.all_rows()]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# ---- the source, without the UI ---------------------------------------------------


def test_position_conflicts_and_snapshot(journal: Path) -> None:
    r = JournalReplay(str(journal))
    assert (r.start, r.end, r.total) == (T0 + 5, T0 + 200, 4)
    snap = r.snapshot()
    assert r.index == 0 and snap.conflicts_total == 0
    assert [p.port for p in snap.ports] == [8080] and snap.health.source == "replay"
    assert snap.health.plan == "tracepoint"
    r.step(1)
    r.step(1)
    snap = r.snapshot()
    assert r.index == 2 and r.time == T0 + 20 and snap.conflicts_total == 1
    c = snap.conflicts[0]
    assert c.event.comm == "intruder" and "svc[100] listener" in c.blocked_by()
    r.seek(150)  # T0 + 170: the connect failure, and the second snapshot
    snap = r.snapshot()
    assert r.index == 3 and snap.conflicts_total == 2
    assert sorted(p.port for p in snap.ports) == [8080, 9090, 9090]
    assert len(snap.groups) == 1 and len(snap.groups[0].members) == 2
    assert snap.groups[0].owners == "worker[500] worker[501]"
    r.end_()
    snap = r.snapshot()
    assert r.index == 4 and "namespace is gone" in snap.conflicts[-1].blocked_by()
    r.step(-2)  # back before the second snapshot: the group is gone again
    snap = r.snapshot()
    assert r.index == 2 and snap.conflicts_total == 1 and [p.port for p in snap.ports] == [8080]
    assert snap.groups == ()
    r.home()
    assert r.index == 0 and r.snapshot().conflicts == ()
    r.close()


def test_playing_follows_the_clock(journal: Path) -> None:
    clock = FakeClock()
    r = JournalReplay(str(journal), clock=clock)
    r.toggle()
    assert r.position().playing
    clock.now = 10.0  # 1x: T0 + 15
    assert r.snapshot().conflicts_total == 0 and r.index == 1
    r.faster()  # 2x from here
    clock.now = 50.0  # T0 + 15 + 80 = T0 + 95
    assert r.snapshot().conflicts_total == 1 and r.time == pytest.approx(T0 + 95)
    clock.now = 1000.0  # past the end: stops there
    r.snapshot()
    assert r.index == 4 and r.time == T0 + 200 and not r.position().playing
    r.toggle()  # playing again from the end starts over
    assert r.index == 0 and r.position().playing
    r.close()


def test_window(journal: Path) -> None:
    r = open_replay(str(journal), str(T0 + 15), str(T0 + 150))
    assert (r.start, r.end, r.total) == (T0 + 15, T0 + 150, 2)
    snap = r.snapshot()
    assert [p.port for p in snap.ports] == [8080]  # the snapshot from before --from
    r.end_()
    assert r.snapshot().conflicts_total == 2
    r.close()
    with pytest.raises(UsageError, match="--from is after --to"):
        open_replay(str(journal), str(T0 + 150), str(T0 + 15))
    with pytest.raises(UsageError, match="invalid time"):
        open_replay(str(journal), "yesterday")


# ---- the UI -------------------------------------------------------------------------


@aio
async def test_keys_move_the_replay(journal: Path) -> None:
    source = JournalReplay(str(journal))
    app = make_app(source)
    async with app.run_test(size=SIZE) as pilot:
        status = text_of(app, "#status")
        assert "event 0/4" in status and clock_text(T0 + 5) in status and "1x" in status
        assert "PAUSED" not in status
        footer = " ".join(b.description for b in app.active_bindings.values() if b.binding.show
                          for b in [b.binding])
        assert "Play" in footer and "Pause" not in footer.split()
        await pilot.press("2")
        await pilot.pause()
        assert app.query_one("#conflict-table", VirtualTable).row_count == 0

        await pilot.press("right", "right")
        await pilot.pause()
        status = text_of(app, "#status")
        assert "event 2/4" in status and clock_text(T0 + 20) in status
        assert column(app, "#conflict-table", "WHO") == ["intruder[200]"]
        assert "svc[100] listener" in column(app, "#conflict-table", "BLOCKED BY")[0]

        await pilot.press("3")
        await pilot.pause()
        assert column(app, "#port-table", "OWNERS") == ["svc[100]"]
        await pilot.press("right_square_bracket", "shift+right", "right_square_bracket")
        await pilot.pause()  # T0 + 200: every event, the second snapshot
        status = text_of(app, "#status")
        assert "event 4/4" in status and clock_text(T0 + 200) in status
        assert column(app, "#port-table", "OWNERS") == ["svc[100]", "worker[500]", "worker[501]"]

        await pilot.press("left_square_bracket", "shift+left")  # T0 + 80: before both
        await pilot.pause()
        assert "event 2/4" in text_of(app, "#status")
        assert column(app, "#port-table", "OWNERS") == ["svc[100]"]

        await pilot.press("end")
        await pilot.pause()
        assert "event 4/4" in text_of(app, "#status")
        await pilot.press("2")
        await pilot.pause()
        assert column(app, "#conflict-table", "WHO") == ["intruder[200]", "client[300]",
                                                          "late[400]"]
        await pilot.press("left")
        await pilot.pause()
        assert "event 3/4" in text_of(app, "#status")
        assert app.query_one("#conflict-table", VirtualTable).row_count == 2
        await pilot.press("home")
        await pilot.pause()
        assert "event 0/4" in text_of(app, "#status")
        assert app.query_one("#conflict-table", VirtualTable).row_count == 0

        await pilot.press("plus", "plus")
        assert "5x" in text_of(app, "#status")
        await pilot.press("minus")
        assert "2x" in text_of(app, "#status")
        await pilot.press("space")
        assert source.position().playing and "▶" in text_of(app, "#status")
        await pilot.press("space")
        assert not source.position().playing and "⏸" in text_of(app, "#status")


@aio
async def test_typing_a_filter_is_not_a_replay_key(journal: Path) -> None:
    source = JournalReplay(str(journal))
    app = make_app(source)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("3", "slash", "s", "v", "c", "space", "plus")
        await pilot.pause()
        assert app.query_one("#port-filter", Input).value == "svc +"
        assert source.index == 0 and not source.position().playing
        await pilot.press("escape", "right")  # the table again: replay keys work
        await pilot.pause()
        assert source.index == 1


@aio
async def test_live_mode_has_no_replay_keys() -> None:
    app = make_app(StateModel())
    async with app.run_test(size=SIZE) as pilot:
        actions = {b.binding.action for b in app.active_bindings.values()}
        assert "pause" in actions and not any(a.startswith("replay_") for a in actions)
        await pilot.press("p")
        assert app.paused and "PAUSED" in text_of(app, "#status")


# ---- bad files: one sentence, exit status 2, before any UI ----------------------------


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = cli.main(["replay", *argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("portscope: ") and "Traceback" not in err, err
    return code, lines[0]


def test_garbage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(os.urandom(8192))
    code, line = run_cli(capsys, str(path))
    assert code == ExitStatus.USAGE and "not a portscope journal" in line


def test_truncated(tmp_path: Path, journal: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = journal.read_bytes()
    path = tmp_path / "cut.db"
    path.write_bytes(data[:len(data) // 2 + 100])
    code, line = run_cli(capsys, str(path))
    assert code == ExitStatus.USAGE and "truncated" in line


def test_newer_schema(journal: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conn = sqlite3.connect(journal)
    conn.execute(f"PRAGMA user_version = {jr.SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    code, line = run_cli(capsys, str(journal))
    assert code == ExitStatus.USAGE and "newer portscope" in line


def test_missing_and_bad_times(tmp_path: Path, journal: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    code, line = run_cli(capsys, str(tmp_path / "nope.db"))
    assert code == ExitStatus.USAGE and "there is no journal" in line
    code, line = run_cli(capsys, str(journal), "--from", "soon")
    assert code == ExitStatus.USAGE and "argument --from: invalid time 'soon'" in line
    code, line = run_cli(capsys, str(journal), "--from", str(T0 + 1000))
    assert code == ExitStatus.USAGE and "holds nothing recorded after" in line
