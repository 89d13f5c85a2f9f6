"""What the sources hand to the state model: the conversions from the
collector's objects (inventory sockets, groups, TIME_WAIT holders, the
explainer's findings) and from their JSON lines to the model's views, one
codec each, shared by the live collector, the recordings and the journal's
replay."""

from __future__ import annotations

import errno as errno_mod
from collections import deque
from typing import Iterable

from .events import format_addr
from .records import EventExplanation
from .state import (
    MAX_GROUP_EVENTS,
    RATE_HISTORY,
    BlockerView,
    ExplanationView,
    GroupEvent,
    GroupView,
    ImbalanceView,
    MemberView,
    PressureRow,
    SocketRow,
    TimewaitRow,
    TimewaitView,
    owner_label,
)

TIMEWAIT_ROWS = 500
# A conflict: a call of these that failed (a non-blocking connect()'s
# EINPROGRESS is not a failure).
CALLS = frozenset({"bind", "listen", "connect", "get_port"})
NOT_FAILURES = frozenset({0, errno_mod.EINPROGRESS})



# ---- conversions: collector objects and JSON to state-model views -------------


def explanation_from_finding(found: EventExplanation) -> ExplanationView:
    """From the on-the-spot explainer's answer (tracer.onthespot)."""
    reasons = found.reasons
    return ExplanationView(
        blockers=tuple(BlockerView(b.pids, b.comm, b.state, b.local, b.rule, b.overlap, b.why,
                                   b.closed_by, b.held) for b in found.blockers),
        fixes=found.fix_texts, notes=found.note_texts, error=found.error,
        reasons=tuple(str(r["text"]) for r in reasons),
        rule=str(reasons[0]["rule"]) if reasons else "",
        data=None if found.error else found.to_json())


def explanation_from_json(doc: dict) -> ExplanationView | None:
    """The ``blockers`` and ``explanation`` (or, from an old recording,
    ``fixes`` and ``notes``) of one event line; None when the line has none;
    ValueError when they are not what portscope writes (a damaged or forged
    recording or journal)."""
    blockers = doc.get("blockers")
    data = doc.get("explanation")
    if blockers is None and data is None:
        return None
    if isinstance(blockers, dict):
        return ExplanationView(error=str(blockers.get("error", "unknown")))
    if blockers is not None and not isinstance(blockers, list):
        raise ValueError("'blockers' is neither a list nor an error")
    views = tuple(BlockerView.from_json(b) for b in blockers or ())
    if data is None:
        return ExplanationView(views, _texts(doc.get("fixes")), _texts(doc.get("notes")))
    if not isinstance(data, dict):
        raise ValueError("'explanation' is not an object")
    if "error" in data:
        return ExplanationView(error=str(data["error"]))
    reasons, fixes, notes = (_records(data.get(k)) for k in ("reasons", "fixes", "notes"))
    return ExplanationView(views, tuple(str(f["text"]) for f in fixes),
                       tuple(str(n["text"]) for n in notes),
                       reasons=tuple(str(r["text"]) for r in reasons),
                       rule=str(reasons[0].get("rule", "")) if reasons else "", data=data)


