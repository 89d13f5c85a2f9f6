"""The fuzz suite: hostile input at every boundary, chosen by Hypothesis.

* command-line values for every option of every command;
* mutations of a real recorded journal (tests/data/journal.db, recorded by
  scripts/record-journal-fixture): bytes, rows, columns, types, tables,
  schema; read by ``report`` (text and JSON), ``replay`` and ``record``;
* random bytes fed to the decoders of the kernel's records (events,
  sock_diag dumps, socket iterators).

The property everywhere: a correct answer (exit 0, output safe for a
terminal), or one sentence on stderr with the documented exit status;
never a traceback, never an "internal error", never a raw control byte,
and reading a journal never changes it. The budget is fixed and the seed
too (tests/conftest.py), so every run tries the same examples.
"""

from __future__ import annotations

import argparse
import ctypes
import shutil
import sqlite3
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tests.hostile import assert_safe, hostile_text
from tracer import cli, journal, sockdiag, sockflags, text, trace
from tracer.errors import ExitStatus, PortscopeError, Unsupported
from tracer.events import Clock, decode
from tracer.layout import PsEvent, PsEventBlocked
from tracer.records import CallEvent

FIXTURE = Path(__file__).resolve().parent.parent / "data" / "journal.db"
CLOCK = Clock()
BLOCKED_SIZE = ctypes.sizeof(PsEventBlocked)
EVENT_SIZE = ctypes.sizeof(PsEvent)


