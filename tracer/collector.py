"""The live collector behind ``portscope`` (the terminal UI): it fills a
:class:`~tracer.state.StateModel` and never waits for whoever reads it.

Three threads, each owning what it touches, so that none waits on another:

* **events**: owns the probe :class:`~tracer.engine.Engine` (failures only).
  Every failed bind(), listen() and connect() becomes a conflict in the
  model as soon as it is read; once a second it updates the event rate and
  the kernel's lost/untraced counters.
* **explain**: names the blockers of each EADDRINUSE of a bind() or
  listen() (:class:`~tracer.onthespot.OnTheSpot`: the port's inventory,
  taken in the socket's namespace, through the kernel's bind rules, with the
  fixes those rules confirm). Its queue is bounded: in a storm of distinct
  failures the oldest unexplained ones are marked as skipped and counted,
  instead of the queue growing.
* **refresh**: the periodic views: who holds which port (every 2 s), the
  reuseport groups with per-member counters (every 1 s,
  :class:`~tracer.groups.GroupWatcher`) and the TIME_WAIT holders with
  ephemeral-port pressure (every 5 s). Each refresh's cost is bounded: it
  runs again no sooner than ``1 / BUDGET`` times its last duration, so on a
  host where an inventory takes 0.8 s it runs every 3.2 s, not every 2 s.

A :class:`Replay` fills the same model from recorded JSON lines (the output
of ``portscope trace --json``, with optional ``ports``, ``groups`` and
``timewait`` records): the UI's tests and ``portscope ui --replay FILE``.
"""

from __future__ import annotations

import errno as errno_mod
import json
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from .engine import Engine, EngineConfig
from .loader import open_engine
from .errors import PortscopeError, UsageError
from .events import CallEvent, Clock, decode, event_from_json
from .onthespot import explainable
from .records import EventExplanation
from .state import (
    MAX_GROUP_EVENTS,
    RATE_HISTORY,
    BlockerView,
    Explanation,
    GroupEvent,
    GroupView,
    Health,
    ImbalanceView,
    MemberView,
    PressureRow,
    SocketRow,
    StateModel,
    TimewaitRow,
    TimewaitView,
)

POLL_MS = 100
RATE_EVERY_S = 1.0
PORTS_EVERY_S = 2.0
GROUPS_EVERY_S = 1.0
TIMEWAIT_EVERY_S = 5.0
BUDGET = 0.25  # share of a core one periodic refresh may take on average
EXPLAIN_QUEUE = 256
TIMEWAIT_ROWS = 500
# Every state but TIME_WAIT: those have their own screen, and a busy host has
# 100,000s of them.
PORT_STATES = ("ESTABLISHED", "SYN_SENT", "SYN_RECV", "FIN_WAIT1", "FIN_WAIT2", "CLOSE",
               "CLOSE_WAIT", "LAST_ACK", "LISTEN", "CLOSING")
CALLS = frozenset({"bind", "listen", "connect", "get_port"})
NOT_FAILURES = frozenset({0, errno_mod.EINPROGRESS})


# ---- conversions: collector objects and JSON to state-model views -------------


def explanation_from_finding(found: EventExplanation) -> Explanation:
    """From the on-the-spot explainer's answer (tracer.onthespot)."""
    reasons = found.reasons
    return Explanation(
        blockers=tuple(BlockerView(b.pids, b.comm, b.state, b.local, b.rule, b.overlap, b.why,
                                   b.closed_by, b.held) for b in found.blockers),
        fixes=found.fix_texts, notes=found.note_texts, error=found.error,
        reasons=tuple(str(r["text"]) for r in reasons),
        rule=str(reasons[0]["rule"]) if reasons else "",
        data=None if found.error else found.to_json())


