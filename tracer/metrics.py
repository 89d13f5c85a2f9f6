"""What ``portscope export`` exposes: :class:`Metrics` (a prometheus_client
collector over what was counted: failures, lost events, plans, TIME_WAIT,
ephemeral ports, reuseport groups) and the :class:`Refresher` thread that
reads TIME_WAIT, ephemeral pressure and the groups every interval, and never
more often than ten times as long as the previous read took (a huge host
gets fewer refreshes, not a busy exporter). Scrapes only read what was
counted. Every metric's series are bounded (tracer/series.py)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Iterator

from .engine import Counters, Engine
from .errors import PortscopeError
from .records import Group
from .reuseport import GroupWatcher
from .series import (
    DEFAULT_MAX_SERIES,
    FoldedCounter,
    cap_series,
    label_value,
    top_with_other,
)

SLOW_FACTOR = 10  # a refresh waits at least this many times its last duration


class Metrics:
    """What the exporter knows; ``collect()`` turns it into metric families
    (a prometheus_client custom collector)."""

    # container: the caller's container id (12 hex digits, from its cgroup
    # path), "" for a process in no container.
    FAILURE_LABELS = ("call", "errno", "port", "comm", "netns", "container")

    def __init__(self, top: int, max_series: int = DEFAULT_MAX_SERIES) -> None:
        self.top = top
        self.max_series = max_series
        self.failures = FoldedCounter(self.FAILURE_LABELS, {"port": top, "comm": top, "netns": top,
                                                           "container": top},
                                      max_series)
        self.counters = Counters()
        self.plan = ""
        self.attempts: list[tuple[str, bool, str]] = []
        self.groups_plan = ""
        self.timewait: list[tuple[str, float]] = []
        self.timewait_total = 0
        self.pressure: list[tuple[str, str, str, int, int]] = []
        self.groups: list[Group] = []  # the busiest --top groups of the last read
        self.refresh_seconds: dict[str, float] = {}
        self.refresh_errors: Counter[str] = Counter()
        self.refreshed = False
        self._lock = threading.Lock()

    def set_refresh(self, what: str, seconds: float, **fields: object) -> None:
        with self._lock:
            self.refresh_seconds[what] = seconds
            for k, v in fields.items():
                setattr(self, k, v)
            self.refreshed = True

    def collect(self) -> Iterator[object]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        fam = CounterMetricFamily(
            "portscope_failures", "Failed bind(), listen() and connect() calls (and port-allocator "
            f"refusals), by errno, port, comm, netns and container; values beyond the top "
            f"{self.top} of port, comm, netns and container are folded into \"other\", and beyond "
            f"{self.max_series} series the rest is one series labelled \"other\"",
            labels=self.FAILURE_LABELS)
        for labels, n in self.failures.samples():
            fam.add_metric(list(labels), n)
        yield fam

        c = self.counters
        for name, value, text in (
                ("portscope_events_lost", c.lost, "Events dropped by the kernel: ring buffer full"),
                ("portscope_calls_untraced", c.inflight_full,
                 "Calls not traced: too many in flight at once"),
                ("portscope_events_emitted", c.emitted, "Events the probes sent")):
            f = CounterMetricFamily(name, text)
            f.add_metric([], value)
            yield f

        info = GaugeMetricFamily("portscope_probe_plan_info",
                                 "The probe plan in use (1), for events and for group counting",
                                 labels=["plan", "use"])
        if self.plan:
            info.add_metric([self.plan, "events"], 1)
        if self.groups_plan:
            info.add_metric([self.groups_plan, "groups"], 1)
        yield info
        att = GaugeMetricFamily("portscope_probe_plan_available",
                                "Probe plans tried at start: 1 loaded, 0 refused by this kernel",
                                labels=["plan"])
        for plan, ok, _reason in self.attempts:
            att.add_metric([plan], 1 if ok else 0)
        yield att

        with self._lock:
            timewait, total = list(self.timewait), self.timewait_total
            pressure, groups = list(self.pressure), list(self.groups)
            seconds, errors = dict(self.refresh_seconds), Counter(self.refresh_errors)
            refreshed = self.refreshed
        if refreshed:
            tw = GaugeMetricFamily("portscope_time_wait_sockets",
                                   f"TIME_WAIT sockets by local port (top {self.top}, the rest "
                                   "as \"other\")", labels=["port"])
            for (port,), n in cap_series((((p,), n) for p, n in timewait), self.max_series):
                tw.add_metric([port], n)
            yield tw
            f = GaugeMetricFamily("portscope_time_wait_sockets_all", "TIME_WAIT sockets in all")
            f.add_metric([], total)
            yield f
        names = ["netns", "source", "destination"]
        used = GaugeMetricFamily("portscope_ephemeral_ports_in_use",
                                 "Ephemeral ports in use per source address and destination "
                                 f"(the {self.top} fullest)", labels=names)
        cap = GaugeMetricFamily("portscope_ephemeral_ports_capacity",
                                "Usable ports of ip_local_port_range towards that destination",
                                labels=names)
        for ns, src, dst, in_use, capacity in pressure[:self.max_series]:
            used.add_metric([ns, src, dst], in_use)
            cap.add_metric([ns, src, dst], capacity)
        yield used
        yield cap

        glabels = ["netns", "protocol", "local", "group"]
        size = GaugeMetricFamily("portscope_reuseport_group_members",
                                 "Sockets in each SO_REUSEPORT group (the kernel's count)",
                                 labels=glabels)
        delivered = CounterMetricFamily(
            "portscope_reuseport_delivered", "Connections (TCP) or datagrams (UDP) delivered to "
            "each member since the exporter started or the member joined",
            labels=[*glabels, "inode", "comm"])
        served = GaugeMetricFamily(
            "portscope_reuseport_member_served", "1 while the member's connections are taken; "
            "0 when its process is stopped, it refuses connections for a full queue, or "
            "connections wait that nobody takes (status says which, acceptor who)",
            labels=[*glabels, "inode", "acceptor", "status"])
        queue = GaugeMetricFamily("portscope_reuseport_member_queue",
                                  "Connections waiting in the member's accept queue (TCP) or "
                                  "bytes in its receive queue (UDP)", labels=[*glabels, "inode"])
        drops = CounterMetricFamily("portscope_reuseport_member_drops",
                                    "Connections (TCP, accept queue full) or datagrams (UDP, "
                                    "buffer full) the member dropped: the kernel's sk_drops",
                                    labels=[*glabels, "inode"])
        Series = list[tuple[tuple[str, ...], float]]
        sizes: Series = []
        members: Series = []
        states: Series = []
        queues: Series = []
        dropped: Series = []
        for g in groups:
            key = (str(g.netns), g.protocol, g.local, f"{g.id:08x}")
            sizes.append((key, float(g.size)))
            for m in g.members:
                comm = label_value(",".join(sorted({o.comm for o in m.owners})) or "?")
                members.append(((*key, str(m.inode), comm), float(m.delivered)))
                taker = label_value(m.taker_label() if m.acceptors else "unknown")
                states.append(((*key, str(m.inode), taker, m.status),
                               1.0 if m.status == "ok" else 0.0))
                queues.append(((*key, str(m.inode)), float(m.queue)))
                if m.drops is not None:
                    dropped.append(((*key, str(m.inode)), float(m.drops)))
        families: list[tuple[GaugeMetricFamily | CounterMetricFamily, Series]] = [
            (size, sizes), (delivered, members), (queue, queues), (drops, dropped)]
        for family, series in families:
            for labels, amount in cap_series(series, self.max_series):
                family.add_metric(list(labels), amount)
        # A 0/1 gauge has no "other" to sum into: the members not served come
        # first, so that a cap never hides one.
        for labels, amount in sorted(states, key=lambda kv: (kv[1], kv[0]))[:self.max_series]:
            served.add_metric(list(labels), amount)
        yield size
        yield delivered
        yield served
        yield queue
        yield drops

        dur = GaugeMetricFamily("portscope_refresh_duration_seconds",
                                "Time the last TIME_WAIT / groups refresh took", labels=["what"])
        for what, s in seconds.items():
            dur.add_metric([what], s)
        yield dur
        err = CounterMetricFamily("portscope_refresh_errors", "Refreshes that failed",
                                  labels=["what"])
        for what, n in errors.items():
            err.add_metric([what], n)
        yield err


# ---- the periodic reads -----------------------------------------------------------


class Refresher:
    """TIME_WAIT, ephemeral pressure and reuseport groups, read in a thread."""

    def __init__(self, metrics: Metrics, interval: float, engine: Engine, groups: bool) -> None:
        self.metrics = metrics
        self.interval = interval
        self.watcher: GroupWatcher | None = None
        self.warning = ""
        if groups:
            try:
                self.watcher = GroupWatcher(engine=engine)
                metrics.groups_plan = self.watcher.plan.value
            except (PortscopeError, OSError) as exc:
                self.warning = f"reuseport groups not counted: {exc}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="portscope-refresh", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        if self.watcher is not None:
            self.watcher.close()

    def _main(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.refresh()
            took = time.monotonic() - started
            self._stop.wait(max(self.interval, SLOW_FACTOR * took) - took)

    def refresh(self) -> None:
        top = self.metrics.top
        started = time.monotonic()
        try:
            from .timewait import report

            r = report()
            tw = top_with_other(((g.key, float(g.count)) for g in r.groups), top)
            pressure = [(str(p.netns), p.source, p.destination, p.in_use, p.capacity)
                        for p in r.pressure[:top]]
            self.metrics.set_refresh("timewait", time.monotonic() - started, timewait=tw,
                                     timewait_total=r.total, pressure=pressure)
        except Exception:  # noqa: BLE001 - one failed read must not stop the exporter
            self.metrics.refresh_errors["timewait"] += 1
        if self.watcher is None:
            return
        started = time.monotonic()
        try:
            reading = self.watcher.read()
            groups = sorted(reading.groups, key=lambda g: -g.delivered)[:top]
            self.metrics.set_refresh("groups", time.monotonic() - started, groups=groups)
        except Exception:  # noqa: BLE001
            self.metrics.refresh_errors["groups"] += 1


