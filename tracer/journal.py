"""The journal: a durable record of bind()/listen() activity and of who held
which port, for postmortems (``portscope record`` writes it, ``portscope
report`` reads it).

One SQLite file in WAL mode, so that a reader (``report``) never blocks the
writer and a writer killed at any moment (``kill -9``, power loss) leaves a
consistent file: every committed transaction is whole, the uncommitted tail
is rolled back on the next open. The writer commits at least every
``COMMIT_S`` seconds, which bounds what a crash can lose.

Schema (``PRAGMA user_version`` is the schema version, ``PRAGMA
application_id`` marks the file as a portscope journal):

* ``meta(key, value)``: created, host, creator;
* ``sessions``: one row per run of the recorder: start, clean end (NULL when
  it was killed), last heartbeat, probe plan, and the kernel-side counters
  (events emitted, lost because the ring buffer was full, untraced);
* ``events``: every bind/listen/connect failure and every bind/listen
  success and listener close, with the fields of ``CallEvent.to_json()`` as
  columns and the whole JSON object, the on-the-spot explanation of an
  EADDRINUSE (``blockers``, JSON) and the caller's executable, cgroup and
  command line read when the event was recorded;
* ``snapshots``: a periodic (and event-triggered) inventory of listeners,
  UDP sockets and bound sockets (never connections);
* ``snapshot_sockets``: what those snapshots saw, run-length encoded: one row
  per distinct socket state (address, options, reuseport group, owners),
  valid from ``first_snapshot`` to ``last_snapshot`` (NULL: until the last
  snapshot of its session). A socket that does not change costs nothing per
  snapshot.

The file is created mode 0600 before SQLite opens it (it holds command lines)
and kept bounded: the oldest data goes once the file exceeds ``max_size`` or
is older than ``retain`` (``auto_vacuum=INCREMENTAL`` gives the pages back).

Opening validates the file first and turns every bad file into one sentence
(exit status 2): not SQLite, truncated, damaged, another application's
database, or a newer schema than this portscope reads.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import socket
import sqlite3
import stat
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from .errors import ExitStatus, PermissionDenied, PortscopeError, UsageError
from .text import system_text

SCHEMA_VERSION = 2
# Columns a later schema added, and the version that added them: an older
# journal lacks them (its rows read as NULL there), and a recorder that
# appends to it adds them first (schema 2: the explanation of a failure).
ADDED = {("events", "explanation"): 2}
APPLICATION_ID = 0x50534A31  # "PSJ1"
SQLITE_MAGIC = b"SQLite format 3\x00"

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


# ---- errors: one sentence each ---------------------------------------------


class JournalError(UsageError):
    """A file that cannot be used as a journal (exit status 2)."""


class JournalMissing(JournalError):
    pass


class NotAJournal(JournalError):
    pass


class JournalTruncated(JournalError):
    pass


class JournalDamaged(JournalError):
    pass


class JournalTooNew(JournalError):
    pass


class JournalBusy(PortscopeError):
    """Another recorder writes to the same file."""

    status = ExitStatus.ERROR


class JournalIOError(PortscopeError):
    """The journal could not be written (disk full, read-only file system)."""

    status = ExitStatus.ERROR


# ---- schema ------------------------------------------------------------------

EVENT_COLUMNS = (
    "session", "time", "call", "result", "errno", "pid", "tid", "uid", "sock_uid", "comm",
    "cgroup_id", "netns", "family", "protocol", "addr_family", "addr", "port", "bound_addr",
    "bound_port", "options", "bound_dev_if", "inode", "plan", "addr_unreadable", "get_port",
    "exe", "cgroup", "cmdline", "owner_uid", "blockers", "explanation", "json",
)

SOCKET_COLUMNS = (
    "netns", "protocol", "family", "state", "addr", "port", "bound_dev_if", "uid", "inode",
    "cookie", "options", "group_id", "group_size", "group_bpf", "owners",
)

SCHEMA = """
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;