def _records(value: object) -> list[dict]:
    """A list of explainer records ({..., "text": sentence}) from JSON."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, dict) and isinstance(v.get("text"), str)
                                              for v in value):
        raise ValueError("an explanation's reasons, fixes and notes must be lists of records")
    return value


def _texts(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("'fixes' and 'notes' must be lists of sentences")
    return tuple(value)


def socket_row(s: object) -> SocketRow:
    """From an :class:`~tracer.inventory.Socket`."""
    d, f = s.diag, s.flags  # type: ignore[attr-defined]
    local = format_addr(d.family, d.local_addr, d.local_port)
    remote = format_addr(d.family, d.remote_addr, d.remote_port)
    return SocketRow.build(
        netns=d.netns, protocol=d.protocol, family=d.family, state=d.state, local=local,
        remote=remote, port=d.local_port, rqueue=d.rqueue, wqueue=d.wqueue, timer=d.timer,
        timer_ms=d.timer_ms, uid=d.uid, inode=d.inode, cookie=d.cookie,
        options=None if f is None else f.options,
        group=f.group if f else 0, group_size=f.group_size if f else 0,
        group_bpf=bool(f and f.group_bpf_prog),
        owners=[(o.pid, o.label(), o.user) for o in s.owners])  # type: ignore[attr-defined]


def sort_rows(rows: list[SocketRow]) -> list[SocketRow]:
    """By port, listeners first, then protocol and address."""
    return sorted(rows, key=lambda r: (r.port, r.state != "LISTEN", r.proto, r.local, r.remote,
                                       r.netns, r.inode))




class GroupViews:
    """Turns successive reads of the reuseport groups (the JSON form of
    :meth:`tracer.reuseport.GroupsReading.to_json`) into views with a rate history
    and the latest join/leave marks of each group."""

    def __init__(self) -> None:
        self._history: dict[str, deque[float]] = {}
        self._events: dict[str, deque[GroupEvent]] = {}

    @staticmethod
    def key(netns: int, protocol: str, group: str) -> str:
        return f"{netns}/{protocol}/{group}"

    def update(self, doc: dict) -> list[GroupView]:
        for e in doc.get("events", ()):
            key = self.key(e["netns"], e["protocol"], e["group"])
            owners = " ".join(owner_label(o) for o in e.get("owners", ())) or "-"
            self._events.setdefault(key, deque(maxlen=MAX_GROUP_EVENTS)).append(
                GroupEvent(e["time"], e["event"], f"{owners} inode {e['inode']}",
                           e.get("delivered", 0)))
        views = []
        for g in doc.get("groups", ()):
            key = self.key(g["netns"], g["protocol"], g["id"])
            hist = self._history.setdefault(key, deque(maxlen=RATE_HISTORY))
            if g.get("rate") is not None:
                hist.append(float(g["rate"]))
            members = tuple(
                MemberView(m["cookie"], m["inode"],
                           " ".join(owner_label(o) for o in m.get("owners", ())) or "-",
                           m["state"], m["delivered"], m.get("rate"), m.get("share"),
                           m["queue"], m.get("backlog"))
                for m in g["members"])
            views.append(GroupView(
                key=key, netns=g["netns"],
                proto=g["protocol"] + ("6" if g["family"] == "ipv6" else "4"),
                local=g["local"], port=g["port"], size=g["size"], bpf=bool(g["bpf"]),
                members=members, rate=g.get("rate"), history=tuple(hist),
                events=tuple(self._events.get(key, ())),
                imbalance=_imbalance_view(g.get("imbalance"))))
        present = {v.key for v in views}
        for table in (self._history, self._events):
            for key in [k for k in table if k not in present]:
                del table[key]
        return views


def _imbalance_view(doc: dict | None) -> ImbalanceView | None:
    if not doc:
        return None
    from .balance import Imbalance

    imb = Imbalance(doc["members"], doc["total"], doc["seconds"], doc.get("max_min"),
                    doc.get("cv"), doc.get("chi2"), doc.get("dof", 0), doc.get("p_value"),
                    doc["verdict"])
    return ImbalanceView(imb.verdict, imb.text(), imb.max_min, imb.cv, imb.p_value, imb.seconds)


def timewait_view(sockets: Iterable[object], closers: dict, collectors: int,
                  ranges: dict, pressure: Iterable[object], now: float) -> TimewaitView:
    """TIME_WAIT sockets grouped by (port, remote, closer).

    The port is the local one, or "ephemeral" when the local port is in
    ``ip_local_port_range`` and the remote one is not (a connection we
    opened: grouping by our ephemeral port would give one row per socket;
    the remote service's address and port say more)."""
    from .timewait import _histogram, is_time_wait, key_of

    groups: dict[tuple[str, str, str], list[int]] = {}
    total = attributed = 0
    lefts = []
    for s in sockets:
        if not is_time_wait(s):
            continue
        d = s.diag  # type: ignore[attr-defined]
        total += 1
        rng = ranges.get(d.netns)
        ephemeral = rng is not None and rng.low <= d.local_port <= rng.high
        if ephemeral and not rng.low <= d.remote_port <= rng.high:
            port, remote = "ephemeral", format_addr(d.family, d.remote_addr, d.remote_port)
        else:
            port, remote = str(d.local_port), d.remote_addr
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
        rows=tuple(rows[:TIMEWAIT_ROWS]), histogram=tuple(_histogram(lefts)),
        pressure=tuple(PressureRow(p.netns, p.source, p.destination, p.in_use, p.capacity,
                                   p.level) for p in pressure),  # type: ignore[attr-defined]
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
