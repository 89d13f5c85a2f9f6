"""``portscope export``: Prometheus metrics of what the probes see.

The collector loop is trace's (poll the ring buffer, decode, count); a
background thread refreshes the TIME_WAIT / ephemeral-port figures and the
reuseport groups every ``--interval`` seconds, and never more often than
ten times as long as the previous refresh took (a huge host gets fewer
refreshes, not a busy exporter). Scrapes only read what was counted.

Two bounds, so that no host, busy or hostile, can blow up the number of
series (any local user chooses the comm names and ports that fail):

* per label: ``port``, ``comm`` and ``netns`` values beyond the top N (by
  count, ``--top``, default 50) are folded into ``"other"``;
* per metric: at most ``--max-series`` series (default 500) whatever the
  combination of label values: beyond the top S-1 label sets, the rest are
  one series whose every label is ``"other"`` (60 comm names failing on 60
  ports each would otherwise be 51 x 51 series).

The rankings are redone at every scrape (and every second): a value entering
the top gets its own series starting at 0 from then on (its earlier count
stays in ``other``); one leaving it has its count added to ``other`` and its
series dropped. Every counter stays monotonic and the series always sum to
the exact total.
"""

from __future__ import annotations

import argparse
import ipaddress
import threading
import time
from collections import Counter
from typing import Iterable, Iterator

from .engine import Counters, EngineConfig
from .loader import open_engine
from .errors import ExitStatus, PortscopeError, UsageError
from .events import Clock, decode
from .plans import Plan
from .runtime import StopSignal, announce, report_losses, say
from .runtime import COALESCE_S, POLL_MS

OTHER = "other"
DEFAULT_LISTEN = "127.0.0.1:9977"
DEFAULT_TOP = 50
DEFAULT_MAX_SERIES = 500
MAX_PENDING = 100_000  # distinct un-ranked label sets before an early re-rank
MAX_SEEN = 100_000  # distinct values ranked per label (beyond: the rarest are forgotten)
RERANK_S = 1.0
SLOW_FACTOR = 10  # a refresh waits at least this many times its last duration


def parse_listen(text: str) -> tuple[str, int]:
    """'127.0.0.1:9977', '[::1]:9977', '0.0.0.0:9977' -> (address, port)."""
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text, 10)
        ipaddress.ip_address(host)
        if not sep or not 1 <= port <= 65535:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid --listen {text!r}: use ADDRESS:PORT with an IP address and a port "
            "from 1 to 65535, e.g. 127.0.0.1:9977 or [::]:9977") from None
    return host, port


# ---- label folding ----------------------------------------------------------------


