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
  :class:`~tracer.reuseport.GroupWatcher`) and the TIME_WAIT holders with
  ephemeral-port pressure (every 5 s). Each refresh's cost is bounded: it
  runs again no sooner than ``1 / BUDGET`` times its last duration, so on a
  host where an inventory takes 0.8 s it runs every 3.2 s, not every 2 s.

The views it makes are tracer/views.py's; tracer/recording.py fills the same
model from recorded JSON lines.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Callable

from .cgroups import CgroupPaths
from .closers import read_pinned
from .engine import Engine, EngineConfig, Need
from .errors import PortscopeError
from .events import Clock, decode
from .inventory import select_namespaces, take
from .loader import open_engine
from .netns import port_range
from .nsnames import NetnsNames
from .onthespot import explainable
from .owners import OwnerCache, caller_of
from .records import CallEvent, EventExplanation
from .reuseport import GroupWatcher
from .runtime import POLL_MS
from .sockflags import SharedIterators
from .state import StateModel
from .timewait import pressure
from .views import (
    CALLS,
    NOT_FAILURES,
    GroupViews,
    socket_row,
    sort_rows,
    timewait_view,
)

RATE_EVERY_S = 1.0
PORTS_EVERY_S = 2.0
GROUPS_EVERY_S = 1.0
TIMEWAIT_EVERY_S = 5.0
BUDGET = 0.25  # share of a core one periodic refresh may take on average
EXPLAIN_QUEUE = 256
# Failures whose caller is still to be read (exe, command line, unit). In a
# storm the oldest are passed over (shown with comm[pid] only), never queued
# without end.
CALLERS_QUEUE = 1024
# Every state but TIME_WAIT: those have their own screen, and a busy host has
# 100,000s of them.
PORT_STATES = ("ESTABLISHED", "SYN_SENT", "SYN_RECV", "FIN_WAIT1", "FIN_WAIT2", "CLOSE",
               "CLOSE_WAIT", "LAST_ACK", "LISTEN", "CLOSING")



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
        # One object for the whole process: the events, the group counting
        # (when the kernel allows a plan for it) and the iterators.
        self.config = replace(config or EngineConfig(errors_only=True),
                              groups=Need.OPTIONAL if groups else Need.OFF, iterators=True)
        self.intervals = intervals or Intervals()
        self.want_groups = groups
        self.engine: Engine | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._queue: deque[tuple[int, CallEvent]] = deque()
        self._callers: deque[tuple[int, CallEvent]] = deque(maxlen=CALLERS_QUEUE)
        self._wake = threading.Condition()
        self._skipped = 0

    # -- lifecycle

    def start(self) -> None:
        self.engine = open_engine(self.config)
        skipped = tuple(f"{a.plan.value}: {a.reason}" for a in self.engine.attempts if not a.ok)
        if self.engine.compat_callers.startswith("no: "):  # said where the plan is shown
            skipped += (f"32-bit programs not seen: {self.engine.compat_callers.removeprefix('no: ')}",)
        self.model.update_health(source="live", plan=self.engine.plan_name, plan_notes=skipped,
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
                self._callers.append((seq, ev))
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
                self.model.explain(seq, EventExplanation(
                    error="not explained: too many distinct failures at once"))

    # -- explanations

    def _explain_loop(self) -> None:
        from .onthespot import OnTheSpot

        spot = OnTheSpot()
        paths = CgroupPaths()
        try:
            while not self._stop.is_set():
                with self._wake:
                    while not self._queue and not self._callers and not self._stop.is_set():
                        self._wake.wait(0.5)
                    if self._stop.is_set():
                        return
                    callers = list(self._callers)
                    self._callers.clear()
                    job = self._queue.popleft() if self._queue else None
                if callers:  # before the explanation: a failed caller often exits at once
                    cache = OwnerCache()
                    self.model.identify((seq, caller_of(ev, cache, paths)) for seq, ev in callers)
                if job is None:
                    continue
                seq, ev = job
                self.model.explain(seq, spot.explain(ev))
                if spot.failures:
                    self.model.update_health(explain_failures=spot.failures)
        finally:
            spot.close()

    # -- periodic views

    def _refresh_loop(self) -> None:
        its = SharedIterators()
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

    def _open_watcher(self) -> GroupWatcher | None:
        assert self.engine is not None, "the collector is not started"
        try:
            return GroupWatcher(engine=self.engine)
        except PortscopeError as exc:
            self.model.set_error("groups", f"reuseport groups are not counted: {exc}")
            return None

    def _refresh_ports(self, its: SharedIterators) -> None:
        inv = take(states=PORT_STATES, iterators=its)
        names = NetnsNames(inv.scan)  # read again with each inventory: names come and go
        rows = sort_rows([socket_row(s, names) for s in inv.sockets])
        labels = {ns: label for ns in {r.netns for r in rows} if (label := names.label(ns))}
        self.model.set_ports(rows, netns_names=labels)
        self.model.update_health(unreadable_processes=inv.unreadable_processes,
                                 flags_unknown=inv.flags_unknown, namespaces=inv.namespaces,
                                 namespaces_gone=inv.namespaces_gone)

    def _refresh_groups(self, watcher: GroupWatcher, views: GroupViews) -> None:
        self.model.set_groups(views.update(watcher.read()))

    def _refresh_timewait(self) -> None:
        inv = take(protocols=("tcp",), details=False)
        closers, collectors = read_pinned()
        refs, _ = select_namespaces(None)
        ranges = {ref.inode: rng for ref in refs if (rng := port_range(ref)) is not None}
        self.model.set_timewait(timewait_view(inv.sockets, closers, collectors, ranges,
                                              pressure(inv, None), time.time()))
