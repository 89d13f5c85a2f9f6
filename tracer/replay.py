"""``portscope replay FILE``: the terminal UI over a journal written by
``portscope record``, as of a position in time that the user moves.

:class:`JournalReplay` is a state source for :func:`tui.app.make_app` (it
has ``snapshot()``) and a replay control (``step``, ``seek``, ``home``,
``end``, ``toggle``, ``faster``, ``slower``, ``position``). It reads the
events between ``--from`` and ``--to`` once, and fills a
:class:`~tracer.state.StateModel` as of the position:

* conflicts: every failed bind(), listen() and connect() up to the
  position, with the blockers recorded on the spot;
* ports and reuseport groups: from the snapshot valid at the position (the
  last one taken at or before it, which may be older than ``--from``);
* health: the recording sessions' plan and lost events.

The position is an event index ``n`` (events ``0..n-1`` have happened) and
a time; stepping moves one event, seeking moves the time and applies every
event up to it. Playing advances the time at ``speed`` times the
recording's pace, each time the UI asks for a snapshot: no thread.

Opening needs no privileges beyond reading the file; a file that is not a
journal is one sentence (exit status 2) before the UI starts.
"""

from __future__ import annotations

import argparse
import bisect
import time
from dataclasses import dataclass
from typing import Any

from .arguments import Invalid, point_in_time
from .cgroups import identity_from_cgroup
from .errors import ExitStatus, UsageError
from .journal import JournalReader
from .records import CallEvent, EventExplanation, Options, Owner, SocketRecord, format_addr
from .runtime import run_screen
from .state import (
    MAX_CONFLICTS,
    Conflict,
    GroupView,
    MemberView,
    Snapshot,
    SocketRow,
    StateModel,
)
from .text import clock_text
from .views import CALLS, NOT_FAILURES, sort_rows

# The health counts a snapshot carries (of its inventory), shown as they are.
INVENTORY_HEALTH = ("namespaces", "namespaces_gone", "unreadable_processes", "flags_unknown")
SPEEDS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 3600.0)
SEEK_S = 60.0


@dataclass(frozen=True)
class Position:
    """Where the replay stands, for the status line."""

    time: float
    index: int  # events applied (the n of "event n/N")
    total: int  # events in the window
    start: float
    end: float
    playing: bool
    speed: float

    def text(self) -> str:
        return clock_text(self.time)