CREATE TABLE sessions (
    id INTEGER PRIMARY KEY,
    started REAL NOT NULL,
    ended REAL,                      -- NULL: the recorder did not stop cleanly
    last_seen REAL NOT NULL,         -- last commit (heartbeat)
    pid INTEGER NOT NULL,
    host TEXT NOT NULL,
    version TEXT NOT NULL,
    plan TEXT NOT NULL,
    snapshot_interval REAL NOT NULL,
    emitted INTEGER NOT NULL DEFAULT 0,
    lost INTEGER NOT NULL DEFAULT 0,        -- ring buffer full
    untraced INTEGER NOT NULL DEFAULT 0,    -- too many calls in flight
    unexplained INTEGER NOT NULL DEFAULT 0  -- EADDRINUSE recorded without blockers
);

CREATE TABLE events (
    id INTEGER PRIMARY KEY,
    session INTEGER NOT NULL,
    time REAL NOT NULL,
    call TEXT NOT NULL,
    result TEXT NOT NULL,
    errno INTEGER NOT NULL,
    pid INTEGER NOT NULL,
    tid INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    sock_uid INTEGER NOT NULL,
    comm TEXT NOT NULL,
    cgroup_id INTEGER NOT NULL,
    netns INTEGER NOT NULL,
    family TEXT NOT NULL,
    protocol TEXT NOT NULL,
    addr_family TEXT NOT NULL,
    addr TEXT NOT NULL,
    port INTEGER NOT NULL,
    bound_addr TEXT NOT NULL,
    bound_port INTEGER NOT NULL,
    options TEXT NOT NULL,           -- comma-separated, as in the JSON list
    bound_dev_if INTEGER NOT NULL,
    inode INTEGER NOT NULL,
    plan TEXT NOT NULL,
    addr_unreadable INTEGER NOT NULL,
    get_port TEXT,
    exe TEXT,                        -- the caller, read when recorded (NULL: already gone)
    cgroup TEXT,
    cmdline TEXT,
    owner_uid INTEGER,               -- the caller's effective uid
    blockers TEXT,                   -- JSON: on-the-spot blockers of an EADDRINUSE
    explanation TEXT,                -- JSON: errno, reasons, fixes, notes (schema 2)
    json TEXT NOT NULL               -- CallEvent.to_json()
);
CREATE INDEX events_time ON events(time);
CREATE INDEX events_port ON events(netns, port, time);
CREATE INDEX events_inode ON events(inode);

CREATE TABLE snapshots (
    id INTEGER PRIMARY KEY,
    session INTEGER NOT NULL,
    time REAL NOT NULL,              -- when the inventory started
    duration REAL NOT NULL,          -- how long it took
    reason TEXT NOT NULL,            -- periodic | event | final
    sockets INTEGER NOT NULL,
    health TEXT NOT NULL             -- JSON: namespaces gone, unreadable processes, ...
);
CREATE INDEX snapshots_time ON snapshots(time);

CREATE TABLE snapshot_sockets (
    id INTEGER PRIMARY KEY,
    session INTEGER NOT NULL,
    first_snapshot INTEGER NOT NULL,
    last_snapshot INTEGER,           -- NULL: still there at its session's last snapshot
    netns INTEGER NOT NULL,
    protocol TEXT NOT NULL,
    family TEXT NOT NULL,
    state TEXT NOT NULL,
    addr TEXT NOT NULL,
    port INTEGER NOT NULL,
    bound_dev_if INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    inode INTEGER NOT NULL,
    cookie INTEGER NOT NULL,
    options TEXT,                    -- NULL: no iterator saw its flags
    group_id INTEGER,                -- reuseport group, opaque, per session
    group_size INTEGER,
    group_bpf INTEGER,               -- a reuseport BPF program steers the group
    owners TEXT NOT NULL             -- JSON list: pid, comm, exe, cmdline, uid, user, cgroup, ...
);
CREATE INDEX snapshot_sockets_first ON snapshot_sockets(first_snapshot);
CREATE INDEX snapshot_sockets_last ON snapshot_sockets(last_snapshot);
CREATE INDEX snapshot_sockets_port ON snapshot_sockets(netns, port);
"""


def _schema_columns(schema: str) -> dict[str, dict[str, tuple[str, bool]]]:
    """table -> column -> (declared type, nullable), read from SCHEMA itself,
    so that the reader's checks can never drift from what the writer creates."""
    tables: dict[str, dict[str, tuple[str, bool]]] = {}
    for name, body in re.findall(r"CREATE TABLE (\w+) \((.*?)\n\)", schema, re.S):
        columns = {}
        for line in body.splitlines():
            words = line.split("--")[0].replace(",", " ").split()
            if len(words) >= 2 and words[1] in ("INTEGER", "REAL", "TEXT"):
                columns[words[0]] = (words[1], "NOT NULL" not in " ".join(words[2:])
                                     and "PRIMARY" not in words[2:])
        tables[name] = columns
    return tables