def explanation_from_json(doc: dict) -> Explanation | None:
    """The ``blockers`` and ``explanation`` (or, from an old recording,
    ``fixes`` and ``notes``) of one event line; None when the line has none;
    ValueError when they are not what portscope writes (a damaged or forged
    recording or journal)."""
    blockers = doc.get("blockers")
    data = doc.get("explanation")
    if blockers is None and data is None:
        return None
    if isinstance(blockers, dict):
        return Explanation(error=str(blockers.get("error", "unknown")))
    if blockers is not None and not isinstance(blockers, list):
        raise ValueError("'blockers' is neither a list nor an error")
    views = tuple(BlockerView.from_json(b) for b in blockers or ())
    if data is None:
        return Explanation(views, _texts(doc.get("fixes")), _texts(doc.get("notes")))
    if not isinstance(data, dict):
        raise ValueError("'explanation' is not an object")
    if "error" in data:
        return Explanation(error=str(data["error"]))
    reasons, fixes, notes = (_records(data.get(k)) for k in ("reasons", "fixes", "notes"))
    return Explanation(views, tuple(str(f["text"]) for f in fixes),
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
    local = _endpoint(d.family, d.local_addr, d.local_port)
    remote = _endpoint(d.family, d.remote_addr, d.remote_port)
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


def _endpoint(family: str, addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if family == "ipv6" else f"{addr}:{port}"


def _owner_label(o: dict) -> str:
    where = o.get("container") and f"container {o['container']}" or o.get("unit")
    return f"{o['comm']}[{o['pid']}]" + (f" ({where})" if where else "")


class GroupViews:
    """Turns successive reads of the reuseport groups (the JSON form of
    :meth:`tracer.groups.Snapshot.to_json`) into views with a rate history
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
            owners = " ".join(_owner_label(o) for o in e.get("owners", ())) or "-"
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
                           " ".join(_owner_label(o) for o in m.get("owners", ())) or "-",
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
    from .groups import Imbalance

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
            port, remote = "ephemeral", _endpoint(d.family, d.remote_addr, d.remote_port)
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


# ---- the live collector --------------------------------------------------------


@dataclass
class Intervals:
    ports: float = PORTS_EVERY_S
    groups: float = GROUPS_EVERY_S
    timewait: float = TIMEWAIT_EVERY_S


class LiveCollector:
    """Start with :meth:`start` (which raises the one-sentence
    :class:`~tracer.errors.PortscopeError` if the probes cannot run, before
    any UI is drawn); stop with :meth:`stop`."""

    def __init__(self, model: StateModel, config: EngineConfig | None = None,
                 intervals: Intervals | None = None, groups: bool = True) -> None:
        self.model = model
        self.config = config or EngineConfig(errors_only=True)
        self.intervals = intervals or Intervals()
        self.want_groups = groups
        self.engine: Engine | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._queue: deque[tuple[int, CallEvent]] = deque()
        self._wake = threading.Condition()
        self._skipped = 0

    # -- lifecycle

    def start(self) -> None:
        self.engine = open_engine(self.config)
        skipped = tuple(f"{a.plan.value}: {a.reason}" for a in self.engine.attempts if not a.ok)
        self.model.update_health(source="live", plan=self.engine.plan.value, plan_notes=skipped,
                                 started=time.time())
        for name, target in (("events", self._events_loop), ("explain", self._explain_loop),
                             ("refresh", self._refresh_loop)):
            t = threading.Thread(target=self._guard(name, target), name=f"portscope-{name}",
                                 daemon=True)
            self._threads.append(t)
            t.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        with self._wake:
            self._wake.notify_all()
        for t in self._threads:
            t.join(timeout)
        self._threads.clear()
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    def __enter__(self) -> "LiveCollector":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _guard(self, name: str, target: Callable[[], None]) -> Callable[[], None]:
        """A thread that dies says so in the model (shown by the UI) instead
        of vanishing with a traceback on a terminal the UI owns."""
        def run() -> None:
            try:
                target()
            except Exception as exc:  # noqa: BLE001 - reported, never raised into the UI
                self.model.set_error(name, f"the {name} thread stopped: "
                                           f"{type(exc).__name__}: {exc}")
        return run

    # -- events

    def _events_loop(self) -> None:
        assert self.engine is not None
        engine = self.engine
        clock = Clock()
        seen = 0
        last_seen, last_t = 0, time.monotonic()
        while not self._stop.is_set():
            raws = engine.poll(POLL_MS)
            if raws:
                seen += len(raws)
                self._ingest(raws, clock)
            now = time.monotonic()
            if now - last_t >= RATE_EVERY_S:
                c = engine.counters()
                self.model.update_health(events=seen,
                                         events_per_s=(seen - last_seen) / (now - last_t),
                                         lost=c.lost, untraced=c.inflight_full)
                last_seen, last_t = seen, now
        self._ingest(engine.drain(), clock)

    def _ingest(self, raws: list[bytes], clock: Clock) -> None:
        items = []
        for raw in raws:
            ev = decode(raw, clock)
            if ev.errno in NOT_FAILURES or ev.call not in CALLS:
                continue
            items.append((ev, None, explainable(ev)))
        if not items:
            return
        seqs = self.model.add_conflicts(items)
        skipped = []
        with self._wake:
            for seq, (ev, _, wanted) in zip(seqs, items):
                if not wanted:
                    continue
                if len(self._queue) >= EXPLAIN_QUEUE:
                    skipped.append(self._queue.popleft()[0])
                self._queue.append((seq, ev))
            self._wake.notify()
        if skipped:
            self._skipped += len(skipped)
            self.model.update_health(explain_skipped=self._skipped)
            for seq in skipped:
                self.model.explain(seq, Explanation(
                    error="not explained: too many distinct failures at once"))

    # -- explanations

    def _explain_loop(self) -> None:
        from .onthespot import OnTheSpot

        spot = OnTheSpot()
        try:
            while not self._stop.is_set():
                with self._wake:
                    while not self._queue and not self._stop.is_set():
                        self._wake.wait(0.5)
                    if self._stop.is_set():
                        return
                    seq, ev = self._queue.popleft()
                finding = spot.explain(ev)
                self.model.explain(seq, None if finding is None
                                   else explanation_from_finding(finding))
                if spot.failures:
                    self.model.update_health(explain_failures=spot.failures)
        finally:
            spot.close()

    # -- periodic views

    def _refresh_loop(self) -> None:
        from .sockflags import SocketIterators

        its = SocketIterators()
        watcher = self._open_watcher() if self.want_groups else None
        views = GroupViews()
        tasks: list[tuple[str, float, Callable[[], None]]] = [
            ("ports", self.intervals.ports, lambda: self._refresh_ports(its)),
            ("timewait", self.intervals.timewait, self._refresh_timewait),
        ]
        if watcher is not None:
            tasks.insert(0, ("groups", self.intervals.groups,
                             lambda: self._refresh_groups(watcher, views)))
        due = {name: 0.0 for name, _, _ in tasks}
        costs: dict[str, float] = {}
        try:
            while not self._stop.is_set():
                for name, every, run in tasks:
                    if self._stop.is_set() or time.monotonic() < due[name]:
                        continue
                    start = time.monotonic()
                    try:
                        run()
                        self.model.set_error(name, None)
                    except (PortscopeError, OSError) as exc:
                        self.model.set_error(name, f"{name} could not be read: {exc}")
                    cost = time.monotonic() - start
                    costs[name] = cost * 1000
                    due[name] = start + max(every, cost / BUDGET)
                    self.model.update_health(refresh_ms=tuple(sorted(costs.items())))
                wait = min(due.values()) - time.monotonic()
                if wait > 0:
                    self._stop.wait(min(wait, 0.5))
        finally:
            its.close()
            if watcher is not None:
                watcher.close()

    def _open_watcher(self) -> object | None:
        from .groups import GroupWatcher

        try:
            return GroupWatcher(plan=self.config.plan, btf_path=self.config.btf_path)
        except PortscopeError as exc:
            self.model.set_error("groups", f"reuseport groups are not counted: {exc}")
            return None

    def _refresh_ports(self, its: object) -> None:
        from .inventory import take

        inv = take(states=PORT_STATES, iterators=its)  # type: ignore[arg-type]
        rows = sort_rows([socket_row(s) for s in inv.sockets])
        self.model.set_ports(rows)
        self.model.update_health(unreadable_processes=inv.unreadable_processes,
                                 flags_unknown=inv.flags_unknown, namespaces=inv.namespaces,
                                 namespaces_gone=inv.namespaces_gone)

    def _refresh_groups(self, watcher: object, views: GroupViews) -> None:
        snap = watcher.read()  # type: ignore[attr-defined]
        self.model.set_groups(views.update(snap.to_json()))

    def _refresh_timewait(self) -> None:
        from .closers import read_pinned
        from .inventory import select_namespaces, take
        from .netns import port_range
        from .timewait import pressure

        inv = take(protocols=("tcp",), details=False)
        closers, collectors = read_pinned()
        refs, _ = select_namespaces(None)
        ranges = {ref.inode: rng for ref in refs if (rng := port_range(ref)) is not None}
        self.model.set_timewait(timewait_view(inv.sockets, closers, collectors, ranges,
                                              pressure(inv, None), time.time()))


# ---- replay ----------------------------------------------------------------------


class Replay:
    """Fills a model from a recording: JSON lines, each either an event as
    ``portscope trace --json`` prints it (optionally with ``fixes`` and
    ``notes``), or ``{"record": "ports"|"groups"|"timewait"|"health", ...}``.

    :meth:`load` applies everything at once (tests); :meth:`play` keeps the
    recording's pace in a thread (``portscope ui --replay``)."""

    def __init__(self, model: StateModel, path: str | Path) -> None:
        self.model = model
        self.path = Path(path)
        self.lines = _read_recording(self.path)
        self._groups = GroupViews()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.model.update_health(source="replay", plan=self._plan(), started=self._first_time())

    def _plan(self) -> str | None:
        return next((d["plan"] for d in self.lines if "call" in d), None)

    def _first_time(self) -> float:
        return next((float(d["time"]) for d in self.lines if "time" in d), 0.0)

    def apply(self, doc: dict) -> None:
        kind = doc.get("record", "event")
        if kind == "event":
            ev = event_from_json(doc)
            self.model.add_conflict(ev, explanation_from_json(doc))
        elif kind == "ports":
            self.model.set_ports(sort_rows([SocketRow.from_json(s) for s in doc["sockets"]]),
                                 doc.get("time"))
            health = doc.get("health") or {}
            self.model.update_health(**{k: v for k, v in health.items()
                                        if k in Health.__dataclass_fields__})
        elif kind == "groups":
            self.model.set_groups(self._groups.update(doc))
        elif kind == "timewait":
            self.model.set_timewait(timewait_from_json(doc))
        elif kind == "health":
            self.model.update_health(**{k: (tuple(v) if isinstance(v, list) else v)
                                        for k, v in doc.items()
                                        if k in Health.__dataclass_fields__})

    def load(self) -> StateModel:
        for doc in self.lines:
            self.apply(doc)
        return self.model

    def check(self) -> None:
        """Apply every line to a scratch model, so that a damaged or forged
        recording is one sentence (UsageError) before any screen opens,
        never an exception in the replay thread under the UI."""
        scratch = Replay.__new__(Replay)
        scratch.model, scratch.path, scratch.lines = StateModel(), self.path, self.lines
        scratch._groups = GroupViews()
        for number, doc in enumerate(self.lines, 1):
            try:
                scratch.apply(doc)
            except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
                raise UsageError(f"cannot replay {self.path}: line {number} is not a portscope "
                                 f"recording line ({type(exc).__name__}: {exc})") from None

    def play(self, speed: float = 1.0, loop: bool = False) -> None:
        def run() -> None:
            while not self._stop.is_set():
                t0, start = None, time.monotonic()
                for doc in self.lines:
                    t = doc.get("time")
                    if t is not None:
                        t0 = t if t0 is None else t0
                        delay = (t - t0) / speed - (time.monotonic() - start)
                        if delay > 0 and self._stop.wait(min(delay, 5.0)):
                            return
                    self.apply(doc)
                if not loop:
                    return
        self._thread = threading.Thread(target=run, name="portscope-replay", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(2)


def _read_recording(path: Path) -> list[dict]:
    """The JSON objects of a recording, one per line; one sentence when the
    file cannot be read or a line is not a JSON object."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise UsageError(f"cannot replay {path}: {reason}") from None
    docs = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except (ValueError, RecursionError):
            doc = None
        if not isinstance(doc, dict):
            raise UsageError(f"cannot replay {path}: line {number} is not a JSON object")
        docs.append(doc)
    return docs


def load_recording(path: str | Path, model: StateModel | None = None) -> StateModel:
    """A model filled with everything a recording holds."""
    return Replay(model or StateModel(), path).load()
