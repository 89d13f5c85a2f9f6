"""The journal's file format: its schema and version, the errors that name a
bad file, the codecs between records and rows, and the checks that a file
is a journal this portscope can read."""

from __future__ import annotations

import json
import math
import os
import re
import sqlite3
import stat
from typing import Any, Sequence

from ..errors import ExitStatus, PermissionDenied, PortscopeError, UsageError
from ..text import system_text

SCHEMA_VERSION = 3
# Columns a later schema added, and the version that added them: an older
# journal lacks them (its rows read as NULL there), and a recorder that
# appends to it adds them first (schema 2: the explanation of a failure;
# schema 3: the BPF programs a snapshot looked for).
ADDED = {("events", "explanation"): 2, ("snapshots", "programs"): 3}
# Tables a later schema added: an older journal has none (it reads as
# empty), and a recorder that appends to it creates them first.
ADDED_TABLES = {"snapshot_programs": 3}
APPLICATION_ID = 0x50534A31  # "PSJ1"
SQLITE_MAGIC = b"SQLite format 3\x00"


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
    health TEXT NOT NULL,            -- JSON: namespaces gone and unreadable processes
    programs TEXT                    -- JSON {scanned, problems} (schema 3), NULL: none looked for
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
    group_id INTEGER,                -- reuseport group (sockflags.group_id: the same in every session)
    group_size INTEGER,
    group_bpf INTEGER,               -- a reuseport BPF program steers the group
    owners TEXT NOT NULL             -- JSON list: pid, comm, exe, cmdline, uid, user, cgroup, ...
);
CREATE INDEX snapshot_sockets_first ON snapshot_sockets(first_snapshot);
CREATE INDEX snapshot_sockets_last ON snapshot_sockets(last_snapshot);
CREATE INDEX snapshot_sockets_port ON snapshot_sockets(netns, port);

CREATE TABLE snapshot_programs (
    id INTEGER PRIMARY KEY,
    session INTEGER NOT NULL,
    first_snapshot INTEGER NOT NULL,
    last_snapshot INTEGER,           -- NULL: still there at its session's last snapshot
    kind TEXT NOT NULL,              -- sk_lookup, connect4, bind6, ... (tracer.netprogs)
    prog_id INTEGER NOT NULL,
    program TEXT NOT NULL,           -- JSON: NetProgram.to_json() (name, tag, netns or cgroup, link)
    holders TEXT NOT NULL            -- JSON list: pid, comm, exe of the processes holding its fds
);
CREATE INDEX snapshot_programs_last ON snapshot_programs(last_snapshot);
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
                ("snapshot_sockets", "owners"): list, ("snapshots", "health"): dict,
                ("snapshots", "programs"): dict, ("snapshot_programs", "program"): dict,
                ("snapshot_programs", "holders"): list}


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


def describe_error(path: str, exc: Exception) -> JournalError:
    if isinstance(exc, UnicodeDecodeError):  # SQLite's own schema or message is not text
        return JournalDamaged(f"{path} is damaged (its schema holds bytes that are not text); "
                              "move it aside and start a new journal")
    text = str(exc)
    if "not a database" in text:
        return NotAJournal(f"{path} is not a portscope journal (not an SQLite database)")
    if "malformed" in text or "corrupt" in text:
        return JournalDamaged(f"{path} is damaged ({text}); move it aside and start a new journal")
    return JournalError(f"cannot read the journal {path}: {text}")


def check_schema(conn: sqlite3.Connection, path: str, allow_empty: bool) -> int:
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


def check_integrity(conn: sqlite3.Connection, path: str) -> None:
    rows = conn.execute("PRAGMA quick_check").fetchall()
    if rows != [("ok",)]:
        detail = rows[0][0] if rows else "no answer"
        raise JournalDamaged(f"{path} is damaged ({detail}); move it aside and start a new journal")


def open_read_only(path: str, notes: list[str]) -> sqlite3.Connection:
    """A connection that reads and never writes. A WAL-mode journal read with
    mode=ro still makes SQLite create ``-wal`` and ``-shm`` files (and fail
    where it cannot). Without a ``-wal`` file beside it (no recorder writing,
    or one that closed cleanly) everything is in the file itself, which is
    opened immutable: no lock, no side file. With one, a recorder is writing
    (or was killed): the WAL must be read, through its existing ``-shm``."""
    where = "file:" + quote_path(os.path.abspath(path))
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
        raise describe_error(path, exc) from None


def check_tables(conn: sqlite3.Connection, path: str, version: int = SCHEMA_VERSION) -> None:
    """Every table and column of the file's schema version is there (a
    damaged or edited journal may lack some): one sentence naming the first
    that is not."""
    for table, columns in COLUMNS.items():
        if ADDED_TABLES.get(table, 0) > version:
            continue  # an older journal: it never had this table
        present = {r[1] for r in conn.execute(f"PRAGMA table_info({table})").fetchall()}
        if not present:
            raise JournalDamaged(f"{path} is damaged: it has no {table} table; move it aside "
                                 "and start a new journal")
        missing = [c for c in columns if c not in present and ADDED.get((table, c), 0) <= version]
        if missing:
            raise JournalDamaged(f"{path} is damaged: its {table} table lacks the column(s) "
                                 f"{', '.join(missing)}; move it aside and start a new journal")


_PY_TYPES = {"INTEGER": int, "REAL": float, "TEXT": str}


def is_kind(value: Any, kind: type) -> bool:
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
        elif not is_kind(value, _PY_TYPES[kind]):
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


def quote_path(path: str) -> str:
    from urllib.parse import quote

    return quote(path)