COLUMNS = _schema_columns(SCHEMA)
# Columns that hold JSON, and the shape each must have.
JSON_COLUMNS = {("events", "json"): dict, ("events", "blockers"): (list, dict),
                ("events", "explanation"): dict,
                ("snapshot_sockets", "owners"): list, ("snapshots", "health"): dict}


# ---- what the recorder hands to the writer ------------------------------------


@dataclass(frozen=True)
class SnapshotSocket:
    """One socket as a snapshot keeps it (hashable: equal rows are one state)."""

    netns: int
    protocol: str
    family: str
    state: str
    addr: str
    port: int
    bound_dev_if: int
    uid: int
    inode: int
    cookie: int
    options: str | None
    group_id: int | None
    group_size: int | None
    group_bpf: int | None
    owners: str  # JSON

    def values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, c) for c in SOCKET_COLUMNS)


@dataclass
class Snapshot:
    time: float
    duration: float
    reason: str
    sockets: list[SnapshotSocket]
    health: dict[str, int]


# Built once: json.dumps() with separators builds a new encoder on every call.
_dumps = json.JSONEncoder(separators=(",", ":")).encode

OWNER_KEYS = ("pid", "comm", "exe", "cmdline", "uid", "user", "cgroup", "unit", "container")


def sql_text(value: str | None) -> str | bytes | None:
    """A text value as SQLite can store it exactly. Text read from the host
    keeps bytes that are not UTF-8 as surrogates (tracer.text.system_text),
    which SQLite's UTF-8 TEXT cannot hold: such a value is stored as a BLOB
    of its exact bytes, and the reader turns it back into the same text."""
    if value is None:
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogateescape")
    return value


def snapshot_socket(sock: Any) -> SnapshotSocket:
    """From an inventory.Socket."""
    d, f = sock.diag, sock.flags
    owners = [{k: getattr(o, k) for k in OWNER_KEYS} for o in sorted(sock.owners, key=lambda o: o.pid)]
    grouped = bool(f and f.group)
    return SnapshotSocket(
        netns=d.netns, protocol=d.protocol, family=d.family, state=d.state,
        addr=d.local_addr, port=d.local_port, bound_dev_if=d.bound_dev_if, uid=d.uid,
        inode=d.inode, cookie=d.cookie,
        options=",".join(sorted(f.options)) if f else None,
        group_id=f.group if grouped else None,
        group_size=f.group_size if grouped else None,
        group_bpf=int(f.group_bpf_prog) if grouped else None,
        owners=json.dumps(owners, separators=(",", ":")),
    )


def event_row(session: int, ev: Any, owner: Any, explained: Any) -> tuple[Any, ...]:
    """An ``events`` row from a CallEvent, the caller as owners.Owner (or None)
    and the on-the-spot explanation (records.EventExplanation, or None)."""
    doc = ev.to_json()
    readable = owner is not None and owner.readable
    return (
        session, ev.time, ev.call, doc["result"], ev.errno, ev.pid, ev.tid, ev.uid, ev.sock_uid,
        sql_text(ev.comm), ev.cgroup_id, ev.netns, ev.family, ev.protocol, ev.addr_family, ev.addr,
        ev.port, ev.bound_addr, ev.bound_port, ",".join(doc["options"]), ev.options.bound_dev_if,
        ev.inode, ev.plan, int(ev.addr_unreadable), ev.get_port,
        sql_text(owner.exe) if readable else None, sql_text(owner.cgroup) if readable else None,
        sql_text(owner.cmdline) if readable else None, owner.uid if readable else None,
        None if explained is None else _dumps(explained.blockers_json()),
        None if explained is None else _dumps(explained.to_json()),
        _dumps(doc),
    )