class JournalReplay:
    """A journal as a state source the user moves through in time."""

    def __init__(self, path: str, start: float | None = None, end: float | None = None,
                 speed: float = 1.0, playing: bool = False,
                 model: StateModel | None = None, clock: Any = time.monotonic) -> None:
        if start is not None and end is not None and start > end:
            raise UsageError("--from is after --to: nothing to replay")
        self.path = path
        self.model = model or StateModel()
        self.speed = speed
        self._clock = clock
        self.reader = JournalReader(path)  # one sentence (exit 2) for a bad file
        try:
            self._load(start, end)
        except BaseException:
            self.reader.close()
            raise
        self.index = 0
        self.time = self.start
        self.playing = False
        self._anchor: tuple[float, float] = (self.start, 0.0)  # (position, clock) when play began
        self._applied_index = -1
        self._applied_snapshot: int | None = -1
        self._conflicts: dict[int, Conflict] = {}
        self._damaged_conflicts = 0
        self._rows_cache: dict[int, tuple[tuple[SocketRow, ...], tuple[GroupView, ...]]] = {}
        self.model.update_health(source="replay", plan=self.plan, lost=self.lost,
                                 untraced=self.untraced, started=self.start)
        self._apply()
        if playing:
            self.toggle()

    # -- loading

    def _load(self, start: float | None, end: float | None) -> None:
        r = self.reader
        rows = r.calls_between(start, end)
        self.times = [row["time"] for row in rows]
        # Failures: the positions (in the window's events) that are conflicts.
        self.failures: list[int] = []  # event index of each failure
        self._failure_ids: list[int] = []
        for i, row in enumerate(rows):
            if row["errno"] not in NOT_FAILURES and row["call"] in CALLS:
                self.failures.append(i)
                self._failure_ids.append(row["id"])
        snaps = r.snapshots(until=end, by_time=True)
        self.snapshots = [(s["time"], s["id"], s["session"], s["health"]) for s in snaps]
        self._snap_times = [s[0] for s in self.snapshots]
        sessions = r.sessions()
        self.plan = sessions[-1]["plan"] if sessions else None
        self.lost = sum(s["lost"] for s in sessions)
        self.untraced = sum(s["untraced"] for s in sessions)
        in_window = [t for t in self._snap_times if start is None or t >= start]
        firsts = [t for t in (self.times[:1] + in_window[:1])]
        lasts = [t for t in (self.times[-1:] + self._snap_times[-1:])]
        if start is None and not firsts or end is None and not lasts:
            raise UsageError(f"{self.path} holds no events or snapshots"
                             + (" in that time window" if start is not None or end is not None
                                else ": nothing to replay"))
        self.start = start if start is not None else min(firsts)
        self.end = end if end is not None else max(lasts)
        if self.end < self.start:  # --from after everything recorded
            raise UsageError(f"{self.path} holds nothing recorded after {clock_text(self.start)}")

    @property
    def total(self) -> int:
        return len(self.times)

    # -- the state source

    def snapshot(self) -> Snapshot:
        self._catch_up()
        return self.model.snapshot()

    def position(self) -> Position:
        return Position(self.time, self.index, self.total, self.start, self.end, self.playing,
                        self.speed)

    def close(self) -> None:
        self.reader.close()

    def stop(self) -> None:
        self.close()

    # -- moving

    def step(self, n: int = 1) -> None:
        """``n`` events forward (or back, when negative); pauses playing."""
        self._catch_up()
        self.playing = False
        index = max(0, min(self.total, self.index + n))
        if index == self.index:
            return
        self.index = index
        self.time = self.times[index - 1] if index else self.start
        self._apply()

    def seek(self, seconds: float) -> None:
        """Move the time by ``seconds`` (negative: back), applying every event up to it."""
        self._catch_up()
        self._set_time(self.time + seconds)
        self._reanchor()

    def home(self) -> None:
        self.index, self.time = 0, self.start
        self._reanchor()
        self._apply()

    def end_(self) -> None:
        self.playing = False
        self._set_time(self.end)

    def toggle(self) -> None:
        """Play or pause; playing from the end starts over."""
        self._catch_up()
        if not self.playing and self.time >= self.end:
            self.home()
        self.playing = not self.playing
        self._reanchor()

    def faster(self) -> None:
        self._catch_up()
        self.speed = next((s for s in SPEEDS if s > self.speed), self.speed)
        self._reanchor()

    def slower(self) -> None:
        self._catch_up()
        self.speed = next((s for s in reversed(SPEEDS) if s < self.speed), self.speed)
        self._reanchor()

    def _catch_up(self) -> None:
        """While playing: move to where the clock says the replay is."""
        if not self.playing:
            return
        pos, at = self._anchor
        t = pos + (self._clock() - at) * self.speed
        if t >= self.end:
            t = self.end
            self.playing = False
        if t != self.time:
            self._set_time(t)

    def _reanchor(self) -> None:
        self._anchor = (self.time, self._clock())

    def _set_time(self, t: float) -> None:
        t = max(self.start, min(self.end, t))
        self.time = t
        self.index = bisect.bisect_right(self.times, t)
        self._apply()

    # -- filling the model

    def _apply(self) -> None:
        if self.index != self._applied_index:
            self._applied_index = self.index
            self._apply_conflicts()
            self.model.update_health(events=self.index)
        i = bisect.bisect_right(self._snap_times, self.time) - 1
        sid = self.snapshots[i][1] if i >= 0 else None
        if sid != self._applied_snapshot:
            self._applied_snapshot = sid
            self._apply_snapshot(i)

    def _apply_conflicts(self) -> None:
        k = bisect.bisect_left(self.failures, self.index)  # failures before the position
        low = max(0, k - MAX_CONFLICTS)
        missing = [j for j in range(low, k) if j not in self._conflicts]
        if missing:
            self._load_conflicts(missing)
        self.model.set_conflicts([self._conflicts[j] for j in range(low, k)], k)

    def _load_conflicts(self, seqs: list[int]) -> None:
        ids = [self._failure_ids[j] for j in seqs]
        rows = self.reader.events_by_id(ids, columns=("id", "json", "blockers", "explanation",
                                                       "exe", "cgroup", "cmdline", "owner_uid"))
        for j, eid in zip(seqs, ids):
            self._conflicts[j] = self._conflict(j, rows.get(eid))

    def _conflict(self, seq: int, row: dict[str, Any] | None) -> Conflict:
        """One failure as the Conflicts screen shows it; a damaged row keeps
        its place (the count stays true) with what could not be read said."""
        try:
            if row is None:
                raise ValueError("the row could not be read")
            ev = CallEvent.from_json(row["json"])
            return Conflict(seq, ev, EventExplanation.from_json(row["blockers"],
                                                                row["explanation"]), False,
                            _recorded_caller(ev, row))
        except ValueError as exc:
            self._damaged_conflicts += 1
            self.model.set_error("journal", f"{self._damaged_conflicts} damaged event(s) in "
                                            f"{self.path} could not be shown ({exc})")
            return Conflict(seq, _damaged_event(self.times[self.failures[seq]]),
                            EventExplanation(error=f"damaged in the journal: {exc}"), False)

    def _apply_snapshot(self, i: int) -> None:
        if i < 0:
            self.model.set_ports((), 0.0)
            self.model.set_groups(())
            return
        t, sid, session, health = self.snapshots[i]
        cached = self._rows_cache.get(sid)
        if cached is None:
            cached = self._read_snapshot(sid, session)
            if len(self._rows_cache) > 16:
                self._rows_cache.pop(next(iter(self._rows_cache)))
            self._rows_cache[sid] = cached
        ports, groups = cached
        self.model.set_ports(ports, t)
        self.model.set_groups(groups)
        h = health if isinstance(health, dict) else {}
        self.model.update_health(**{k: v for k, v in h.items()
                                    if k in INVENTORY_HEALTH and type(v) is int})

    def _read_snapshot(self, sid: int, session: int) -> tuple[tuple[SocketRow, ...],
                                                              tuple[GroupView, ...]]:
        records = []
        for r in self.reader.sockets_in(sid, session):
            rec = SocketRecord.from_row(r)
            if rec is None:  # damaged beyond use: left out, and counted
                self.reader.damaged["snapshot_sockets"] = \
                    self.reader.damaged.get("snapshot_sockets", 0) + 1
                continue
            records.append(rec)
        if self.reader.damaged.get("snapshot_sockets"):
            self.model.set_error("journal", self.reader.damage_note())
        sockets = []
        groups: dict[tuple[int, str, str, int], list[tuple[SocketRow, SocketRecord]]] = {}
        for rec in records:
            wildcard = "::" if rec.family == "ipv6" else "0.0.0.0"
            row = SocketRow.build(
                netns=rec.netns, protocol=rec.protocol, family=rec.family, state=rec.state,
                local=rec.local, remote=format_addr(rec.family, wildcard, 0), port=rec.port,
                rqueue=0, wqueue=0, timer=None, timer_ms=0, uid=rec.uid, inode=rec.inode,
                cookie=rec.cookie, options=rec.options, group=rec.group or 0,
                group_size=rec.group_size or 0, group_bpf=bool(rec.group_bpf),
                owners=[(o.pid, o.label(), o.user) for o in rec.owners])
            sockets.append(row)
            if rec.group:
                groups.setdefault((rec.netns, rec.protocol, rec.family, rec.group), []).append(
                    (row, rec))
        views = []
        for (netns, protocol, family, gid), members in groups.items():
            first_row, first = members[0]
            views.append(GroupView(
                key=f"{netns}/{protocol}/{gid}", netns=netns, proto=first_row.proto,
                local=first_row.local, port=first_row.port,
                size=max(r.group_size or 0 for _, r in members),
                bpf=any(r.group_bpf for _, r in members),
                members=tuple(MemberView(row.cookie, row.inode, row.owners, row.state, 0, None,
                                         None, 0, None) for row, _ in members),
                rate=None, history=(), events=(), imbalance=None))
        views.sort(key=lambda g: (g.port, g.proto, g.local, g.key))
        return tuple(sort_rows(sockets)), tuple(views)


