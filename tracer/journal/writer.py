"""The recorder's side of the journal: one thread writes, commits at least
every COMMIT_S seconds, checkpoints the WAL and keeps the file bounded."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sqlite3
import stat
import threading
import time
from typing import Any, Sequence

from ..records import (
    EVENT_COLUMNS,
    SOCKET_COLUMNS,
    CallEvent,
    EventExplanation,
    Owner,
    RecordedSnapshot,
    SocketRecord,
)
from .programs import ProgramsSeen, SeenProgram
from .schema import (
    ADDED,
    ADDED_TABLES,
    APPLICATION_ID,
    COLUMNS,
    SCHEMA,
    SCHEMA_VERSION,
    JournalBusy,
    JournalIOError,
    check_file,
    check_integrity,
    check_schema,
    check_tables,
    describe_error,
    open_read_only,
)

# Built once: json.dumps() with separators builds a new encoder on every call.
_DUMPS = json.JSONEncoder(separators=(",", ":")).encode

COMMIT_S = 0.25  # the writer commits at least this often (a crash loses at most this, plus polling)
CHECKPOINT_S = 1.0  # the WAL is copied into the file this often (by its own thread)
WAL_LIMIT = 4 << 20  # the -wal file is truncated back to this after a checkpoint
SIZE_SLACK = 0.85  # size rotation frees down to this share of max_size
VACUUM_PAGES = 256  # pages given back to the file system per step (1 MiB at 4 KiB pages)
# Beyond this multiple of max_size (a storm outran the time-boxed rotation,
# or the recorder was starved of CPU), the limit wins over the time box:
# rotation and vacuum run until the file is back under the limit (the ring
# buffer holds the events that arrive meanwhile).
HARD_LIMIT = 1.5


def check_target(path: str) -> None:
    """Raise what JournalWriter would refuse about an existing file (not a
    journal, damaged, too new), without creating or changing anything: the
    recorder checks this before it loads probes, and creates the journal
    only once they run."""
    if not os.path.lexists(path) or check_file(path):
        return  # missing or empty: the writer will create it
    conn = open_read_only(path, [])
    try:
        version = check_schema(conn, path, allow_empty=True)
        if version:
            check_tables(conn, path, version)
    except (sqlite3.Error, UnicodeDecodeError) as exc:
        raise describe_error(path, exc) from None
    finally:
        conn.close()


# ---- the writer ---------------------------------------------------------------


class JournalWriter:
    """The recorder's side. Not thread-safe: one thread writes."""

    def __init__(self, path: str, max_size: int | None = None, retain: float | None = None) -> None:
        self.path = path
        self.max_size = max_size
        self.retain = retain
        self.session = 0
        self._lock_fd = -1
        self._conn: sqlite3.Connection | None = None
        self._open_rows: dict[SocketRecord, int] = {}  # this session's live socket states
        self._open_programs: dict[SeenProgram, int] = {}  # and program states
        self._last_snapshot = 0
        self._in_tx = False
        self._checkpointer: _Checkpointer | None = None
        self._next_wal_check = 0.0
        self._open()

    # -- opening

    def _open(self) -> None:
        path = self.path
        created = _create_private(path)
        empty = check_file(path)
        _tighten(path)
        # Held until after SQLite closes: closing any other descriptor of the
        # file would drop SQLite's own (POSIX) locks.
        self._lock_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = -1
            raise JournalBusy(f"another portscope record is writing to {path}") from None
        try:
            conn = sqlite3.connect(path, isolation_level=None, timeout=10)
            self._conn = conn
            version = check_schema(conn, path, allow_empty=True) if not (created or empty) else 0
            if version == 0:
                self._initialize()
            else:
                check_tables(conn, path, version)
                check_integrity(conn, path)
                self._migrate(version)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute(f"PRAGMA journal_size_limit = {WAL_LIMIT}")
            conn.execute("PRAGMA temp_store = MEMORY")
            # Checkpoints (copying the WAL into the file, with fsync) run on
            # a thread of their own, so that they never hold events back.
            conn.execute("PRAGMA wal_autocheckpoint = 0")
            self._checkpointer = _Checkpointer(path)
        except (sqlite3.Error, UnicodeDecodeError) as exc:
            self.close()
            raise describe_error(path, exc) from None
        except BaseException:
            self.close()
            raise

    def _migrate(self, version: int) -> None:
        """Bring an older journal to this schema: add the tables and columns added since."""
        if version >= SCHEMA_VERSION:
            return
        conn = self._db
        conn.execute("BEGIN")
        for table, added in sorted(ADDED_TABLES.items()):
            if added > version:
                for statement in SCHEMA.split(";"):
                    if f"CREATE TABLE {table} " in statement or f" ON {table}(" in statement:
                        conn.execute(statement.replace("CREATE TABLE ", "CREATE TABLE IF NOT EXISTS ")
                                     .replace("CREATE INDEX ", "CREATE INDEX IF NOT EXISTS "))
        for (table, column), added in sorted(ADDED.items()):
            present = {r[1] for r in conn.execute(f"PRAGMA table_info({table})").fetchall()}
            if added > version and column not in present:
                kind, _ = COLUMNS[table][column]
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")

    def _initialize(self) -> None:
        conn = self._db
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")  # before the first table
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("BEGIN")
        # One statement at a time: executescript() would commit on its own.
        for statement in SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.executemany("INSERT INTO meta(key, value) VALUES (?, ?)", [
            ("created", repr(time.time())), ("host", socket.gethostname()),
            ("creator", f"portscope {_version()}"),
        ])
        conn.execute("COMMIT")

    @property
    def _db(self) -> sqlite3.Connection:
        assert self._conn is not None, "journal is closed"
        return self._conn

    # -- sessions

    def start_session(self, plan: str, snapshot_interval: float) -> int:
        now = time.time()
        with self._write():
            # A recorder that was killed left its sockets open-ended: end
            # them at its last snapshot.
            for table in ("snapshot_sockets", "snapshot_programs"):
                self._db.execute(f"""
                    UPDATE {table} SET last_snapshot = COALESCE(
                        (SELECT max(s.id) FROM snapshots s WHERE s.session = {table}.session),
                         first_snapshot)
                    WHERE last_snapshot IS NULL""")
            cur = self._db.execute(
                "INSERT INTO sessions(started, last_seen, pid, host, version, plan, snapshot_interval)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (now, now, os.getpid(), socket.gethostname(), _version(), plan, snapshot_interval))
            self.session = int(cur.lastrowid or 0)
        return self.session

    def heartbeat(self, emitted: int, lost: int, untraced: int, unexplained: int) -> None:
        self._begin()
        self._db.execute(
            "UPDATE sessions SET last_seen = ?, emitted = ?, lost = ?, untraced = ?, unexplained = ?"
            " WHERE id = ?", (time.time(), emitted, lost, untraced, unexplained, self.session))

    def end_session(self) -> None:
        self._begin()
        if self._last_snapshot:
            for table in ("snapshot_sockets", "snapshot_programs"):
                self._db.execute(
                    f"UPDATE {table} SET last_snapshot = ? WHERE session = ? AND last_snapshot IS NULL",
                    (self._last_snapshot, self.session))
        self._open_rows.clear()
        self._open_programs.clear()
        now = time.time()
        self._db.execute("UPDATE sessions SET ended = ?, last_seen = ? WHERE id = ?",
                         (now, now, self.session))
        self.commit()

    # -- data

    def add_calls(self, calls: Sequence[tuple[CallEvent, Owner | None,
                                              EventExplanation | None]]) -> None:
        """Traced calls, each with its caller (as read when it was
        recorded, or None) and what was said of it on the spot (or None)."""
        if not calls:
            return
        rows = [ev.to_row(self.session, caller, explained, _DUMPS)
                for ev, caller, explained in calls]
        self._begin()
        self._guard(lambda: self._db.executemany(
            f"INSERT INTO events({', '.join(EVENT_COLUMNS)}) "
            f"VALUES ({', '.join('?' * len(EVENT_COLUMNS))})", rows))

    def add_snapshot(self, snap: RecordedSnapshot, programs: ProgramsSeen | None = None) -> int:
        """A snapshot, and the BPF programs it looked for and saw (None: it
        looked for none)."""
        self._begin()

        def write() -> int:
            db = self._db
            sid = int(db.execute(
                "INSERT INTO snapshots(session, time, duration, reason, sockets, health, programs)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (self.session, snap.time, snap.duration, snap.reason, len(snap.sockets),
                 _DUMPS(snap.health),
                 None if programs is None else _DUMPS(programs.snapshot_json()))).lastrowid or 0)
            self._open_rows = self._run_length(
                "snapshot_sockets", snap.sockets, self._open_rows,
                f"session, first_snapshot, {', '.join(SOCKET_COLUMNS)}",
                lambda s: (self.session, sid, *s.to_row(_DUMPS)))
            self._open_programs = self._run_length(
                "snapshot_programs", programs.programs if programs is not None else [],
                self._open_programs, "session, first_snapshot, kind, prog_id, program, holders",
                lambda p: (self.session, sid, *p.to_row(_DUMPS)))
            self._last_snapshot = sid
            return sid

        return self._guard(write)

    def _run_length(self, table: str, items: Sequence[Any], open_rows: dict[Any, int],
                    columns: str, values: Any) -> dict[Any, int]:
        """Write a snapshot's socket or program states run-length encoded: a
        state still open (seen by the previous snapshot) goes on at no cost,
        a new one gets a row, those gone end at the previous snapshot.
        Returns the states open now."""
        db = self._db
        still: dict[Any, int] = {}
        for item in items:
            if item in still:
                continue
            row = open_rows.pop(item, None)
            if row is None:
                row_values = values(item)
                row = int(db.execute(f"INSERT INTO {table}({columns}) VALUES "
                                     f"({', '.join('?' * len(row_values))})",
                                     row_values).lastrowid or 0)
            still[item] = row
        if open_rows:
            db.executemany(f"UPDATE {table} SET last_snapshot = ? WHERE id = ?",
                           [(self._last_snapshot, row) for row in open_rows.values()])
        return still

    def commit(self) -> None:
        if self._in_tx:
            self._guard(lambda: self._db.execute("COMMIT"))
            self._in_tx = False
            self._restart_wal()

    def _restart_wal(self) -> None:
        """The checkpointer thread copies the WAL into the file as it goes, but
        the WAL only starts over from its beginning after a checkpoint that
        caught up completely, which a writer that never pauses prevents: once
        a second, if the WAL has grown past WAL_LIMIT, finish the checkpoint
        here, between two transactions (little is left to copy by then)."""
        now = time.monotonic()
        if now < self._next_wal_check:
            return
        self._next_wal_check = now + 1.0
        try:
            if os.stat(self.path + "-wal").st_size <= WAL_LIMIT:
                return
        except OSError:
            return
        db = self._db
        try:
            db.execute("PRAGMA busy_timeout = 0")  # never wait for a reader (a report)
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.Error:
            pass  # busy: the next second
        finally:
            db.execute("PRAGMA busy_timeout = 10000")

    def _begin(self) -> None:
        if not self._in_tx:
            self._guard(lambda: self._db.execute("BEGIN"))
            self._in_tx = True

    class _Tx:
        def __init__(self, writer: "JournalWriter") -> None:
            self.writer = writer

        def __enter__(self) -> None:
            self.writer._begin()

        def __exit__(self, exc_type: object, *_: object) -> None:
            if exc_type is None:
                self.writer.commit()

    def _write(self) -> "JournalWriter._Tx":
        return JournalWriter._Tx(self)

    def _guard(self, fn: Any) -> Any:
        try:
            return fn()
        except sqlite3.Error as exc:
            raise JournalIOError(f"writing the journal {self.path} failed: {exc}") from exc

    # -- bounds

    def used_bytes(self) -> int:
        """Bytes of the file holding data (free pages excluded)."""
        db = self._db
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        free = db.execute("PRAGMA freelist_count").fetchone()[0]
        return (pages - free) * db.execute("PRAGMA page_size").fetchone()[0]

    def file_bytes(self) -> int:
        db = self._db
        return db.execute("PRAGMA page_count").fetchone()[0] * db.execute("PRAGMA page_size").fetchone()[0]

    def rotate(self, now: float | None = None, budget_s: float = 0.1) -> int:
        """Drop the oldest data past the age or size limit, within about
        ``budget_s`` seconds (the rest waits for the next call), then give
        free pages back. Commits what was pending first. Returns the number
        of events dropped."""
        self.commit()
        now = time.time() if now is None else now
        deadline = time.monotonic() + budget_s
        dropped = 0
        if self.retain:
            while True:
                n, more = self._drop_before(now - self.retain)
                dropped += n
                if not more or time.monotonic() >= deadline:
                     break
        if self.max_size and self.used_bytes() > self.max_size:
            # Over the limit: free down to SIZE_SLACK of it, oldest first, a
            # slice at a time (at least one, however long the rest took).
            deadline = max(deadline, time.monotonic() + budget_s / 2)
            hard = self.file_bytes() > self.max_size * HARD_LIMIT
            while self.used_bytes() > self.max_size * SIZE_SLACK:
                cut = self._oldest_share(0.05)
                if cut is None:
                     break
                n, _ = self._drop_before(cut)
                dropped += n
                if time.monotonic() >= deadline and not hard:
                     break
        self._vacuum_step()
        while self.max_size and self.file_bytes() > self.max_size * HARD_LIMIT:
            before = self.file_bytes()
            self._vacuum_step()
            if self.file_bytes() >= before:
                break  # nothing left to give back
        return dropped

    def _oldest_share(self, share: float) -> float | None:
        """A time before which lie about ``share`` of the events or of the
        snapshots (whichever reaches further): events and snapshots go
        together, so that what is left covers one period of time."""
        db = self._db
        cuts = []
        for table, keep in (("events", 0), ("snapshots", 1)):
            low, high = db.execute(f"SELECT min(id), max(id) FROM {table}").fetchone()
            if low is None or high - low < keep:
                continue
            k = low + max(1, int((high - low + 1) * share)) - 1
            row = db.execute(f"SELECT time FROM {table} WHERE id >= ? ORDER BY id LIMIT 1", (k,)).fetchone()
            if row:
                cuts.append(row[0])
        return max(cuts) + 1e-6 if cuts else None

    def _drop_before(self, cut: float, chunk: int = 5000) -> tuple[int, bool]:
        """One transaction: drop up to ``chunk`` events and snapshots older
        than ``cut`` (never the latest snapshot). Returns (events dropped,
        whether more is left to drop)."""
        db = self._db
        with self._write():
            ev = db.execute("DELETE FROM events WHERE id IN (SELECT id FROM events WHERE time < ? "
                            "ORDER BY id LIMIT ?)", (cut, chunk)).rowcount
            sn = db.execute("DELETE FROM snapshots WHERE id IN (SELECT id FROM snapshots WHERE "
                            "time < ? AND id < (SELECT max(id) FROM snapshots) ORDER BY id LIMIT ?)",
                            (cut, chunk)).rowcount
            if sn:
                oldest = db.execute("SELECT min(id) FROM snapshots").fetchone()[0]
                db.execute("DELETE FROM snapshot_sockets WHERE last_snapshot < ?", (oldest or 0,))
                db.execute("DELETE FROM snapshot_programs WHERE last_snapshot < ?", (oldest or 0,))
            if ev or sn:
                db.execute("""DELETE FROM sessions WHERE ended IS NOT NULL AND id != ?
                     AND NOT EXISTS (SELECT 1 FROM events e WHERE e.session = sessions.id)
                     AND NOT EXISTS (SELECT 1 FROM snapshots s WHERE s.session = sessions.id)""",
                           (self.session,))
        return ev, ev == chunk or sn == chunk

    def _vacuum_step(self) -> None:
        """While the file is larger than ``max_size``, give up to VACUUM_PAGES
        free pages back to the file system (a step at a time: each moved page
        goes through the WAL). Below it, free pages are left for new rows."""
        if not self.max_size or self.file_bytes() <= self.max_size:
            return
        free = self._db.execute("PRAGMA freelist_count").fetchone()[0]
        if free:
            # executescript steps the pragma to its end; execute() would step
            # it once, which frees one page.
            self._guard(lambda: self._db.executescript(f"PRAGMA incremental_vacuum({VACUUM_PAGES});"))

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
            self._checkpointer = None
        if self._conn is not None:
            try:
                if self._in_tx:
                     self._conn.execute("COMMIT")
                     self._in_tx = False
            except sqlite3.Error:
                pass
            self._conn.close()
            self._conn = None
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


class _Checkpointer:
    """Copies the WAL into the database file every CHECKPOINT_S seconds, on
    its own thread and connection (the writer's commits never fsync)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="portscope-checkpoint", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        try:
            conn = sqlite3.connect(self.path, timeout=1)
        except sqlite3.Error:
            return
        try:
            while not self._stop.wait(CHECKPOINT_S):
                try:
                     conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error:
                     pass  # busy or failing: the next round (or the writer's close) catches up
        finally:
            conn.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def _create_private(path: str) -> bool:
    """Create the file mode 0600 (its directory 0700) if missing; True if created."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return False
    except OSError as exc:
        raise JournalIOError(f"cannot create the journal {path}: {exc.strerror}") from None
    os.close(fd)
    return True


def _tighten(path: str) -> None:
    """An existing journal (and its -wal/-shm) readable by others: make it 0600."""
    for p in (path, path + "-wal", path + "-shm"):
        try:
            mode = os.stat(p).st_mode
            if mode & 0o077:
                os.chmod(p, stat.S_IMODE(mode) & 0o600)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise JournalIOError(f"cannot make the journal {p} private (mode 0600): {exc.strerror}") from None


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("portscope")
    except Exception:  # not installed: running from the source tree
        return "0+unknown"