def run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # --help and --version exit through argparse
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_answer_or_sentence(code: int, out: str, err: str, allowed: set[int]) -> None:
    """Exit 0 with safe output, or one safe sentence and an allowed status."""
    assert "Traceback" not in err and "internal error" not in err, err
    assert_safe(out, "stdout")
    assert_safe(err, "stderr")
    if code != 0:
        assert code in allowed, (code, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("portscope: "), err


# ---- command-line values ---------------------------------------------------------------


def _options() -> list[tuple[str, str, bool]]:
    """(command, option, positional) for every option that takes a value."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    found = []
    for name, sp in sub.choices.items():
        for action in sp._actions:
            if action.nargs == 0 or isinstance(action, argparse._HelpAction):
                continue
            positional = not action.option_strings
            found.append((name, action.dest if positional else action.option_strings[-1],
                          positional))
    return found


OPTIONS = _options()
ABSURD = ["inf", "-inf", "nan", "1e20", "-1", "0", "", " ", "4294967296", "4294967297",
          "99999999999999999999999", "8_0", "٨٠", "0x10", "4G", "1T", "1e-320", "1w",
          "10000000d", "/etc/passwd", "/proc/self/ns/mnt", "/dev/null", "pid:1", "pid:x",
          "2026-13-45", "99999-01-01T00:00", "[::]:99999", "127.0.0.1:0", "EWHATEVER", "999"]


def values() -> st.SearchStrategy[str]:
    return st.sampled_from(ABSURD) | hostile_text() | st.integers(-2**70, 2**70).map(str)


@pytest.fixture
def no_commands(monkeypatch: pytest.MonkeyPatch) -> list[argparse.Namespace]:
    """Commands are not run (no probes, no journal, no screen): what is
    fuzzed is every value's checking, which happens before they start."""
    ran: list[argparse.Namespace] = []

    def fake(name: str):  # type: ignore[no-untyped-def]
        def command(args: argparse.Namespace) -> ExitStatus:
            ran.append(args)
            return ExitStatus.OK
        return command

    monkeypatch.setattr(cli, "_command", fake)  # every command, the UI's too
    return ran


REQUIRED = {"why": ["80"], "report": ["x.db"], "replay": ["x.db"]}


@given(st.sampled_from(OPTIONS), values())
def test_every_option_takes_any_value(capsys: pytest.CaptureFixture[str],
                                      no_commands: list[argparse.Namespace],
                                      option: tuple[str, str, bool], value: str) -> None:
    command, name, positional = option
    if positional:  # the one positional of the command, after "--" (it may start with "-")
        args = ["--", value]
    else:
        args = [*REQUIRED.get(command, []), f"{name}={value}"]
    code, out, err = run(capsys, [command, *args])
    assert_answer_or_sentence(code, out, err, {ExitStatus.USAGE})
    if code == 0:
        _check_bounds(no_commands[-1])


def _check_bounds(args: argparse.Namespace) -> None:
    """What reached a command is within what the command can use."""
    import math

    for key, value in vars(args).items():
        if isinstance(value, float):
            assert math.isfinite(value) and value >= 0, (key, value)
        if key == "pid" and value is not None:
            assert 1 <= value <= 4194304
        if key in ("port",) and isinstance(value, int):
            assert 0 <= value <= 65535
        if key == "ring_size":
            assert value <= 1 << 30


# ---- a damaged journal ------------------------------------------------------------------

TABLES = list(journal.COLUMNS)
ODD_VALUES = st.one_of(
    st.none(), st.integers(-2**63, 2**63 - 1), st.floats(allow_nan=False), st.just(float("inf")),
    hostile_text(), st.binary(max_size=40),
    st.sampled_from(["", "{", "[]", "{}", "[1,2]", '[{"pid": "x"}]', '{"error": 5}',
                     '[{"pids": ["a"]}]', "[" * 5000 + "]" * 5000, '"text"', "null", "1e999",
                     '{"time": "soon"}', "::1", "999.1.1.1", "tcp", "LISTEN", "reuseport,x"]))


@contextmanager
def copy_of_fixture() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "journal.db"
        shutil.copyfile(FIXTURE, path)
        yield path


def mutate_rows(path: Path, data: st.DataObject) -> None:
    """Values of any type in any column; first, when drawn, the tables are
    rebuilt without their constraints (a forged journal has none), so that
    NULL can go where the schema forbids it."""
    conn = sqlite3.connect(path)
    try:
        if data.draw(st.booleans(), "loosen"):
            for table in TABLES:
                conn.execute(f"CREATE TABLE loose AS SELECT * FROM {table}")
                conn.execute(f"DROP TABLE {table}")
                conn.execute(f"ALTER TABLE loose RENAME TO {table}")
        for _ in range(data.draw(st.integers(1, 4), "edits")):
            table = data.draw(st.sampled_from(TABLES), "table")
            column = data.draw(st.sampled_from(sorted(journal.COLUMNS[table])), "column")
            value = data.draw(ODD_VALUES, "value")
            # Text that is not UTF-8 goes in as TEXT holding those bytes
            # (what a forged file holds), or as the BLOB portscope writes.
            as_text = isinstance(value, str) and text.sql_text(value) != value
            if isinstance(value, str):
                value = text.sql_text(value)
            cast = "CAST(? AS TEXT)" if as_text or data.draw(st.booleans(), "cast") else "?"
            key = "key" if table == "meta" else "rowid"
            try:
                conn.execute(f"UPDATE {table} SET {column} = {cast} WHERE {key} IN "
                             f"(SELECT {key} FROM {table} ORDER BY random() LIMIT 2)", (value,))
            except sqlite3.IntegrityError:
                continue  # a constraint of the real schema: this edit cannot be made
        conn.commit()
    finally:
        conn.close()


def mutate_schema(path: Path, data: st.DataObject) -> None:
    conn = sqlite3.connect(path)
    try:
        kind = data.draw(st.sampled_from(["drop_column", "drop_table", "version", "app",
                                          "rename"]), "schema edit")
        table = data.draw(st.sampled_from(TABLES), "table")
        try:
            if kind == "drop_column":
                column = data.draw(st.sampled_from(sorted(journal.COLUMNS[table])), "column")
                conn.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
            elif kind == "drop_table":
                conn.execute(f"DROP TABLE {table}")
            elif kind == "rename":
                conn.execute(f"ALTER TABLE {table} RENAME TO {table}_old")
            elif kind == "version":
                conn.execute(f"PRAGMA user_version = {data.draw(st.integers(-5, 5), 'version')}")
            else:
                conn.execute(f"PRAGMA application_id = {data.draw(st.integers(0, 2**31), 'id')}")
            conn.commit()
        except sqlite3.OperationalError:
            assume(False)  # SQLite refused this edit (an indexed column): not a journal we can make
    finally:
        conn.close()


def mutate_bytes(path: Path, data: st.DataObject) -> None:
    raw = bytearray(path.read_bytes())
    if data.draw(st.booleans(), "truncate"):
        raw = raw[:data.draw(st.integers(0, len(raw)), "length")]
    for _ in range(data.draw(st.integers(1, 8), "flips")):
        if raw:
            raw[data.draw(st.integers(0, len(raw) - 1), "offset")] = data.draw(st.integers(0, 255))
    path.write_bytes(bytes(raw))


def read_everything(capsys: pytest.CaptureFixture[str], path: Path) -> None:
    """report (text, JSON, windowed), replay's source, record's check."""
    before = path.read_bytes()
    for extra in ([], ["--json"], ["--since", "1h", "--port", "8080"]):
        code, out, err = run(capsys, ["report", str(path), *extra])
        assert_answer_or_sentence(code, out, err, {ExitStatus.USAGE, ExitStatus.NO_PERMISSION})
    from tracer.replay import open_replay

    try:
        replay = open_replay(str(path))
    except PortscopeError as exc:  # shown through cli.main, which escapes it
        assert exc.status == ExitStatus.USAGE, exc
    else:
        try:
            for move in (replay.end_, replay.home, lambda: replay.step(3), lambda: replay.seek(60)):
                move()
                replay.snapshot()
        finally:
            replay.close()
    try:
        journal.check_target(str(path))
    except PortscopeError as exc:
        assert exc.status == ExitStatus.USAGE, exc
    assert path.read_bytes() == before, "reading the journal changed it"
    assert not Path(str(path) + "-wal").exists() and not Path(str(path) + "-shm").exists()


def test_the_fixture_is_a_good_journal(capsys: pytest.CaptureFixture[str]) -> None:
    with copy_of_fixture() as path:
        code, out, err = run(capsys, ["report", str(path)])
        assert code == 0 and "19 events and 5 snapshots" in out, err
        read_everything(capsys, path)


@pytest.mark.parametrize("mutate", [mutate_rows, mutate_schema, mutate_bytes],
                         ids=["rows", "schema", "bytes"])
@settings(max_examples=400)
@given(st.data())
def test_damaged_journal(capsys: pytest.CaptureFixture[str], mutate, data: st.DataObject) -> None:  # type: ignore[no-untyped-def]
    with copy_of_fixture() as path:
        mutate(path, data)
        read_everything(capsys, path)


@given(st.data())
def test_recording_onto_a_damaged_journal(data: st.DataObject) -> None:
    with copy_of_fixture() as path:
        data.draw(st.sampled_from([mutate_rows, mutate_schema, mutate_bytes]))(path, data)
        try:
            journal.check_target(str(path))
            writer = journal.JournalWriter(str(path))
        except PortscopeError as exc:
            assert exc.status in (ExitStatus.USAGE, ExitStatus.ERROR), exc
        else:
            writer.start_session("tracepoint", 1.0)
            writer.end_session()
            writer.close()


# ---- the kernel's records, as random bytes ------------------------------------------------


@given(st.binary(min_size=EVENT_SIZE, max_size=EVENT_SIZE + 16))
def test_event_decoder(raw: bytes) -> None:
    ev = decode(raw, CLOCK)
    line = trace.human_line(ev)
    assert_safe(line) and "\n" not in line
    import json

    json.dumps(ev.to_json())


@given(st.binary(min_size=EVENT_SIZE, max_size=BLOCKED_SIZE + 8))
def test_blocked_event_decoder(raw: bytes) -> None:
    """A refused bind's record, with its blockers: any bytes decode, print
    safely, and survive their JSON."""
    import json

    ev = decode(raw, CLOCK)
    assert_safe(trace.human_line(ev))
    doc = json.loads(json.dumps(ev.to_json()))
    again = CallEvent.from_json(doc)
    assert again.capture == ev.capture


@given(st.binary(max_size=sockflags.RECORD * 3 + 5))
def test_iterator_decoder(raw: bytes) -> None:
    try:
        records = sockflags.decode_sockets(raw)
    except ValueError:
        assert len(raw) % sockflags.RECORD
    else:
        assert len(records) == len(raw) // sockflags.RECORD


def _message(body: bytes, kind: int) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), kind, 0, 1, 0) + body


@given(st.lists(st.one_of(
    st.binary(max_size=120).map(lambda b: _message(b, sockdiag.SOCK_DIAG_BY_FAMILY)),
    st.binary(min_size=4, max_size=8).map(lambda b: _message(b, sockdiag.NLMSG_DONE)),
    st.binary(max_size=64)), max_size=6).map(b"".join))
def test_sock_diag_parser(buf: bytes) -> None:
    parser = sockdiag.DumpParser(1, sockdiag.SOCK_DIAG_BY_FAMILY, 6)
    try:
        parser.feed(buf, len(buf))
    except (OSError, Unsupported):
        pass
    for record in parser.records:
        assert 0 <= record.local_port <= 65535 and record.family in ("ipv4", "ipv6")