def _recorded_caller(ev: CallEvent, row: dict[str, Any]) -> Owner | None:
    """The caller as the recorder read it (None when it could not)."""
    texts = [row.get(k) for k in ("exe", "cgroup", "cmdline")]
    if not any(isinstance(t, str) for t in texts):
        return None
    exe, cgroup, cmdline = (t if isinstance(t, str) else None for t in texts)
    uid = row.get("owner_uid")
    return Owner(ev.pid, ev.comm, exe, cmdline, uid=uid if type(uid) is int else ev.uid,
                 cgroup=cgroup, **identity_from_cgroup(cgroup))


def _damaged_event(t: float) -> CallEvent:
    """A stand-in for a failure whose row is damaged: its time, no facts."""
    return CallEvent(time=t, call="?", pid=0, tid=0, uid=0, sock_uid=0, comm="?", cgroup_id=0,
                     netns=0, family="?", protocol="?", addr_family="?", addr="?", port=0,
                     bound_addr="?", bound_port=0, options=Options(frozenset(), 0), inode=0,
                     errno=0, plan="?", addr_unreadable=True, get_port=None)


def open_replay(path: str, start: str | float | None = None, end: str | float | None = None,
                speed: float = 1.0, playing: bool = False) -> JournalReplay:
    """From the command line's arguments: times as ``report --since`` takes
    them (text, or seconds already parsed by tracer.arguments.point_in_time)."""
    return JournalReplay(path, _time(start, "--from"), _time(end, "--to"), speed, playing)


def _time(value: str | float | None, name: str) -> float | None:
    if value is None or isinstance(value, float):
        return value
    try:
        return point_in_time(value)
    except Invalid as exc:
        raise UsageError(f"{name}: {exc}") from None


def run(args: argparse.Namespace) -> ExitStatus:
    # The journal is opened (and every bad file reported) before the UI starts.
    source = open_replay(args.file, args.start, args.end, args.speed, playing=True)
    try:
        status = run_screen(source)
    finally:
        source.close()
    return ExitStatus.ERROR if status else ExitStatus.OK