# ---- validating a file ------------------------------------------------------


def check_file(path: str) -> bool:
    """Raise the one JournalError that describes what is wrong with ``path``
    as an SQLite file; True when it is an empty file (a journal not yet
    started). Reads the 100-byte SQLite header only."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise JournalMissing(f"there is no journal at {path}") from None
    except OSError as exc:
        raise JournalError(f"cannot read the journal {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise NotAJournal(f"{path} is not a regular file, so not a portscope journal")
    if st.st_size == 0:
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(100)
    except PermissionError:
        raise PermissionDenied(f"the journal {path} is readable by its owner only (it holds "
                               "command lines): run portscope as root") from None
    except OSError as exc:
        raise JournalError(f"cannot read the journal {path}: {exc.strerror}") from None
    if not (head.startswith(SQLITE_MAGIC) or SQLITE_MAGIC.startswith(head)):
        raise NotAJournal(f"{path} is not a portscope journal (not an SQLite database)")
    if len(head) < 100:
        raise JournalTruncated(f"{path} is truncated: only {st.st_size} bytes, less than an "
                               "SQLite header")
    page_size = int.from_bytes(head[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    if page_size < 512 or page_size & (page_size - 1):
        raise JournalDamaged(f"{path} is damaged: its SQLite header is invalid")
    if st.st_size % page_size:
        raise JournalTruncated(f"{path} is truncated: {st.st_size} bytes is not a whole number "
                               f"of {page_size}-byte pages")
    pages = int.from_bytes(head[28:32], "big")
    if head[24:28] == head[92:96] and pages * page_size > st.st_size:
        raise JournalTruncated(f"{path} is truncated: it has {st.st_size} bytes of the "
                               f"{pages * page_size} its header declares")
    return False


def _describe(path: str, exc: Exception) -> JournalError:
    if isinstance(exc, UnicodeDecodeError):  # SQLite's own schema or message is not text
        return JournalDamaged(f"{path} is damaged (its schema holds bytes that are not text); "
                              "move it aside and start a new journal")
    text = str(exc)
    if "not a database" in text:
        return NotAJournal(f"{path} is not a portscope journal (not an SQLite database)")
    if "malformed" in text or "corrupt" in text:
        return JournalDamaged(f"{path} is damaged ({text}); move it aside and start a new journal")
    return JournalError(f"cannot read the journal {path}: {text}")


def _check_schema(conn: sqlite3.Connection, path: str, allow_empty: bool) -> int:
    """The file's schema version, after checking that it is ours."""
    app = conn.execute("PRAGMA application_id").fetchone()[0]
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    if app == 0 and version == 0 and tables == 0:
        if allow_empty:
            return 0
        raise NotAJournal(f"{path} is an empty database, not a portscope journal")
    if app != APPLICATION_ID:
        raise NotAJournal(f"{path} is an SQLite database but not a portscope journal")
    if version > SCHEMA_VERSION:
        raise JournalTooNew(
            f"{path} was written by a newer portscope (journal schema {version}; this portscope "
            f"reads schema {SCHEMA_VERSION} and older): read it with a newer portscope")
    if version < 1:
        raise NotAJournal(f"{path} is not a portscope journal (no schema version)")
    return version


def _integrity(conn: sqlite3.Connection, path: str) -> None:
    rows = conn.execute("PRAGMA quick_check").fetchall()
    if rows != [("ok",)]:
        detail = rows[0][0] if rows else "no answer"
        raise JournalDamaged(f"{path} is damaged ({detail}); move it aside and start a new journal")


