"""The journal's program snapshots (schema 3) and the two program findings,
on journals written through the writer's API: what an older journal, a
journal that starts keeping programs, a failed scan and a damaged row
give. The findings themselves are proven against real programs in
tests/kernel/test_takeover_findings.py."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from tracer import cli
from tracer import journal as jr
from tracer.hijack import find_all
from tracer.history import History
from tracer.journal.programs import ProgramHolder, ProgramsSeen, SeenProgram
from tracer.netprogs import NetProgram
from tracer.records import RecordedSnapshot

T0 = 1_790_000_000.0
NS = 4026532999
LOOKUP = NetProgram("sk_lookup", 40, "steer", "0123456789abcdef", NS, None, 7, 0)
OTHER = NetProgram("sk_lookup", 41, "other\x1b[31m", "fedcba9876543210", NS, None, 8, 1)
UPDATED = NetProgram("sk_lookup", 42, "steer2", "0123456789abcdef", NS, None, 7, 0)
CONNECT = NetProgram("connect4", 50, "rewrite", "00112233445566aa", None, "/test.slice/x", 9, 0)
HOLDER = (ProgramHolder(321, "loader", "/usr/bin/loader"),)


def journal(path: Path, snapshots: list[ProgramsSeen | None]) -> Path:
    """One session, one snapshot a second, each with what it saw."""
    w = jr.JournalWriter(str(path))
    try:
        w.start_session("tracepoint", 1.0)
        for i, programs in enumerate(snapshots):
            w.add_snapshot(RecordedSnapshot(T0 + i, 0.01, "periodic", [], {}), programs)
        w.end_session()
    finally:
        w.close()
    return path


def seen(*programs: NetProgram, scanned: tuple[str, ...] = ("sk_lookup", "sock_addr")) -> ProgramsSeen:
    return ProgramsSeen(scanned, [SeenProgram(p, HOLDER) for p in programs])


def findings(path: Path, netns: int | None = None) -> list[tuple[str, list[int], list[int], list[int]]]:
    with jr.JournalReader(str(path)) as r:
        h = History(r, None, None, netns)
        return [(f.kind, f.pids, f.owners, [e["prog_id"] for e in f.evidence])
                for f in find_all(h, 2.0)]


def test_attached_between_two_snapshots_that_looked(tmp_path: Path) -> None:
    path = journal(tmp_path / "j.db", [seen(), seen(LOOKUP), seen(LOOKUP), seen(LOOKUP, CONNECT)])
    assert findings(path) == [("sk_lookup_attached", [321], [], [40]),
                              ("sock_addr_attached", [321], [], [50])]
    # --netns keeps a cgroup's program (in no namespace), and another
    # namespace's sk_lookup program goes.
    assert [f[0] for f in findings(path, netns=NS + 1)] == ["sock_addr_attached"]


def test_replaced_on_the_same_link_and_in_place_of_another(tmp_path: Path) -> None:
    path = journal(tmp_path / "j.db", [seen(LOOKUP), seen(UPDATED), seen(OTHER)])
    assert findings(path) == [("sk_lookup_attached", [321], [321], [40, 42]),
                              ("sk_lookup_attached", [321], [321], [42, 41])]
    with jr.JournalReader(str(path)) as r:
        texts = [f.summary for f in find_all(History(r, None, None, None), 2.0)]
    assert "on the same link" in texts[0] and "in place of" in texts[1]
    assert "\x1b" not in texts[1]  # the name is untrusted text


def test_a_program_there_when_the_journal_starts_keeping_programs_is_not_attached(
        tmp_path: Path) -> None:
    # Snapshots of an older recorder (no programs looked for), then one that
    # looks: the program was there before anyone looked.
    path = journal(tmp_path / "j.db", [None, None, seen(LOOKUP, CONNECT), seen(LOOKUP, CONNECT)])
    assert findings(path) == []


def test_a_failed_scan_between_names_nothing(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    failed = ProgramsSeen((), [], [("links", "Operation not permitted")])
    only_lookup = seen(LOOKUP, scanned=("sk_lookup",))  # sock_addr scan failed here
    path = journal(tmp_path / "j.db", [seen(), failed, seen(LOOKUP), only_lookup,
                                       seen(LOOKUP, CONNECT)])
    assert findings(path) == []
    assert cli.main(["report", str(path)]) == 0
    assert "note: 1 snapshot could not look for every BPF program (first: links: Operation not " \
           "permitted): no program is named attached next to it" in capsys.readouterr().out


def test_a_journal_older_than_programs_reads_and_reports(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    path = journal(tmp_path / "j.db", [seen(), seen(LOOKUP)])
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE snapshot_programs")
    conn.execute("ALTER TABLE snapshots DROP COLUMN programs")
    conn.execute("PRAGMA user_version = 2")
    conn.commit()
    conn.close()
    before = path.read_bytes()
    assert cli.main(["report", str(path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["findings"] == [] and doc["journal"]["schema"] == 2 and doc["journal"]["notes"] == []
    assert path.read_bytes() == before
    # A recorder appending to it brings it to schema 3 (the table, the column).
    w = jr.JournalWriter(str(path))
    w.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == jr.SCHEMA_VERSION == 3
    assert conn.execute("SELECT count(*) FROM snapshot_programs").fetchone()[0] == 0
    assert "programs" in {r[1] for r in conn.execute("PRAGMA table_info(snapshots)")}
    conn.close()


@pytest.mark.parametrize("damage", [
    "UPDATE snapshot_programs SET program = '{\"kind\": \"sk_lookup\"}' WHERE prog_id = 41",
    "UPDATE snapshot_programs SET program = 'not json' WHERE prog_id = 41",
    "UPDATE snapshot_programs SET holders = '[{\"pid\": \"x\"}]' WHERE prog_id = 41",
    "UPDATE snapshot_programs SET kind = 'connect4' WHERE prog_id = 41",
    "UPDATE snapshot_programs SET prog_id = 'x' WHERE prog_id = 41",
])
def test_a_damaged_program_row_is_counted_and_shown(tmp_path: Path, damage: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    path = journal(tmp_path / "j.db", [seen(), seen(LOOKUP), seen(LOOKUP, OTHER)])
    conn = sqlite3.connect(path)
    conn.execute(damage)
    conn.commit()
    conn.close()
    assert cli.main(["report", str(path)]) == 0
    out = capsys.readouterr().out
    assert "1 damaged row(s) of the journal could not be read and were left out " \
           "(1 in snapshot_programs)" in out
    assert "1 finding:" in out and "sk_lookup_attached" in out  # the sound row still counts


def test_program_rows_are_run_length_and_rotated(tmp_path: Path) -> None:
    path = journal(tmp_path / "j.db", [seen(LOOKUP)] * 5 + [seen(LOOKUP, OTHER)] * 3)
    conn = sqlite3.connect(path)
    rows = conn.execute("SELECT prog_id, first_snapshot, last_snapshot FROM snapshot_programs "
                        "ORDER BY id").fetchall()
    assert rows == [(40, 1, 8), (41, 6, 8)]
    conn.close()
    w = jr.JournalWriter(str(path), retain=1.0)
    w.rotate(now=T0 + 7.5)  # drops snapshots 1-6 (the latest stays)
    w.close()
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT count(*) FROM snapshot_programs").fetchone()[0] == 2
    conn.close()


def test_the_human_report_shows_a_program_finding(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    path = journal(tmp_path / "j.db", [seen(), seen(CONNECT)])
    assert cli.main(["report", str(path)]) == 0
    out = capsys.readouterr().out
    assert "sock_addr_attached  cgroup /test.slice/x" in out
    assert "program   #2 connect4 prog 50 rewrite tag 00112233445566aa link 9 cgroup " \
           "/test.slice/x  loader[321]" in out
