"""The journal file itself, without the kernel: bad files give one sentence
and exit status 2 (through the command line, in-process), a new journal is
private (0600), rotation keeps it within its size and age limits, and the
time arguments parse."""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import stat
import time
from pathlib import Path

import pytest

from tracer import arguments, cli
from tracer import journal as jr
from tracer.errors import ExitStatus
from tracer.records import CallEvent, Options, Owner, RecordedSnapshot, SocketRecord

EVENT = CallEvent(
    time=0.0, call="bind", pid=4242, tid=4242, uid=0, sock_uid=0, comm="svc", cgroup_id=1,
    netns=4026531840, family="ipv4", protocol="tcp", addr_family="ipv4", addr="0.0.0.0", port=8080,
    bound_addr="0.0.0.0", bound_port=8080, options=Options(frozenset({"reuseport"}), 0), inode=7,
    errno=0, plan="tracepoint", addr_unreadable=False, get_port=None)


def make_journal(path: Path, events: int = 2000, start: float | None = None, step: float = 0.001,
                 **limits: object) -> jr.JournalWriter:
    w = jr.JournalWriter(str(path), **limits)  # type: ignore[arg-type]
    w.start_session("tracepoint", 2.0)
    t = time.time() if start is None else start
    w.add_calls([(dataclasses.replace(EVENT, time=t + i * step, inode=1000 + i), None, None)
                 for i in range(events)])
    sock = SocketRecord(EVENT.netns, "tcp", "ipv4", "LISTEN", "0.0.0.0", 8080, 0, 0, 7, 9,
                        frozenset({"reuseport"}), 1, 1, False,
                        (Owner(4242, "svc", exe="/usr/sbin/svc"),))
    w.add_snapshot(RecordedSnapshot(t, 0.01, "periodic", [sock], {}))
    w.commit()
    return w


def written(path: Path, **kw: object) -> Path:
    make_journal(path, **kw).close()  # type: ignore[arg-type]
    return path