def check_target(path: str) -> None:
    """Raise what JournalWriter would refuse about an existing file (not a
    journal, damaged, too new), without creating or changing anything: the
    recorder checks this before it loads probes, and creates the journal
    only once they run."""
    if not os.path.lexists(path) or check_file(path):
        return  # missing or empty: the writer will create it
    conn = _open_read_only(path, [])
    try:
        version = _check_schema(conn, path, allow_empty=True)
        if version:
            _check_tables(conn, path, version)
    except (sqlite3.Error, UnicodeDecodeError) as exc:
        raise _describe(path, exc) from None
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
        self._open_rows: dict[SnapshotSocket, int] = {}  # this session's live socket states
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
            version = _check_schema(conn, path, allow_empty=True) if not (created or empty) else 0
            if version == 0:
                self._initialize()
            else:
                _check_tables(conn, path, version)
                _integrity(conn, path)
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
            raise _describe(path, exc) from None
        except BaseException:
            self.close()
            raise

    def _migrate(self, version: int) -> None:
        """Bring an older journal to this schema: add the columns added since."""
        if version >= SCHEMA_VERSION:
            return
        conn = self._db
        conn.execute("BEGIN")
        for (table, column), added in sorted(ADDED.items()):
            if added > version:
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
            self._db.execute("""
                UPDATE snapshot_sockets SET last_snapshot = COALESCE(
                    (SELECT max(s.id) FROM snapshots s WHERE s.session = snapshot_sockets.session),
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
            self._db.execute(
                "UPDATE snapshot_sockets SET last_snapshot = ? WHERE session = ? AND last_snapshot IS NULL",
                (self._last_snapshot, self.session))
        self._open_rows.clear()
        now = time.time()
        self._db.execute("UPDATE sessions SET ended = ?, last_seen = ? WHERE id = ?",
                         (now, now, self.session))
        self.commit()

    # -- data

    def add_events(self, rows: Sequence[tuple[Any, ...]]) -> None:
        if not rows:
            return
        self._begin()
        self._guard(lambda: self._db.executemany(
            f"INSERT INTO events({', '.join(EVENT_COLUMNS)}) "
            f"VALUES ({', '.join('?' * len(EVENT_COLUMNS))})", rows))

    def add_snapshot(self, snap: Snapshot) -> int:
        self._begin()

        def write() -> int:
            db = self._db
            sid = int(db.execute(
                "INSERT INTO snapshots(session, time, duration, reason, sockets, health)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (self.session, snap.time, snap.duration, snap.reason, len(snap.sockets),
                 json.dumps(snap.health, separators=(",", ":")))).lastrowid or 0)
            still: dict[SnapshotSocket, int] = {}
            for s in snap.sockets:
                if s in still:
                    continue
                row = self._open_rows.pop(s, None)
                if row is None:
                    row = int(db.execute(
                        f"INSERT INTO snapshot_sockets(session, first_snapshot, {', '.join(SOCKET_COLUMNS)})"
                        f" VALUES (?, ?, {', '.join('?' * len(SOCKET_COLUMNS))})",
                        (self.session, sid, *s.values())).lastrowid or 0)
                still[s] = row
            if self._open_rows:
                db.executemany("UPDATE snapshot_sockets SET last_snapshot = ? WHERE id = ?",
                               [(self._last_snapshot, row) for row in self._open_rows.values()])
            self._open_rows = still
            self._last_snapshot = sid
            return sid

        return self._guard(write)

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


# ---- the reader -----------------------------------------------------------------


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
        self.conn = _open_read_only(path, self.notes)
        try:
            self.conn.text_factory = system_text  # a forged TEXT that is not UTF-8
            self.version = _check_schema(self.conn, path, allow_empty=False)
            _check_tables(self.conn, path, self.version)
            if check:
                _integrity(self.conn, path)
        except (sqlite3.Error, UnicodeDecodeError) as exc:
            self.conn.close()
            raise _describe(path, exc) from None
        except BaseException:
            self.conn.close()
            raise
        self.conn.row_factory = sqlite3.Row

    def query(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        try:
            return self.conn.execute(sql, tuple(params)).fetchall()
        except (sqlite3.DatabaseError, OverflowError, UnicodeDecodeError) as exc:
            raise _describe(self.path, exc) from None

    def rows(self, table: str, where: str = "", params: Iterable[Any] = (),
             order: str = "id", columns: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Rows of ``table`` (``where`` and ``order`` are SQL of the caller,
        ``params`` its values), each a dict with the declared types and the
        JSON columns decoded; damaged rows are counted, not returned."""
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
        return value if _is_kind(value, kind) else None

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


def _open_read_only(path: str, notes: list[str]) -> sqlite3.Connection:
    """A connection that reads and never writes. A WAL-mode journal read with
    mode=ro still makes SQLite create ``-wal`` and ``-shm`` files (and fail
    where it cannot). Without a ``-wal`` file beside it (no recorder writing,
    or one that closed cleanly) everything is in the file itself, which is
    opened immutable: no lock, no side file. With one, a recorder is writing
    (or was killed): the WAL must be read, through its existing ``-shm``."""
    where = "file:" + _quote(os.path.abspath(path))
    has_wal = os.path.exists(path + "-wal")
    try:
        if not has_wal:
            return sqlite3.connect(where + "?immutable=1", uri=True)
        conn = sqlite3.connect(where + "?mode=ro", uri=True, timeout=10)
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            return conn
        except (sqlite3.OperationalError, UnicodeDecodeError):
            conn.close()
        notes.append("the journal's write-ahead log could not be read (no write access "
                     "beside it): what was recorded since its last checkpoint (about the "
                     "last second) is not shown")
        return sqlite3.connect(where + "?immutable=1", uri=True)
    except (sqlite3.Error, UnicodeDecodeError) as exc:
        raise _describe(path, exc) from None


def _check_tables(conn: sqlite3.Connection, path: str, version: int = SCHEMA_VERSION) -> None:
    """Every table and column of the file's schema version is there (a
    damaged or edited journal may lack some): one sentence naming the first
    that is not."""
    for table, columns in COLUMNS.items():
        present = {r[1] for r in conn.execute(f"PRAGMA table_info({table})").fetchall()}
        if not present:
            raise JournalDamaged(f"{path} is damaged: it has no {table} table; move it aside "
                                 "and start a new journal")
        missing = [c for c in columns if c not in present and ADDED.get((table, c), 0) <= version]
        if missing:
            raise JournalDamaged(f"{path} is damaged: its {table} table lacks the column(s) "
                                 f"{', '.join(missing)}; move it aside and start a new journal")


_PY_TYPES = {"INTEGER": int, "REAL": float, "TEXT": str}


def _is_kind(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) \
            and math.isfinite(value) and abs(value) < 1e15
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool) and -(1 << 63) <= value < 1 << 64
    return isinstance(value, kind)


def typed_row(table: str, columns: Sequence[str], values: Sequence[Any]) -> dict[str, Any] | None:
    """``values`` as the schema declares them, or None when one is not: the
    wrong type, NULL where the schema forbids it, a time that is not a
    finite number of seconds, JSON that does not parse or has another shape.
    Text stored as a BLOB (bytes that were not UTF-8, see sql_text) comes
    back as the text it was."""
    declared = COLUMNS[table]
    row: dict[str, Any] = {}
    for name, value in zip(columns, values):
        kind, nullable = declared[name]
        if isinstance(value, bytes) and kind == "TEXT":
            value = system_text(value)
        if value is None:
            if not nullable:
                return None
        elif not _is_kind(value, _PY_TYPES[kind]):
            return None
        shape = JSON_COLUMNS.get((table, name))
        if shape is not None and value is not None:
            try:
                value = json.loads(value)
            except (ValueError, RecursionError):
                return None
            if not isinstance(value, shape):
                return None
        row[name] = float(value) if kind == "REAL" and value is not None else value
    return row


def _quote(path: str) -> str:
    from urllib.parse import quote

    return quote(path)
