"""What the sources hand to the state model: the conversions from records
(inventory sockets, group readings, TIME_WAIT holders) to the model's views,
one each, shared by the live collector, the recordings and the journal's
replay. Explanations need none: the model keeps the record itself."""

from __future__ import annotations

import errno as errno_mod
from collections import deque
from typing import Iterable

from .balance import Imbalance
from .closers import Closer, ConnKey
from .inventory import Socket
from .netns import PortRange
from .nsnames import NetnsNames
from .records import GroupsReading, format_addr
from .state import (
    MAX_GROUP_EVENTS,
    RATE_HISTORY,
    GroupEvent,
    GroupView,
    ImbalanceView,
    MemberView,
    PressureRow,
    SocketRow,
    TimewaitRow,
    TimewaitView,
)
from .timewait import Pressure, endpoint, histogram, is_time_wait, key_of

TIMEWAIT_ROWS = 500
# A conflict: a call of these that failed (a non-blocking connect()'s
# EINPROGRESS is not a failure).
CALLS = frozenset({"bind", "listen", "connect", "get_port"})
NOT_FAILURES = frozenset({0, errno_mod.EINPROGRESS})



# ---- conversions: records to state-model views -----------------------------------


def socket_row(s: Socket, names: NetnsNames | None = None) -> SocketRow:
    """From an inventory socket; ``names`` label its namespace."""
    d, f = s.diag, s.flags
    local = format_addr(d.family, d.local_addr, d.local_port)
    remote = format_addr(d.family, d.remote_addr, d.remote_port)
    return SocketRow.build(
        netns=d.netns, protocol=d.protocol, family=d.family, state=d.state, local=local,
        remote=remote, port=d.local_port, rqueue=d.rqueue, wqueue=d.wqueue, timer=d.timer,
        timer_ms=d.timer_ms, uid=d.uid, inode=d.inode, cookie=d.cookie,
        options=None if f is None else f.options,
        group=f.group if f else 0, group_size=f.group_size if f else 0,
        group_bpf=bool(f and f.group_bpf_prog),
        owners=[(o.pid, o.label(), o.user) for o in s.owners], json=s.to_json,
        netns_name=names.label(d.netns) if names else None)


def sort_rows(rows: list[SocketRow]) -> list[SocketRow]:
    """By port, listeners first, then protocol and address."""
    return sorted(rows, key=lambda r: (r.port, r.state != "LISTEN", r.proto, r.local, r.remote,
                                       r.netns, r.inode))




class GroupViews:
    """Turns successive readings of the reuseport groups (live from
    tracer/reuseport.GroupWatcher, or read back from a recording) into views
    with a rate history and the latest join/leave marks of each group."""

    def __init__(self) -> None:
        self._history: dict[str, deque[float]] = {}
        self._events: dict[str, deque[GroupEvent]] = {}

    @staticmethod
    def key(netns: int, protocol: str, group: int) -> str:
        return f"{netns}/{protocol}/{group:08x}"

    def update(self, reading: GroupsReading) -> list[GroupView]:
        for e in reading.events:
            key = self.key(e.netns, e.protocol, e.group)
            owners = " ".join(o.label() for o in e.owners) or "-"
            self._events.setdefault(key, deque(maxlen=MAX_GROUP_EVENTS)).append(
                GroupEvent(e.time, e.kind, f"{owners} inode {e.inode}", e.delivered))
        views = []
        for g in reading.groups:
            key = self.key(g.netns, g.protocol, g.id)
            hist = self._history.setdefault(key, deque(maxlen=RATE_HISTORY))
            if g.rate is not None:
                hist.append(round(g.rate, 3))
            members = tuple(
                MemberView(m.cookie, m.inode, m.taker_label(), m.state, m.delivered, m.rate,
                           m.share, m.queue, m.backlog, " ".join(o.label() for o in m.owners),
                           m.drops, m.status, m.problems, tuple(m.served_by))
                for m in g.members)
            views.append(GroupView(
                key=key, netns=g.netns, proto=g.protocol + ("6" if g.family == "ipv6" else "4"),
                local=g.local, port=g.port, size=g.size, bpf=g.bpf, members=members,
                rate=g.rate, history=tuple(hist), events=tuple(self._events.get(key, ())),
                imbalance=_imbalance_view(g.imbalance), balance=g.balance_text(),
                json=g.to_json))
        present = {v.key for v in views}
        for table in (self._history, self._events):
            for key in [k for k in table if k not in present]:
                del table[key]
        return views


