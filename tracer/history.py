"""The journal's contents as the hijack rules and the timeline see them:
snapshot rows, events and the history that joins them, read through the
journal's named reads and checked once here (a row the rules cannot use is
left out and counted like the reader's own damaged rows)."""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

from .journal import JournalReader
from .journal.programs import SeenProgram, scanned_classes
from .records import EventExplanation, RecordedCall, SocketRecord
from .text import clock_text

CONTEXT_S = 300.0  # read this far before --since: the rules need what came before
WILDCARDS = ("0.0.0.0", "::")


# ---- the journal's contents, as the rules see them ---------------------------------


@dataclass(frozen=True)
class Snap:
    id: int
    session: int
    time: float  # the inventory started
    end: float  # and ended: what it saw existed somewhere in [time, end]
    scanned: frozenset[str] | None = None  # the program classes it looked for (None: none)


@dataclass(frozen=True, eq=False)
class Row(SocketRecord):
    """A socket state (a SocketRecord) seen by the snapshots first..last
    (inclusive). Rows are told apart by identity: the same state can be
    seen in two sessions, and each is its own row."""

    id: int = 0
    session: int = 0
    first: int = 0
    last: int = 0

    __eq__ = object.__eq__
    __hash__ = object.__hash__


@dataclass(frozen=True, eq=False)
class ProgRow:
    """A BPF program state (a SeenProgram) seen by the snapshots first..last."""

    seen: SeenProgram
    id: int
    session: int
    first: int
    last: int