class Fold:
    """The values of one label that get their own series: the top ``top``
    by count; every other value is ``"other"``."""

    def __init__(self, top: int) -> None:
        self.top = top
        self.kept: set[str] = set()
        self.seen: Counter[str] = Counter()

    def count(self, value: str, n: int = 1) -> None:
        self.seen[value] += n
        if len(self.seen) > MAX_SEEN:
            self.seen = Counter(dict(self.seen.most_common(MAX_SEEN // 10)))

    def rank(self) -> tuple[set[str], set[str]]:
        """Recompute the top; return (promoted, evicted). Ties keep the
        values already kept, then the smallest value, so that the set does
        not churn."""
        order = sorted(self.seen.items(), key=lambda kv: (-kv[1], kv[0] not in self.kept, kv[0]))
        wanted = {v for v, _ in order[:self.top]}
        promoted, evicted = wanted - self.kept, self.kept - wanted
        self.kept = wanted
        return promoted, evicted

    def label(self, value: str) -> str:
        return value if value in self.kept else OTHER


class FoldedCounter:
    """Counts of label tuples, folded twice: some positions by :class:`Fold`
    (their top values), then the tuples themselves (the top
    ``max_series - 1``; the rest add up in one all-``"other"`` series).
    ``add`` is cheap (the loop calls it per event); ``samples`` re-ranks and
    returns at most ``max_series`` series. Thread-safe (scrapes come from
    the HTTP server's threads)."""

    def __init__(self, names: tuple[str, ...], folded: dict[str, int],
                 max_series: int = DEFAULT_MAX_SERIES) -> None:
        self.names = names
        self.folds = {names.index(n): Fold(top) for n, top in folded.items()}
        self.series = Fold(max(max_series - 1, 1))
        self.everything_else = (OTHER,) * len(names)
        self.values: dict[tuple[str, ...], int] = {}
        self._pending: Counter[tuple[str, ...]] = Counter()
        self._lock = threading.Lock()
        self.total = 0

    def add(self, labels: tuple[str, ...], n: int = 1) -> None:
        with self._lock:
            self._pending[labels] += n
            self.total += n
            if len(self._pending) > MAX_PENDING:
                self._settle()

    def settle(self) -> None:
        with self._lock:
            self._settle()

    def samples(self) -> list[tuple[tuple[str, ...], int]]:
        with self._lock:
            self._settle()
            return sorted(self.values.items())

    def _settle(self) -> None:
        for pos, fold in self.folds.items():
            per_value: Counter[str] = Counter()
            for labels, n in self._pending.items():
                per_value[labels[pos]] += n
            for value, n in per_value.items():
                fold.count(value, n)
            _, evicted = fold.rank()
            if evicted:
                # Their counts go to "other": no counter ever goes down.
                for labels in [k for k in self.values if k[pos] in evicted]:
                    self._move(labels, labels[:pos] + (OTHER,) + labels[pos + 1:])
        pending: Counter[tuple[str, ...]] = Counter()
        for labels, n in self._pending.items():
            pending[self._fold(labels)] += n
        for key, n in pending.items():
            self.series.count(key, n)  # type: ignore[arg-type]
        self.series.rank()
        kept = self.series.kept
        for key in [k for k in self.values if k not in kept and k != self.everything_else]:
            self._move(key, self.everything_else)
        for key, n in pending.items():
            key = key if key in kept else self.everything_else
            self.values[key] = self.values.get(key, 0) + n
        self._pending.clear()

    def _move(self, key: tuple[str, ...], into: tuple[str, ...]) -> None:
        n = self.values.pop(key)
        self.values[into] = self.values.get(into, 0) + n

    def _fold(self, labels: tuple[str, ...]) -> tuple[str, ...]:
        if not self.folds:
            return labels
        out = list(labels)
        for pos, fold in self.folds.items():
            out[pos] = fold.label(out[pos])
        return tuple(out)


def cap_series(samples: Iterable[tuple[tuple[str, ...], float]],
               max_series: int) -> list[tuple[tuple[str, ...], float]]:
    """For gauges (nothing to keep monotonic): the ``max_series - 1`` largest
    series, and the rest summed in one series whose labels are all "other"."""
    ordered = sorted(samples, key=lambda kv: (-kv[1], kv[0]))
    if len(ordered) <= max_series:
        return ordered
    keep, rest = ordered[:max_series - 1], ordered[max_series - 1:]
    return keep + [((OTHER,) * len(rest[0][0]), sum(v for _, v in rest))]


def label_value(text: str) -> str:
    """A label value Prometheus can carry: UTF-8. Text read from the host
    keeps bytes that are not UTF-8 (tracer.text.system_text); those are shown
    as ``\\xNN`` here, the rest is exact (the exposition escapes quotes,
    backslashes and newlines itself)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def top_with_other(counts: Iterable[tuple[str, float]], top: int) -> list[tuple[str, float]]:
    """For gauges (no monotonicity to keep): the top values, and the rest
    summed as "other" when there is a rest."""
    ordered = sorted(counts, key=lambda kv: (-kv[1], kv[0]))
    out = list(ordered[:top])
    rest = sum(v for _, v in ordered[top:])
    if len(ordered) > top:
        out.append((OTHER, rest))
    return out


# ---- the metrics ------------------------------------------------------------------


class Metrics:
    """What the exporter knows; ``collect()`` turns it into metric families
    (a prometheus_client custom collector)."""

    FAILURE_LABELS = ("call", "errno", "port", "comm", "netns")

    def __init__(self, top: int, max_series: int = DEFAULT_MAX_SERIES) -> None:
        self.top = top
        self.max_series = max_series
        self.failures = FoldedCounter(self.FAILURE_LABELS, {"port": top, "comm": top, "netns": top},
                                      max_series)
        self.counters = Counters()
        self.plan = ""
        self.attempts: list[tuple[str, bool, str]] = []
        self.groups_plan = ""
        self.timewait: list[tuple[str, float]] = []
        self.timewait_total = 0
        self.pressure: list[tuple[str, str, str, int, int]] = []
        self.groups: list[dict[str, object]] = []
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
            f"refusals), by errno, port, comm and netns; values beyond the top {self.top} of "
            "port, comm and netns are folded into \"other\", and beyond "
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
        sizes, members = [], []
        for g in groups:
            key = (str(g["netns"]), str(g["protocol"]), str(g["local"]), str(g["id"]))
            sizes.append((key, float(g["size"])))  # type: ignore[arg-type]
            for m in g["members"]:  # type: ignore[attr-defined]
                members.append(((*key, str(m["inode"]), m["comm"]), float(m["delivered"])))
        for key, n in cap_series(sizes, self.max_series):
            size.add_metric(list(key), n)
        for key, n in cap_series(members, self.max_series):
            delivered.add_metric(list(key), n)
        yield size
        yield delivered

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

    def __init__(self, metrics: Metrics, interval: float, groups: bool,
                 plan: Plan | None, btf: str | None) -> None:
        self.metrics = metrics
        self.interval = interval
        self.watcher = None
        self.warning = ""
        if groups:
            try:
                from .reuseport import GroupWatcher

                self.watcher = GroupWatcher(plan=plan, btf_path=btf)
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
            snap = self.watcher.read()
            groups = []
            for g in sorted(snap.groups, key=lambda g: -g.delivered)[:top]:
                groups.append({
                    "netns": g.netns, "protocol": g.protocol, "local": g.local,
                    "id": f"{g.id:08x}", "size": g.size,
                    "members": [{"inode": m.inode, "delivered": m.delivered,
                                 "comm": label_value(",".join(sorted({o.comm for o in m.owners}))
                                                     or "?")}
                                for m in g.members],
                })
            self.metrics.set_refresh("groups", time.monotonic() - started, groups=groups)
        except Exception:  # noqa: BLE001
            self.metrics.refresh_errors["groups"] += 1


# ---- the command ------------------------------------------------------------------


def run(args: argparse.Namespace) -> ExitStatus:
    try:
        from prometheus_client import start_http_server
        from prometheus_client.registry import CollectorRegistry
    except ImportError as exc:
        raise PortscopeError(f"portscope export needs the prometheus-client package ({exc}): "
                             "install portscope with scripts/setup") from exc
    host, port = args.listen
    metrics = Metrics(args.top, args.max_series)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics)  # type: ignore[arg-type]
    stop = StopSignal()
    plan = None if args.plan == "auto" else Plan(args.plan)
    engine = open_engine(EngineConfig(plan=plan, errors_only=True, ring_bytes=args.ring_size,
                                      btf_path=args.btf))
    refresher = None
    server = None
    try:
        metrics.plan = engine.plan.value
        metrics.attempts = [(a.plan.value, a.ok, a.reason) for a in engine.attempts]
        try:
            started = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
        server = started[0] if isinstance(started, tuple) else None
        refresher = Refresher(metrics, args.interval, not args.no_groups, plan, args.btf)
        announce(engine)
        if refresher.warning:
            say(refresher.warning)
        shown = f"[{host}]" if ":" in host else host
        say(f"metrics on http://{shown}:{port}/metrics")
        refresher.start()
        _collect(engine, metrics, stop)
    finally:
        if refresher is not None:
            refresher.stop()
        if server is not None:
            server.shutdown()
        engine.close()
    return ExitStatus.OK


def _collect(engine, metrics: Metrics, stop: StopSignal) -> None:  # type: ignore[no-untyped-def]
    clock = Clock()
    reported = Counters()
    next_check = time.monotonic() + RERANK_S

    def count(raws: list[bytes]) -> None:
        for raw in raws:
            ev = decode(raw, clock)
            if ev.errno:
                metrics.failures.add((ev.call, ev.errno_name or str(ev.errno), str(ev.port),
                                      label_value(ev.comm), str(ev.netns)))

    while not stop.requested:
        raws = engine.poll(POLL_MS)
        count(raws)
        if raws:
            time.sleep(COALESCE_S)
        if time.monotonic() >= next_check:
            metrics.counters = engine.counters()
            reported = report_losses(metrics.counters, reported)
            metrics.failures.settle()
            next_check = time.monotonic() + RERANK_S
    count(engine.drain())