def _imbalance_view(imb: Imbalance | None) -> ImbalanceView | None:
    if imb is None:
        return None
    return ImbalanceView(imb.verdict, imb.text(), imb.max_min, imb.cv, imb.p_value, imb.seconds)


def timewait_view(sockets: Iterable[Socket], closers: dict[ConnKey, Closer], collectors: int,
                  ranges: dict[int, PortRange], pressure: Iterable[Pressure],
                  now: float) -> TimewaitView:
    """TIME_WAIT sockets grouped by (port, remote, closer).

    The port is the local one, or "ephemeral" when the local port is in
    ``ip_local_port_range`` and the remote one is not (a connection we
    opened: grouping by our ephemeral port would give one row per socket;
    the remote service's address and port say more)."""
    groups: dict[tuple[str, str, str], list[int]] = {}
    total = attributed = 0
    lefts = []
    for s in sockets:
        if not is_time_wait(s):
            continue
        d = s.diag
        total += 1
        port, remote = endpoint(s, ranges.get(d.netns))
        closer = closers.get(key_of(s))
        attributed += closer is not None
        who = f"{closer.comm}[{closer.pid}]" if closer else "unknown"
        g = groups.setdefault((port, remote, who), [0, d.timer_ms, d.timer_ms])
        g[0] += 1
        g[1] = min(g[1], d.timer_ms)
        g[2] = max(g[2], d.timer_ms)
        lefts.append(d.timer_ms)
    rows = sorted((TimewaitRow(p, r, c, n, lo, hi) for (p, r, c), (n, lo, hi) in groups.items()),
                  key=lambda r: (-r.count, r.port, r.remote, r.closer))
    notes = []
    if total and not collectors:
        notes.append("no portscope collector recorded these closes: closer unknown")
    elif attributed < total:
        notes.append(f"{total - attributed} closed before any collector watched: closer unknown")
    if len(rows) > TIMEWAIT_ROWS:
        notes.append(f"{len(rows) - TIMEWAIT_ROWS} smaller groups not shown")
    return TimewaitView(
        total=total, attributed=attributed, collectors=collectors,
        rows=tuple(rows[:TIMEWAIT_ROWS]), histogram=tuple(histogram(lefts)),
        pressure=tuple(PressureRow(p.netns, p.source, p.destination, p.in_use, p.capacity,
                                   p.level) for p in pressure),
        notes=tuple(notes), taken_at=now)


def timewait_to_json(v: TimewaitView) -> dict[str, object]:
    return {"total": v.total, "attributed": v.attributed, "collectors": v.collectors,
            "rows": [[r.port, r.remote, r.closer, r.count, r.min_left_ms, r.max_left_ms]
                     for r in v.rows],
            "histogram": [list(h) for h in v.histogram],
            "pressure": [[p.netns, p.source, p.destination, p.in_use, p.capacity, p.level]
                         for p in v.pressure],
            "notes": list(v.notes), "taken_at": v.taken_at}


def timewait_from_json(doc: dict) -> TimewaitView:
    return TimewaitView(
        total=doc["total"], attributed=doc["attributed"], collectors=doc["collectors"],
        rows=tuple(TimewaitRow(*r) for r in doc["rows"]),
        histogram=tuple((str(e), int(c)) for e, c in doc["histogram"]),
        pressure=tuple(PressureRow(*p) for p in doc["pressure"]),
        notes=tuple(doc["notes"]), taken_at=doc["taken_at"])
