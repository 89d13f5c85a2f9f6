"""The reading side of the journal (report, replay): read-only, and the only
code besides the writer that speaks SQL; every question is a named read."""

from __future__ import annotations

import sqlite3
from typing import Any, Iterable, Sequence

from ..text import system_text
from .schema import (
    ADDED,
    ADDED_TABLES,
    COLUMNS,
    NotAJournal,
    check_file,
    check_integrity,
    check_schema,
    check_tables,
    describe_error,
    is_kind,
    open_read_only,
    typed_row,
)


class JournalReader:
    """``report``'s and ``replay``'s side: read-only, safe while a recorder
    writes, and it never writes anything itself (no ``-wal`` or ``-shm``
    file is created beside the journal; a journal on a read-only file system,
    or in a directory the reader cannot write, reads the same).

    :meth:`rows` hands out rows whose every value has the type the schema
    declares and whose JSON columns hold the shape the writer writes; a row
    that does not (a damaged or forged journal) is left out and counted in
    ``damaged``, per table, for the caller to say so."""

    def __init__(self, path: str, check: bool = True) -> None:
        self.path = path
        self.notes: list[str] = []
        self.damaged: dict[str, int] = {}
        if check_file(path):
            raise NotAJournal(f"{path} is empty, not a portscope journal")
        self.conn = open_read_only(path, self.notes)
        try:
            self.conn.text_factory = system_text  # a forged TEXT that is not UTF-8
            self.version = check_schema(self.conn, path, allow_empty=False)
            check_tables(self.conn, path, self.version)
            if check:
                check_integrity(self.conn, path)
        except (sqlite3.Error, UnicodeDecodeError) as exc:
            self.conn.close()
            raise describe_error(path, exc) from None
        except BaseException:
            self.conn.close()
            raise
        self.conn.row_factory = sqlite3.Row

    def query(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        try:
            return self.conn.execute(sql, tuple(params)).fetchall()
        except (sqlite3.DatabaseError, OverflowError, UnicodeDecodeError) as exc:
            raise describe_error(self.path, exc) from None

    def rows(self, table: str, where: str = "", params: Iterable[Any] = (),
             order: str = "id", columns: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Rows of ``table`` (``where`` and ``order`` are SQL of the caller,
        ``params`` its values), each a dict with the declared types and the
        JSON columns decoded; damaged rows are counted, not returned."""
        if ADDED_TABLES.get(table, 0) > self.version:
            return []  # an older journal, written before the table existed
        wanted = list(columns or COLUMNS[table])
        # A column the file's older schema lacks reads as NULL.
        selected = [c if ADDED.get((table, c), 0) <= self.version else f"NULL AS {c}"
                     for c in wanted]
        sql = (f"SELECT {', '.join(selected)} FROM {table}" + (f" WHERE {where}" if where else "")
               + (f" ORDER BY {order}" if order else ""))
        out = []
        for raw in self.query(sql, params):
            row = typed_row(table, wanted, tuple(raw))
            if row is None:
                self.damaged[table] = self.damaged.get(table, 0) + 1
            else:
                out.append(row)
        return out

    def scalar(self, sql: str, params: Iterable[Any] = (), kind: type = float) -> Any:
        """One value of an aggregate (count, min, max), None when it is not
        a finite number of ``kind`` (an empty table, a damaged value)."""
        rows = self.query(sql, params)
        value = rows[0][0] if rows else None
        return value if is_kind(value, kind) else None

    # -- named reads: the questions report and replay ask, so that no SQL
    #    lives outside this module

    def snapshots(self, from_id: int = 0, until: float | None = None,
                  by_time: bool = False) -> list[dict[str, Any]]:
        """The snapshots from ``from_id`` on, taken by ``until`` when given,
        by id (or by time): id, session, time, duration, health."""
        where, params = "id >= ?", [from_id]
        if until is not None:
            where, params = where + " AND time <= ?", params + [until]
        return self.rows("snapshots", where, params, order="time, id" if by_time else "id",
                         columns=("id", "session", "time", "duration", "health", "programs"))

    def calls_between(self, start: float | None, end: float | None) -> list[dict[str, Any]]:
        """Every recorded call in the window (either end open when None), by
        time, with only what a timeline needs: id, time, call, errno."""
        where, params = [], []
        if start is not None:
            where, params = where + ["time >= ?"], params + [start]
        if end is not None:
            where, params = where + ["time <= ?"], params + [end]
        return self.rows("events", " AND ".join(where), params, order="time, id",
                         columns=("id", "time", "call", "errno"))

    def last_snapshot_before(self, t: float) -> int:
        """The id of the last snapshot taken before ``t``; 0 if none."""
        return self.scalar("SELECT max(id) FROM snapshots WHERE time < ?", (t,), int) or 0

    def sockets_seen_since(self, snapshot_id: int, port: int | None = None,
                           netns: int | None = None) -> list[dict[str, Any]]:
        """The recorded sockets still seen in snapshot ``snapshot_id`` or later
        (or not seen to end), on ``port`` and in ``netns`` when given."""
        where, params = _filters(("port",), port, netns)
        return self.rows("snapshot_sockets", "(last_snapshot IS NULL OR last_snapshot >= ?)" + where,
                         (snapshot_id, *params))

    def programs_seen_since(self, snapshot_id: int) -> list[dict[str, Any]]:
        """The recorded BPF programs (sk_lookup, cgroup sock_addr) still seen
        in snapshot ``snapshot_id`` or later (none in a journal older than
        schema 3)."""
        return self.rows("snapshot_programs", "last_snapshot IS NULL OR last_snapshot >= ?",
                         (snapshot_id,))

    def sockets_in(self, snapshot_id: int, session: int) -> list[dict[str, Any]]:
        """The sockets snapshot ``snapshot_id`` of ``session`` saw."""
        return self.rows("snapshot_sockets", "first_snapshot <= ? AND (last_snapshot >= ? "
                         "OR (last_snapshot IS NULL AND session = ?))",
                         (snapshot_id, snapshot_id, session))

    def events(self, since: float = 0.0, port: int | None = None,
               netns: int | None = None) -> list[dict[str, Any]]:
        """The calls recorded from ``since`` on, by time, on ``port`` (asked
        for or bound) and in ``netns`` when given. Successful binds to port 0
        are left out: they hold no port anyone asked for."""
        where, params = _filters(("port", "bound_port"), port, netns)
        return self.rows("events", "time >= ? AND NOT (call = 'bind' AND errno = 0 AND port = 0)"
                         + where, (since, *params), order="time, id")

    def events_by_id(self, ids: Sequence[int],
                     columns: Sequence[str] = ("id", "json", "blockers", "explanation"),
                     chunk: int = 500) -> dict[int, dict[str, Any]]:
        """The calls with these ids (those that are there and readable)."""
        out: dict[int, dict[str, Any]] = {}
        for i in range(0, len(ids), chunk):
            part = list(ids[i:i + chunk])
            out.update((r["id"], r) for r in self.rows(
                "events", f"id IN ({','.join('?' * len(part))})", part, columns=columns))
        return out

    def sessions(self) -> list[dict[str, Any]]:
        return self.rows("sessions")

    def count(self, table: str) -> int:
        """How many rows ``table`` holds (one of the schema's tables)."""
        if table not in COLUMNS:
            raise ValueError(f"no table {table!r} in the journal's schema")
        if ADDED_TABLES.get(table, 0) > self.version:
            return 0
        return self.scalar(f"SELECT count(*) FROM {table}", kind=int) or 0

    def time_span(self) -> tuple[float | None, float | None]:
        """The first and last time of any event or snapshot; None if none."""
        times = [t for t in (self.scalar(f"SELECT {f}(time) FROM {table}")
                             for f in ("min", "max") for table in ("events", "snapshots"))
                 if t is not None]
        return (min(times), max(times)) if times else (None, None)

    def damage_note(self) -> str | None:
        """One sentence on the rows left out, or None."""
        if not self.damaged:
            return None
        parts = ", ".join(f"{n} in {table}" for table, n in sorted(self.damaged.items()))
        return (f"{sum(self.damaged.values())} damaged row(s) of the journal could not be read "
                f"and were left out ({parts})")

    def meta(self) -> dict[str, str]:
        return {r["key"]: r["value"] for r in self.rows("meta", order="key")}

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "JournalReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _filters(port_columns: Sequence[str], port: int | None,
             netns: int | None) -> tuple[str, list[int]]:
    """SQL conditions (each after AND) for a netns and a port held in any of
    ``port_columns``, with their values."""
    where, params = "", []
    if netns is not None:
        where += " AND netns = ?"
        params.append(netns)
    if port is not None:
        where += " AND (" + " OR ".join(f"{c} = ?" for c in port_columns) + ")"
        params += [port] * len(port_columns)
    return where, params