def report(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(["report", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def one_sentence(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("portscope: ") and "Traceback" not in err, err
    return lines[0]


# ---- bad files: one sentence, exit status 2 ------------------------------------------


def test_garbage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(os.urandom(8192))
    code, out, err = report(capsys, str(path))
    assert code == ExitStatus.USAGE and out == ""
    assert "is not a portscope journal (not an SQLite database)" in one_sentence(err)


def test_text_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello\n")
    code, _, err = report(capsys, str(path))
    assert code == ExitStatus.USAGE and "not an SQLite database" in one_sentence(err)


@pytest.mark.parametrize("keep", [0.5, 0.1])
def test_truncated(tmp_path: Path, capsys: pytest.CaptureFixture[str], keep: float) -> None:
    path = written(tmp_path / "j.db")
    assert not Path(str(path) + "-wal").exists()  # checkpointed on close: the file is whole
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(int(size * keep) // 4096 * 4096)
    code, _, err = report(capsys, str(path))
    assert code == ExitStatus.USAGE and "is truncated" in one_sentence(err)


def test_truncated_mid_page_and_mid_header(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = written(tmp_path / "j.db")
    with open(path, "r+b") as f:
        f.truncate(3 * 4096 + 100)
    code, _, err = report(capsys, str(path))
    assert code == ExitStatus.USAGE and "is truncated" in one_sentence(err)
    with open(path, "r+b") as f:
        f.truncate(40)
    code, _, err = report(capsys, str(path))
    assert code == ExitStatus.USAGE and "is truncated" in one_sentence(err)


def test_newer_schema(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = written(tmp_path / "j.db")
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {jr.SCHEMA_VERSION + 1}")
    conn.close()
    code, _, err = report(capsys, str(path))
    sentence = one_sentence(err)
    assert code == ExitStatus.USAGE
    assert f"journal schema {jr.SCHEMA_VERSION + 1}" in sentence and "newer portscope" in sentence
    # The recorder refuses it too, and leaves it alone.
    before = path.read_bytes()
    assert cli.main(["record", "-o", str(path)]) == ExitStatus.USAGE
    assert "newer portscope" in one_sentence(capsys.readouterr().err)
    assert path.read_bytes() == before


def test_another_applications_database(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    code, _, err = report(capsys, str(path))
    assert code == ExitStatus.USAGE and "an SQLite database but not a portscope journal" in one_sentence(err)


def test_damaged_page(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = written(tmp_path / "j.db")
    with open(path, "r+b") as f:  # scribble over a b-tree page in the middle
        f.seek(path.stat().st_size // 2 // 4096 * 4096)
        f.write(b"\xff" * 4096)
    code, _, err = report(capsys, str(path))
    assert code == ExitStatus.USAGE and "is damaged" in one_sentence(err)


def test_missing_and_empty(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = report(capsys, str(tmp_path / "nope.db"))
    assert code == ExitStatus.USAGE and "there is no journal at" in one_sentence(err)
    empty = tmp_path / "empty.db"
    empty.touch()
    code, _, err = report(capsys, str(empty))
    assert code == ExitStatus.USAGE and "is empty" in one_sentence(err)


def test_record_refuses_garbage_without_touching_it(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "garbage.db"
    data = os.urandom(4096)
    path.write_bytes(data)
    assert cli.main(["record", "-o", str(path)]) == ExitStatus.USAGE
    assert "not a portscope journal" in one_sentence(capsys.readouterr().err)
    assert path.read_bytes() == data


def test_bad_since(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = written(tmp_path / "j.db")
    code, _, err = report(capsys, str(path), "--since", "yesterday-ish")
    assert code == ExitStatus.USAGE and "invalid time 'yesterday-ish'" in one_sentence(err)


# ---- a good file ----------------------------------------------------------------------


def test_report_reads_a_journal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = written(tmp_path / "j.db", events=10)
    code, out, _ = report(capsys, str(path))
    assert code == 0 and f"schema {jr.SCHEMA_VERSION}, 1 recording session, 10 events and 1 snapshots" in out


def test_new_journal_is_private(tmp_path: Path) -> None:
    path = tmp_path / "state" / "j.db"
    w = make_journal(path, events=10)
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        for side in ("-wal", "-shm"):
            assert stat.S_IMODE(os.stat(str(path) + side).st_mode) == 0o600
    finally:
        w.close()


def test_existing_journal_made_private(tmp_path: Path) -> None:
    path = written(tmp_path / "j.db", events=10)
    os.chmod(path, 0o644)
    jr.JournalWriter(str(path)).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_one_writer_at_a_time(tmp_path: Path) -> None:
    w = make_journal(tmp_path / "j.db", events=1)
    try:
        with pytest.raises(jr.JournalBusy, match="another portscope record is writing"):
            jr.JournalWriter(str(tmp_path / "j.db"))
    finally:
        w.close()


def test_schema(tmp_path: Path) -> None:
    path = written(tmp_path / "j.db", events=1)
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == jr.SCHEMA_VERSION
    assert conn.execute("PRAGMA application_id").fetchone()[0] == jr.APPLICATION_ID
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental
    columns = {r[1] for r in conn.execute("PRAGMA table_info(events)")}
    # The sockets read at a refusal live in the json column only (a list).
    assert set(EVENT.to_json()) - {"result", "bound_dev_if", "options", "at_failure"} <= columns
    assert {"json", "blockers", "exe", "cgroup", "cmdline", "result", "options"} <= columns
    row = conn.execute("SELECT json FROM events").fetchone()[0]
    assert sorted(__import__("json").loads(row)) == sorted(EVENT.to_json())
    conn.close()


# ---- bounds ---------------------------------------------------------------------------


def test_size_rotation(tmp_path: Path) -> None:
    limit = 512 << 10
    w = make_journal(tmp_path / "j.db", events=100, max_size=limit)
    try:
        for _ in range(20):  # about 1.5 MiB of events, rotated as they come
            last = w._db.execute("SELECT max(time) FROM events").fetchone()[0]
            w.add_calls([(dataclasses.replace(EVENT, time=last + 0.001 * (i + 1)), None, None)
                         for i in range(100)])
            w.commit()
            w.rotate()
        for _ in range(10):
            w.rotate()
        assert w.used_bytes() <= limit
        assert w.file_bytes() <= limit * 1.1  # free pages given back
        newest = w._db.execute("SELECT max(time) FROM events").fetchone()[0]
        oldest = w._db.execute("SELECT min(time) FROM events").fetchone()[0]
        assert oldest > time.time() - 60 and newest - oldest > 0  # the newest stay
        assert w._db.execute("SELECT count(*) FROM snapshots").fetchone()[0] == 1  # the latest stays
    finally:
        w.close()


def test_age_rotation(tmp_path: Path) -> None:
    now = time.time()
    w = make_journal(tmp_path / "j.db", events=100, start=now - 7200, step=60, retain=3600.0)
    try:
        w.rotate(now=now)
        times = [r[0] for r in w._db.execute("SELECT time FROM events")]
        assert times and min(times) >= now - 3600
        assert len(times) == sum(1 for i in range(100) if now - 7200 + 60 * i >= now - 3600)
    finally:
        w.close()


def test_crashed_session_is_closed_on_reopen(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    w = make_journal(path, events=1)
    w._checkpointer.stop()  # type: ignore[union-attr]
    w._conn.close()  # type: ignore[union-attr]  # no end_session: as if killed
    os.close(w._lock_fd)
    w2 = jr.JournalWriter(str(path))
    try:
        w2.start_session("tracepoint", 2.0)
        open_rows = w2._db.execute("SELECT count(*) FROM snapshot_sockets WHERE last_snapshot IS NULL").fetchone()[0]
        assert open_rows == 0
        assert w2._db.execute("SELECT ended FROM sessions WHERE id = 1").fetchone()[0] is None
    finally:
        w2.close()


# ---- times ----------------------------------------------------------------------------


@pytest.mark.parametrize("text,seconds", [("90", 90), ("30s", 30), ("10m", 600), ("2h", 7200),
                                          ("7d", 604800), ("1w", 604800), ("1.5h", 5400)])
def test_durations(text: str, seconds: float) -> None:
    assert arguments.duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "h", "-1h", "0", "soon", "inf", "nan", "1e20", "8_0"])
def test_bad_durations(bad: str) -> None:
    with pytest.raises(arguments.Invalid):
        arguments.duration(bad)


def test_times() -> None:
    now = 1_800_000_000.0
    at = arguments.point_in_time
    assert at("10m", now) == now - 600
    assert at("2h", now) == now - 7200
    assert at("1800000123.5", now) == 1800000123.5
    from datetime import datetime, timezone

    assert at("2027-01-15T08:00:00Z", now) == datetime(2027, 1, 15, 8, tzinfo=timezone.utc).timestamp()
    assert at("2027-01-15 08:00", now) == datetime(2027, 1, 15, 8).timestamp()  # local time
    for bad in ("last tuesday", "inf", "1e20", "-inf", "nan", "99999-01-01", "3650000d"):
        with pytest.raises(arguments.Invalid):
            at(bad, now)


# ---- text that is not UTF-8 is kept exactly -----------------------------------------------


def test_names_that_are_not_utf8_are_kept_exactly(tmp_path: Path) -> None:
    from tracer.owners import Owner
    from tracer.text import system_text

    comm, exe = system_text(b"ev\x1b\xff"), system_text(b"/tmp/\xfe\n/bin")
    w = jr.JournalWriter(str(tmp_path / "j.db"))
    w.start_session("tracepoint", 2.0)
    owner = Owner(pid=1, comm=comm, exe=exe, cmdline=exe, cgroup=exe, uid=0)
    w.add_calls([(dataclasses.replace(EVENT, comm=comm), owner, None)])
    w.close()
    with jr.JournalReader(str(tmp_path / "j.db")) as r:
        (row,) = r.rows("events")
    assert (row["comm"], row["exe"], row["cmdline"], row["cgroup"]) == (comm, exe, exe, exe)
    assert row["exe"].encode("utf-8", "surrogateescape") == b"/tmp/\xfe\n/bin"
    assert row["json"]["comm"] == comm  # the JSON column escapes it its own way


# ---- schema 1 journals: read as they are, migrated by a recorder ---------------------------


def _schema_1(path: Path) -> Path:
    """A journal as portscope wrote it before schema 2 (no explanation column)."""
    written(path, events=5)
    conn = sqlite3.connect(path)
    conn.execute("ALTER TABLE events DROP COLUMN explanation")
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    return path


def test_a_schema_1_journal_is_read_without_change(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    path = _schema_1(tmp_path / "old.db")
    before = path.read_bytes()
    code, out, err = report(capsys, str(path))
    assert code == 0 and "schema 1, 1 recording session, 5 events" in out, err
    with jr.JournalReader(str(path)) as r:
        rows = r.rows("events")
    assert len(rows) == 5 and all(row["explanation"] is None for row in rows)
    assert path.read_bytes() == before


def test_a_recorder_migrates_a_schema_1_journal(tmp_path: Path) -> None:
    path = _schema_1(tmp_path / "old.db")
    w = jr.JournalWriter(str(path))
    w.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == jr.SCHEMA_VERSION
    assert "explanation" in {r[1] for r in conn.execute("PRAGMA table_info(events)")}
    assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 5