class History:
    """Events and snapshots loaded from the journal, indexed for the rules.

    Rows come through :meth:`JournalReader.rows` (types checked); what the
    rules further rely on (addresses that parse, owners with a pid) is
    checked here, and a row that fails is left out and counted like the
    reader's own damaged rows."""

    def __init__(self, reader: JournalReader, start: float | None, port: int | None,
                 netns: int | None) -> None:
        # Snapshots and events: from CONTEXT_S before the window on (the rules
        # look back), snapshots from the last one before that.
        first_snap = reader.last_snapshot_before(start - CONTEXT_S) if start is not None else 0
        snap_rows = reader.snapshots(first_snap)
        self.snaps = [Snap(r["id"], r["session"], r["time"], r["time"] + max(r["duration"], 0.0),
                           scanned_classes(r["programs"]))
                      for r in snap_rows]
        # Snapshots whose look for BPF programs had problems: (id, [[what, why], ...]).
        self.program_problems = [
            (r["id"], r["programs"]["problems"]) for r in snap_rows
            if isinstance(r["programs"], dict) and isinstance(r["programs"].get("problems"), list)
            and r["programs"]["problems"]]
        self.snap_by_id = {s.id: s for s in self.snaps}
        self._snap_ids = [s.id for s in self.snaps]
        self._snap_ends = [s.end for s in self.snaps]
        self._snap_starts = [s.time for s in self.snaps]
        session_last: dict[int, int] = {}
        for s in self.snaps:
            session_last[s.session] = max(session_last.get(s.session, 0), s.id)
        self.rows: list[Row] = []
        for r in reader.sockets_seen_since(first_snap, port, netns):
            last = r["last_snapshot"] if r["last_snapshot"] is not None else session_last.get(
                r["session"], r["first_snapshot"])
            row = _row(r, last)
            if row is None:
                reader.damaged["snapshot_sockets"] = reader.damaged.get("snapshot_sockets", 0) + 1
                continue
            self.rows.append(row)
        self.rows.sort(key=lambda r: (r.first, r.id))
        # BPF programs: every port's business, so --port keeps them all;
        # --netns keeps the sk_lookup programs of that namespace and every
        # cgroup's (a cgroup is in no namespace).
        self.programs: list[ProgRow] = []
        for r in reader.programs_seen_since(first_snap):
            seen = SeenProgram.from_row(r)
            if seen is None:
                reader.damaged["snapshot_programs"] = reader.damaged.get("snapshot_programs", 0) + 1
                continue
            if netns is not None and seen.program.netns not in (None, netns):
                continue
            last = r["last_snapshot"] if r["last_snapshot"] is not None else session_last.get(
                r["session"], r["first_snapshot"])
            self.programs.append(ProgRow(seen, r["id"], r["session"], r["first_snapshot"], last))
        self.programs.sort(key=lambda r: (r.first, r.id))
        self.by_port: dict[tuple[int, str, int], list[Row]] = {}
        self.by_inode: dict[tuple[int, int], list[Row]] = {}
        for row in self.rows:
            self.by_port.setdefault((row.netns, row.protocol, row.port), []).append(row)
            if row.inode:
                self.by_inode.setdefault((row.netns, row.inode), []).append(row)

        self.events: list[RecordedCall] = []
        for r in reader.events((start - CONTEXT_S) if start is not None else 0, port, netns):
            ev = RecordedCall.from_row(r)
            if ev is None:
                reader.damaged["events"] = reader.damaged.get("events", 0) + 1
                continue
            self.events.append(ev)
        self.events_by_inode: dict[tuple[int, int], list[RecordedCall]] = {}
        self._pid_seen: dict[int, list[tuple[float, str, str | None, int | None]]] = {}
        for ev in self.events:
            if ev.inode:
                self.events_by_inode.setdefault((ev.netns, ev.inode), []).append(ev)
            if ev.exe:
                self._pid_seen.setdefault(ev.pid, []).append((ev.time, ev.exe, ev.cgroup, ev.owner_uid))
        for row in self.rows:
            t = self.snap_by_id[row.first].time if row.first in self.snap_by_id else 0.0
            for o in row.owners:
                if o.exe:
                    self._pid_seen.setdefault(o.pid, []).append((t, o.exe, o.cgroup, o.uid))

    # -- snapshots

    def alive(self, snap_id: int, netns: int, protocol: str, port: int) -> list[Row]:
        return [r for r in self.by_port.get((netns, protocol, port), ()) if r.first <= snap_id <= r.last]

    def before(self, t: float) -> Snap | None:
        """The last snapshot that ended before ``t``."""
        i = bisect.bisect_left(self._snap_ends, t) - 1
        # Ends are not strictly sorted if a snapshot took long; walk back to be sure.
        while i >= 0 and self.snaps[i].end >= t:
            i -= 1
        return self.snaps[i] if i >= 0 else None

    def after(self, t: float) -> Snap | None:
        """The first snapshot that started after ``t``."""
        i = bisect.bisect_right(self._snap_starts, t)
        return self.snaps[i] if i < len(self.snaps) else None

    def next_of(self, snap_id: int) -> Snap | None:
        i = bisect.bisect_right(self._snap_ids, snap_id)
        return self.snaps[i] if i < len(self.snaps) else None

    def prev_of(self, snap_id: int) -> Snap | None:
        i = bisect.bisect_left(self._snap_ids, snap_id) - 1
        return self.snaps[i] if i >= 0 else None

    def programs_at(self, snap_id: int) -> list[ProgRow]:
        return [r for r in self.programs if r.first <= snap_id <= r.last]

    def row_at(self, netns: int, inode: int, snap_id: int) -> Row | None:
        for r in self.by_inode.get((netns, inode), ()):
            if r.first <= snap_id <= r.last:
                return r
        return None

    def first_seen(self, netns: int, inode: int) -> Snap | None:
        rows = self.by_inode.get((netns, inode))
        return self.snap_by_id.get(rows[0].first) if rows else None

    def took_at(self, netns: int, inode: int, calls: tuple[str, ...]) -> RecordedCall | None:
        """The first successful call of ``calls`` on the socket, if recorded."""
        for ev in self.events_by_inode.get((netns, inode), ()):
            if ev.ok and ev.call in calls:
                return ev
        return None

    # -- who a process is

    def identity(self, pid: int, t: float) -> tuple[str | None, str | None, int | None]:
        """(exe, cgroup, uid) of ``pid`` as recorded nearest to ``t``."""
        seen = self._pid_seen.get(pid)
        if not seen:
            return None, None, None
        best = min(seen, key=lambda s: abs(s[0] - t))
        return best[1], best[2], best[3]

    def pid_cgroups(self) -> dict[int, set[str]]:
        """The cgroups each process was recorded in."""
        return {pid: {c for _, _, c, _ in seen if c} for pid, seen in self._pid_seen.items()}

    def ev_identity(self, ev: RecordedCall) -> tuple[str | None, str | None]:
        if ev.exe:
            return ev.exe, ev.cgroup
        exe, cgroup, _ = self.identity(ev.pid, ev.time)
        return exe, cgroup


def _row(r: dict[str, Any], last: int) -> Row | None:
    """A snapshot_sockets row for the rules, or None when it is damaged."""
    fields = SocketRecord.row_fields(r)
    if fields is None:
        return None
    return Row(**fields, id=r["id"], session=r["session"], first=r["first_snapshot"], last=last)


def first_reason(explanation: EventExplanation | None) -> dict[str, Any] | None:
    """{errno, rule, text} of the explanation's first reason, or None."""
    if explanation is None or not explanation.reasons:
        return None
    r = explanation.reasons[0]
    return {"errno": r.errno, "rule": r.rule, "text": r.text}


def stamp(t: float | None) -> str:
    """A time as the report shows it; ``-`` for none."""
    return "-" if t is None else clock_text(t)
