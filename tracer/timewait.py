"""TIME_WAIT holders and ephemeral-port pressure.

TIME_WAIT sockets come from the inventory (sock_diag); who left each one is
the process that closed the connection first, recorded in the kernel by a
running collector (tracer.closers). Pressure is what makes connect() fail
with EADDRNOTAVAIL: for each source address and destination, the local
ports in use against ip_local_port_range.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

from .closers import Closer, ConnKey, read_pinned
from .colour import PLAIN, Palette, palette
from .filters import Filter
from .inventory import Inventory, Socket, select_namespaces, take
from .netns import PortRange, port_range
from .nsnames import NetnsNames, with_netns_name
from .records import format_addr
from .text import printable

HISTOGRAM_EDGES_S = (10, 20, 30, 40, 50, 60)
PRESSURE_WARN = 0.8  # warn from 80 % of the range in use towards one destination


def is_time_wait(s: Socket) -> bool:
    # A closed connection still waiting for the peer's FIN is a TIME_WAIT
    # socket inside the kernel, reported as FIN_WAIT2 with the timewait timer.
    return s.diag.state == "TIME_WAIT" or (s.diag.state == "FIN_WAIT2" and s.diag.timer == "timewait")


def endpoint(s: Socket, rng: PortRange | None) -> tuple[str, str]:
    """(port, remote) a TIME_WAIT socket is counted under. On a server the
    remote port is the client's ephemeral one, different for every socket:
    the remote is its address alone, and the port is ours. On a connection
    we opened (our port in ``ip_local_port_range``, the remote's not) it is
    the reverse: our port is "ephemeral", the remote keeps its service port."""
    d = s.diag
    if rng is not None and rng.low <= d.local_port <= rng.high \
            and not rng.low <= d.remote_port <= rng.high:
        return "ephemeral", format_addr(d.family, d.remote_addr, d.remote_port)
    return str(d.local_port), d.remote_addr


def key_of(s: Socket) -> ConnKey:
    d = s.diag
    return (d.netns, d.family, d.local_addr, d.local_port, d.remote_addr, d.remote_port)


@dataclass
class Group:
    key: str
    count: int = 0
    min_left_ms: int = 0
    max_left_ms: int = 0

    def add(self, left_ms: int) -> None:
        self.min_left_ms = left_ms if not self.count else min(self.min_left_ms, left_ms)
        self.max_left_ms = max(self.max_left_ms, left_ms)
        self.count += 1


@dataclass
class Pressure:
    netns: int
    source: str
    destination: str
    in_use: int
    capacity: int

    @property
    def share(self) -> float:
        return self.in_use / self.capacity if self.capacity else 1.0

    @property
    def level(self) -> str:
        return "full" if self.in_use >= self.capacity else (
            "warning" if self.share >= PRESSURE_WARN else "ok")


@dataclass
class TimewaitReport:
    total: int
    attributed: int
    collectors: int  # running portscope collectors whose records were read
    groups: list[Group]
    histogram: list[tuple[str, int]]
    pressure: list[Pressure]
    inventory: Inventory
    notes: list[str] = field(default_factory=list)

    def to_json(self, by: str) -> dict[str, object]:
        names = NetnsNames(self.inventory.scan)
        return {
            "time_wait": self.total, "attributed": self.attributed, "collectors": self.collectors,
            "by": by,
            "groups": [{"key": g.key, "count": g.count, "min_left_ms": g.min_left_ms,
                        "max_left_ms": g.max_left_ms} for g in self.groups],
            "time_left_histogram": [{"le_s": b, "count": c} for b, c in self.histogram],
            "pressure": [with_netns_name({
                "netns": p.netns, "source": p.source, "destination": p.destination,
                "in_use": p.in_use, "capacity": p.capacity,
                "share": round(p.share, 4), "level": p.level}, names)
                for p in self.pressure],
            "notes": self.notes,
            "health": self.inventory.health(),
        }


def report(port: int | None = None, by: str = "port", netns: str | None = None,
           closers: dict[ConnKey, Closer] | None = None, collectors: int | None = None,
           flt: Filter | None = None) -> TimewaitReport:
    """``flt``: the TIME_WAIT sockets it matches (its process criteria match
    the process that closed each one), and the pressure towards the
    destinations its address criteria match."""
    flt = flt or Filter()
    inv = take(port=None, protocols=("tcp",), netns=netns, details=False)
    if closers is None:
        closers, collectors = read_pinned()
    ranges = _ranges(netns)
    tw = [s for s in inv.sockets if is_time_wait(s) and (port is None or s.diag.local_port == port)
          and flt.matches_socket(s, closers.get(key_of(s)))]
    groups: dict[str, Group] = {}
    attributed = 0
    for s in tw:
        closer = closers.get(key_of(s))
        attributed += closer is not None
        name = _group_name(s, by, closer, ranges.get(s.diag.netns))
        groups.setdefault(name, Group(name)).add(s.diag.timer_ms)
    notes = []
    if not collectors:
        notes.append("no portscope collector was running when these connections closed, so "
                     "who closed them is unknown: keep `portscope trace` (or record) running")
    elif attributed < len(tw):
        notes.append(f"{len(tw) - attributed} TIME_WAIT socket(s) closed while no collector "
                     "was running, or before the closer map's oldest entry: closer unknown")
    return TimewaitReport(
        total=len(tw), attributed=attributed, collectors=collectors or 0,
        groups=sorted(groups.values(), key=lambda g: (-g.count, g.key)),
        histogram=histogram(s.diag.timer_ms for s in tw),
        pressure=pressure(inv, netns, flt, ranges), inventory=inv, notes=notes,
    )



def _group_name(s: Socket, by: str, closer: Closer | None, rng: PortRange | None) -> str:
    if by == "process":
        return f"{closer.comm}[{closer.pid}] uid {closer.uid}" if closer else "unknown"
    port, remote = endpoint(s, rng)
    return remote if by == "remote" else port


def histogram(left_ms: Iterable[int]) -> list[tuple[str, int]]:
    counts: Counter[int] = Counter()
    for ms in left_ms:
        counts[next((e for e in HISTOGRAM_EDGES_S if ms <= e * 1000), HISTOGRAM_EDGES_S[-1])] += 1
    return [(str(e), counts.get(e, 0)) for e in HISTOGRAM_EDGES_S]


# ---- ephemeral-port pressure ---------------------------------------------------


def pressure(inv: Inventory, netns: str | None, flt: Filter | None = None,
             ranges: dict[int, PortRange] | None = None) -> list[Pressure]:
    """Ports of the ephemeral range in use per (netns, source address,
    destination). connect() needs a local port unused towards that
    destination; ports held by listeners or bound sockets are unusable for
    every destination. ``flt``: only the connections its address and
    namespace criteria match are counted (the held ports all are)."""
    ranges = _ranges(netns) if ranges is None else ranges
    held: Counter[int] = Counter()
    per_dest: Counter[tuple[int, str, str]] = Counter()
    for s in inv.sockets:
        d = s.diag
        rng = ranges.get(d.netns)
        if rng is None or not rng.low <= d.local_port <= rng.high:
            continue
        if d.remote_port:
            if flt and not flt.matches_endpoints(d.netns, d.local_addr, d.local_port,
                                                 d.remote_addr, d.remote_port):
                continue
            per_dest[(d.netns, d.local_addr,
                      format_addr(d.family, d.remote_addr, d.remote_port))] += 1
        else:
            held[d.netns] += 1
    out = []
    for (ns, src, dst), used in per_dest.items():
        capacity = ranges[ns].usable - held[ns]
        out.append(Pressure(ns, src, dst, used, capacity))
    return sorted(out, key=lambda p: -p.share)


def _ranges(netns: str | None) -> dict[int, PortRange]:
    refs, _ = select_namespaces(netns)
    return {ref.inode: rng for ref in refs if (rng := port_range(ref)) is not None}


# ---- the command -----------------------------------------------------------------


def run(args: "argparse.Namespace") -> "ExitStatus":  # noqa: F821
    import json
    import time

    from .engine import TIMEWAIT_CLOSERS, EngineConfig
    from .errors import ExitStatus
    from .loader import open_engine

    flt = Filter.from_args(args)
    port = flt.local_ports([args.port] if args.port else [])
    if port and len(port) > 1:  # several --sport: chosen by the filter
        port = None
    flt = flt.resolved()  # a bad --netns is one sentence before the probes load
    engine = open_engine(EngineConfig(closer_entries=TIMEWAIT_CLOSERS)) if args.watch else None
    try:
        while True:
            closers, collectors = read_pinned()
            result = report(port[0] if port else None, args.by, flt.namespace(), closers,
                            collectors, flt)
            if args.json:
                print(json.dumps(result.to_json(args.by)), flush=True)
            else:
                if args.watch:
                    print("\033[H\033[2J", end="")
                print(render(result, args.by, None if args.all else args.top, palette(args)),
                      flush=True)
            if not args.watch:
                return ExitStatus.OK
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return ExitStatus.OK
    finally:
        if engine:
            engine.close()


TOP = 40  # groups shown by default, the biggest first


def render(r: TimewaitReport, by: str, top: int | None = TOP, pal: Palette = PLAIN) -> str:
    """Lines for a terminal; a group's key (a closer's name) is escaped.
    ``top``: the biggest groups shown (None: every one), the rest summed;
    a destination out of ports, or nearly, coloured by ``pal``."""
    lines = [f"{r.total} TIME_WAIT socket(s); closer known for {r.attributed}"
             f" ({r.collectors} portscope collector(s) recording)"]
    if r.groups:
        lines += ["", f"{'BY ' + by.upper():32} {'COUNT':>7}  TIME LEFT (s)"]
        shown = r.groups if top is None else r.groups[:top]
        for g in shown:
            lines.append(f"{printable(g.key):32} {g.count:7}  "
                         f"{g.min_left_ms / 1000:.0f}-{g.max_left_ms / 1000:.0f}")
        if len(shown) < len(r.groups):
            rest = r.groups[len(shown):]
            lines.append(f"{f'{len(rest)} more group(s)':32} {sum(g.count for g in rest):7}"
                         f"  (--all lists every group, --top N the N biggest)")
    if r.total:
        peak = max(c for _, c in r.histogram) or 1
        lines += ["", "time left"]
        lower = 0
        for edge, count in r.histogram:
            lines.append(f"  {lower:>2}-{edge:<3}s {'#' * round(30 * count / peak):30} {count}")
            lower = int(edge)
    hot = [p for p in r.pressure if p.level != "ok"] or r.pressure[:5]
    if hot:
        lines += ["", "ephemeral ports in use, per source and destination"]
        for p in hot[:20]:
            mark = {"full": pal.paint("FULL: connect() fails with EADDRNOTAVAIL", "bad"),
                    "warning": pal.paint("WARNING: nearly exhausted", "warn")}.get(p.level, "")
            lines.append(f"  {p.source:>15} -> {p.destination:24} {p.in_use:6}/{p.capacity:<6} "
                         f"{p.share:6.1%}  {mark}".rstrip())
    for note in r.notes:
        lines += ["", f"note: {printable(note)}"]
    return "\n".join(lines)
