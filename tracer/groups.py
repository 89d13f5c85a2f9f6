"""Reuseport groups: how the kernel spreads connections and datagrams over
the members of each ``SO_REUSEPORT`` group, live.

Two sources, joined by socket cookie on every read:

* the inventory (``inventory.take``: sock_diag, the socket iterators and the
  owners): which groups exist (the iterators' opaque group id), their
  members, each member's owners and queue;
* the kernel's counters: the ``ps_group_counts`` map, a per-CPU hash keyed by
  socket cookie that the plan's counting program increments on every
  delivery (tracepoint plan: ``tp_btf/sk_data_ready`` on the receiving
  listener or UDP socket; fentry and kprobe plans: the exit of
  ``reuseport_select_sock``). It is read in one batch per refresh; nothing
  per connection crosses into user space.

Successive reads give rates, and membership diffs give join and leave
events (stamped with the time of the read that saw them, so within one
interval). Imbalance is measured over the time since the group's membership
last changed: max/min share, coefficient of variation, and Pearson's
chi-square test against an even split, whose p-value says whether the
differences are more than noise.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import json
import math
import struct
import sys
import time
from dataclasses import dataclass
from typing import Iterable, TextIO

from . import libbpf
from .engine import Engine, EngineConfig
from .loader import open_engine
from .errors import ExitStatus
from .inventory import Inventory, Socket, select_namespaces, take
from .layout import PsCounter, PsMemberCount
from .owners import Owner
from .plans import GROUP_PROGRAMS, Plan
from .runtime import StopSignal
from .sockflags import SocketIterators
from .text import clock_text, printable


# A p-value under this says "not noise" (1%: one false alarm in 100 reads
# of a perfectly even group).
ALPHA = 0.01
# Pearson's chi-square needs about 5 expected per member to be trusted.
MIN_EXPECTED = 5.0
# A counter key no inventory has explained for this many reads belongs to a
# socket that came and went between two reads, or that is not shown (another
# namespace): its count moves to "unattributed" and the key is deleted.
UNKNOWN_READS = 2


# ---- statistics -----------------------------------------------------------


def chi_square_sf(x: float, dof: int) -> float:
    """P(X >= x) for a chi-square variable with ``dof`` degrees of freedom:
    the regularized upper incomplete gamma function Q(dof/2, x/2)."""
    if dof <= 0:
        raise ValueError("degrees of freedom must be positive")
    if x <= 0:
        return 1.0
    return gamma_q(dof / 2.0, x / 2.0)


def gamma_q(a: float, x: float) -> float:
    """Regularized upper incomplete gamma Q(a, x), a > 0, x >= 0: a series
    below a + 1, Lentz's continued fraction above (Numerical Recipes 6.2)."""
    if x <= 0:
        return 1.0
    log_prefix = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1.0:
        term = total = 1.0 / a
        n = a
        for _ in range(10_000):
            n += 1.0
            term *= x / n
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return max(0.0, 1.0 - total * math.exp(log_prefix))
    tiny = 1e-300
    b = x + 1.0 - a
    c = 1.0 / tiny
    d = 1.0 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return min(1.0, math.exp(log_prefix) * h)


@dataclass(frozen=True)
class Imbalance:
    """How far a group's split is from even, over ``seconds``."""

    members: int
    total: int  # deliveries in the window
    seconds: float
    max_min: float | None  # max share / min share; None: a member got none
    cv: float | None  # coefficient of variation of the counts
    chi2: float | None
    dof: int
    p_value: float | None  # chance of a split at least this uneven if it were even
    verdict: str  # even, uneven, insufficient (too little traffic), single, idle

    def to_json(self) -> dict[str, object]:
        return {
            "members": self.members, "total": self.total, "seconds": round(self.seconds, 3),
            "max_min": _round(self.max_min, 4), "cv": _round(self.cv, 4),
            "chi2": _round(self.chi2, 4), "dof": self.dof,
            "p_value": None if self.p_value is None else float(f"{self.p_value:.4g}"),
            "verdict": self.verdict,
        }

    def text(self) -> str:
        if self.verdict in ("single", "idle"):
            return {"single": "one member: nothing to balance",
                    "idle": "no deliveries yet"}[self.verdict]
        ratio = "inf" if self.max_min is None else f"{self.max_min:.2f}"
        parts = [f"max/min {ratio}", f"cv {self.cv:.3f}"]
        if self.chi2 is not None and self.p_value is not None:
            parts.append(f"chi-square {self.chi2:.2f} ({self.dof} dof), p={self.p_value:.3g}")
        meaning = {
            "even": "even (the differences are noise)",
            "uneven": f"uneven (p < {ALPHA}: not noise)",
            "insufficient": "too little traffic to tell noise from imbalance",
        }[self.verdict]
        return f"over {self.seconds:.1f} s: " + ", ".join(parts) + f": {meaning}"


def imbalance(counts: list[int], seconds: float) -> Imbalance:
    """Imbalance statistics of one group's per-member counts."""
    k = len(counts)
    total = sum(counts)
    if k < 2 or total == 0:
        verdict = "single" if k < 2 else "idle"
        return Imbalance(k, total, seconds, None, None, None, max(k - 1, 0), None, verdict)
    mean = total / k
    cv = math.sqrt(sum((c - mean) ** 2 for c in counts) / k) / mean
    low = min(counts)
    max_min = max(counts) / low if low else None
    chi2 = sum((c - mean) ** 2 for c in counts) / mean
    p = chi_square_sf(chi2, k - 1)
    if mean < MIN_EXPECTED:
        verdict = "insufficient"
    else:
        verdict = "uneven" if p < ALPHA else "even"
    return Imbalance(k, total, seconds, max_min, cv, chi2, k - 1, p, verdict)


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


# ---- the state model ------------------------------------------------------


@dataclass
class Member:
    """One socket of a group, with its figures at the time of the read."""

    cookie: int
    inode: int
    state: str
    owners: tuple[Owner, ...]
    delivered: int  # since the watcher started, or since the member joined
    rate: float | None  # per second over the last interval; None on the first read
    window: int  # delivered since the group's membership last changed
    share: float | None  # window / the group's window total
    queue: int  # TCP: accept-queue depth; UDP: bytes waiting in the receive queue
    backlog: int | None  # TCP: the listen() backlog; UDP: None

    @property
    def pids(self) -> list[int]:
        return [o.pid for o in self.owners]

    def to_json(self) -> dict[str, object]:
        return {
            "cookie": self.cookie, "inode": self.inode, "state": self.state,
            "pids": self.pids, "owners": [o.to_json() for o in self.owners],
            "delivered": self.delivered, "rate": _round(self.rate, 3),
            "window": self.window, "share": _round(self.share, 6),
            "queue": self.queue, "backlog": self.backlog,
        }


@dataclass
class Group:
    id: int  # opaque, stable while the kernel keeps the group
    netns: int
    protocol: str
    family: str
    addr: str
    port: int
    bound_dev_if: int
    size: int  # sockets in the group, as the kernel counts them
    bpf: bool  # a reuseport BPF program steers it
    members: list[Member]
    window_seconds: float
    imbalance: Imbalance

    @property
    def local(self) -> str:
        return _endpoint(self.family, self.addr, self.port)

    @property
    def delivered(self) -> int:
        return sum(m.delivered for m in self.members)

    @property
    def rate(self) -> float | None:
        rates = [m.rate for m in self.members if m.rate is not None]
        return sum(rates) if rates else None

    def to_json(self) -> dict[str, object]:
        return {
            "id": f"{self.id:08x}", "netns": self.netns, "protocol": self.protocol,
            "family": self.family, "local": self.local, "addr": self.addr, "port": self.port,
            "bound_dev_if": self.bound_dev_if, "size": self.size, "bpf": self.bpf,
            "delivered": self.delivered, "rate": _round(self.rate, 3),
            "members": [m.to_json() for m in self.members],
            "imbalance": self.imbalance.to_json(),
        }


@dataclass
class MemberEvent:
    """A socket joined or left a group (seen between two reads)."""

    time: float  # wall clock of the read that saw it
    kind: str  # join or leave
    group: int
    netns: int
    protocol: str
    family: str
    addr: str
    port: int
    cookie: int
    inode: int
    owners: tuple[Owner, ...]  # for a leave: the owners last seen
    delivered: int  # for a leave: everything it received; for a join: so far

    @property
    def pids(self) -> list[int]:
        return [o.pid for o in self.owners]

    @property
    def local(self) -> str:
        return _endpoint(self.family, self.addr, self.port)

    def to_json(self) -> dict[str, object]:
        return {
            "time": round(self.time, 6), "event": self.kind, "group": f"{self.group:08x}",
            "netns": self.netns, "protocol": self.protocol, "family": self.family,
            "local": self.local, "cookie": self.cookie, "inode": self.inode,
            "pids": self.pids, "owners": [o.to_json() for o in self.owners],
            "delivered": self.delivered,
        }


@dataclass
class Snapshot:
    time: float  # wall clock of the read
    interval: float | None  # seconds since the previous read
    plan: str
    groups: list[Group]
    events: list[MemberEvent]
    health: dict[str, int]

    def to_json(self) -> dict[str, object]:
        return {
            "time": round(self.time, 6),
            "interval": None if self.interval is None else round(self.interval, 3),
            "plan": self.plan,
            "groups": [g.to_json() for g in self.groups],
            "events": [e.to_json() for e in self.events],
            "health": self.health,
        }


def _endpoint(family: str, addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if family == "ipv6" else f"{addr}:{port}"


@dataclass
class _Seen:
    """What the previous read knew of a member."""

    group: Group
    sock: Socket
    delivered: int


@dataclass
class _Window:
    members: frozenset[int]
    baseline: dict[int, int]
    since: float  # monotonic


# ---- the watcher ----------------------------------------------------------


class GroupWatcher:
    """Counts deliveries to every reuseport group member from the moment it
    is created; :meth:`read` returns the groups as they are now.

    ``port``: only groups on this local port (filtered in the kernel too);
    ``netns``: only this namespace (see ``inventory.select_namespaces``);
    ``plan``: None chooses the best one, as every other command does."""

    def __init__(self, port: int | None = None, netns: str | None = None,
                 protocols: Iterable[str] = ("tcp", "udp"), plan: Plan | None = None,
                 btf_path: str | None = None) -> None:
        self.port = port
        self.netns = netns
        self.protocols = tuple(protocols)
        config = EngineConfig(plan=plan, port=port or 0, btf_path=btf_path, ring_bytes=0,
                              closer_entries=1, closer_args_entries=1, programs=GROUP_PROGRAMS)
        self.engine: Engine | None = open_engine(config)
        self.started = time.time()
        self._started_mono = time.monotonic()
        try:
            self._iterators: SocketIterators | None = SocketIterators(
                EngineConfig(btf_path=btf_path, closer_entries=1, closer_args_entries=1))
        except BaseException:
            self.engine.close()
            raise
        self._counts = self.engine.map("ps_group_counts")
        self._ncpus = libbpf.possible_cpus()
        self._stride = (ctypes.sizeof(PsMemberCount) + 7) & ~7
        self._offset = PsMemberCount.delivered.offset
        self._members: dict[int, _Seen] | None = None  # None until the first read
        self._windows: dict[int, _Window] = {}
        self._unknown: dict[int, int] = {}  # cookie -> reads it stayed unexplained
        self._unattributed = 0
        self._last_mono: float | None = None
        self._inventory_health: dict[str, int] = {}

    @property
    def plan(self) -> Plan:
        assert self.engine is not None, "watcher is closed"
        return self.engine.plan

    # -- reading

    def counts(self) -> dict[int, int]:
        """Deliveries per socket cookie, summed over CPUs (one batch read)."""
        out = {}
        unpack = struct.Struct("<Q").unpack_from
        positions = [cpu * self._stride + self._offset for cpu in range(self._ncpus)]
        for key, value in self._counts.lookup_batch(self._stride * self._ncpus):
            out[int.from_bytes(key, "little")] = sum(unpack(value, p)[0] for p in positions)
        return out

    def inventory(self) -> list[Socket]:
        """Every socket that may be in a group: TCP listeners, UDP sockets."""
        sockets: list[Socket] = []
        health: dict[str, int] = {}
        if "tcp" in self.protocols:
            inv = take(self.port, ("tcp",), ("LISTEN",), self.netns, self._iterators)
            sockets += inv.sockets
            health = _add(health, inv)
        if "udp" in self.protocols:
            inv = take(self.port, ("udp",), None, self.netns, self._iterators)
            sockets += inv.sockets
            health = _add(health, inv)
        self._inventory_health = health
        return [s for s in sockets if s.flags is not None and s.flags.group]

    def read(self) -> Snapshot:
        """The groups now, with rates since the previous read and the members
        that joined or left since then."""
        assert self.engine is not None, "watcher is closed"
        now, mono = time.time(), time.monotonic()
        sockets = self.inventory()
        counts = self.counts()  # after the inventory: every member seen has its key
        interval = None if self._last_mono is None else mono - self._last_mono
        first = self._members is None
        previous = self._members or {}

        by_group: dict[int, list[Socket]] = {}
        for s in sockets:
            by_group.setdefault(s.flags.group, []).append(s)  # type: ignore[union-attr]
        groups: list[Group] = []
        current: dict[int, _Seen] = {}
        for gid, socks in by_group.items():
            group = self._group(gid, socks, counts, previous, interval, mono, first)
            groups.append(group)
            by_cookie = {s.diag.cookie: s for s in socks}
            for m in group.members:
                current[m.cookie] = _Seen(group, by_cookie[m.cookie], m.delivered)
        groups.sort(key=lambda g: (g.netns, g.port, g.protocol, g.family, g.addr, g.id))

        events = [] if first else self._events(now, previous, current, counts)
        self._forget(counts, current)
        self._members = current
        self._windows = {gid: w for gid, w in self._windows.items() if gid in by_group}
        self._last_mono = mono
        return Snapshot(now, interval, self.plan.value, groups, events, self.health())

    def _group(self, gid: int, socks: list[Socket], counts: dict[int, int],
               previous: dict[int, _Seen], interval: float | None, mono: float,
               first: bool) -> Group:
        socks = _ordered(socks)
        delivered = {s.diag.cookie: counts.get(s.diag.cookie, 0) for s in socks}
        cookies = frozenset(delivered)
        window = self._windows.get(gid)
        if window is None or window.members != cookies:
            # Counts start at zero when the watcher starts: the first window
            # runs from then; a later one from the read that saw the change.
            since = self._started_mono if first else mono
            base = {} if first else dict(delivered)
            window = self._windows[gid] = _Window(cookies, base, since)
        in_window = {c: n - window.baseline.get(c, 0) for c, n in delivered.items()}
        window_total = sum(in_window.values())
        members = []
        for s in socks:
            cookie = s.diag.cookie
            n = delivered[cookie]
            rate = None
            if interval:
                before = previous[cookie].delivered if cookie in previous else 0
                rate = (n - before) / interval
            tcp = s.diag.protocol == "tcp"
            members.append(Member(
                cookie=cookie, inode=s.diag.inode, state=s.diag.state, owners=s.owners,
                delivered=n, rate=rate, window=in_window[cookie],
                share=in_window[cookie] / window_total if window_total else None,
                queue=s.diag.rqueue, backlog=s.diag.wqueue if tcp else None,
            ))
        head = socks[0]
        flags = head.flags
        assert flags is not None
        seconds = mono - window.since
        return Group(
            id=gid, netns=head.diag.netns, protocol=head.diag.protocol, family=head.diag.family,
            addr=head.diag.local_addr, port=head.diag.local_port,
            bound_dev_if=head.diag.bound_dev_if, size=flags.group_size,
            bpf=any(s.flags.group_bpf_prog for s in socks if s.flags),
            members=members, window_seconds=seconds,
            imbalance=imbalance([m.window for m in members], seconds),
        )

    def _events(self, now: float, previous: dict[int, _Seen], current: dict[int, _Seen],
                counts: dict[int, int]) -> list[MemberEvent]:
        events = []
        for cookie in sorted(set(current) - set(previous)):
            events.append(_event(now, "join", current[cookie], counts.get(cookie, 0)))
        for cookie in sorted(set(previous) - set(current)):
            seen = previous[cookie]
            events.append(_event(now, "leave", seen, counts.get(cookie, seen.delivered)))
        return events

    def _forget(self, counts: dict[int, int], current: dict[int, _Seen]) -> None:
        """Delete the keys of sockets that are gone; count what no inventory
        could attribute."""
        for cookie in [c for c in self._unknown if c not in counts]:
            del self._unknown[cookie]
        departed = set(self._members or ()) - set(current)
        for cookie, n in counts.items():
            if cookie in current:
                self._unknown.pop(cookie, None)
                continue
            if cookie in departed:
                self._counts.delete(struct.pack("<Q", cookie))
                continue
            reads = self._unknown.get(cookie, 0) + 1
            if reads >= UNKNOWN_READS:
                self._unattributed += n
                self._counts.delete(struct.pack("<Q", cookie))
                self._unknown.pop(cookie, None)
            else:
                self._unknown[cookie] = reads

    def health(self) -> dict[str, int]:
        """What could not be seen or counted, as numbers (0 is good)."""
        assert self.engine is not None, "watcher is closed"
        h = dict(self._inventory_health)
        h["map_full"] = self.engine.counter(PsCounter.GROUP_FULL)
        h["no_cookie"] = self.engine.counter(PsCounter.GROUP_NO_COOKIE)
        h["missed"] = self.engine.recursion_misses()
        h["unattributed"] = self._unattributed
        return h

    def close(self) -> None:
        if self._iterators:
            self._iterators.close()
            self._iterators = None
        if self.engine:
            self.engine.close()
            self.engine = None

    def __enter__(self) -> "GroupWatcher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _ordered(socks: list[Socket]) -> list[Socket]:
    """Members in a stable order: by first owner pid, then inode."""
    return sorted(socks, key=lambda s: (s.owners[0].pid if s.owners else 0, s.diag.inode,
                                        s.diag.cookie))


def _event(now: float, kind: str, seen: _Seen, delivered: int) -> MemberEvent:
    g, s = seen.group, seen.sock
    return MemberEvent(
        time=now, kind=kind, group=g.id, netns=g.netns, protocol=g.protocol, family=g.family,
        addr=g.addr, port=g.port, cookie=s.diag.cookie, inode=s.diag.inode, owners=s.owners,
        delivered=delivered,
    )


def _add(health: dict[str, int], inv: Inventory) -> dict[str, int]:
    """Health of two inventories (TCP, UDP) of the same namespaces and
    processes: what both scanned counts once, unknown flags add up."""
    out = dict(health)
    for key, value in inv.health().items():
        out[key] = out.get(key, 0) + value if key == "flags_unknown" else max(out.get(key, 0), value)
    return out


# ---- the command: portscope groups ----------------------------------------

RECENT_EVENTS = 10  # events kept on screen in --watch on a terminal
CLEAR = "\x1b[H\x1b[2J"


def run(args: argparse.Namespace) -> ExitStatus:
    stop = StopSignal()
    select_namespaces(args.netns)  # a bad --netns is one sentence before any probe loads
    protocols = ("tcp",) if args.tcp else ("udp",) if args.udp else ("tcp", "udp")
    plan = None if args.plan == "auto" else Plan(args.plan)
    watcher = GroupWatcher(port=args.port, netns=args.netns, protocols=protocols, plan=plan,
                           btf_path=args.btf)
    out = sys.stdout
    try:
        skipped = "; ".join(f"{a.plan.value}: {a.reason}" for a in watcher.engine.attempts
                            if not a.ok) if watcher.engine else ""
        what = "Ctrl-C to stop" if args.watch else f"sampling for {args.interval:g} s"
        print(f"portscope: counting with the {watcher.plan.value} plan"
              + (f" ({skipped})" if skipped else "") + f"; {what}", file=sys.stderr, flush=True)
        screen = _Screen(out, args.json, args.watch and out.isatty())
        snap = watcher.read()
        shown = 0
        if args.watch:
            screen.show(snap)  # at once: the groups as they are, counting from now
            shown += 1
        next_read = time.monotonic() + args.interval
        while True:
            _wait_until(next_read, stop)
            next_read += args.interval
            snap = watcher.read()
            screen.show(snap)
            shown += 1
            if stop.requested or not args.watch or (args.count and shown >= args.count):
                break
    finally:
        out.flush()
        watcher.close()
    return ExitStatus.OK


def _wait_until(deadline: float, stop: StopSignal) -> None:
    while not stop.requested:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, 0.1))


class _Screen:
    """Human or JSON output of successive snapshots."""

    def __init__(self, out: TextIO, as_json: bool, redraw: bool) -> None:
        self.out = out
        self.as_json = as_json
        self.redraw = redraw  # a terminal in --watch: redraw in place
        self.recent: collections.deque[MemberEvent] = collections.deque(maxlen=RECENT_EVENTS)

    def show(self, snap: Snapshot) -> None:
        if self.as_json:
            self.out.write(json.dumps(snap.to_json(), separators=(",", ":")) + "\n")
        elif self.redraw:
            self.recent.extend(snap.events)
            text = render(snap)
            if self.recent:
                text += "\nrecent events:\n" + "\n".join(event_line(e) for e in self.recent) + "\n"
            self.out.write(CLEAR + text)
        else:
            text = render(snap)
            if snap.events:
                text += "\n" + "\n".join(event_line(e) for e in snap.events) + "\n"
            self.out.write(text + "\n")
        self.out.flush()


MEMBER_COLUMNS = (("OWNERS", 26), ("INODE", 9), ("DELIVERED", 10), ("RATE/s", 9),
                  ("SHARE", 7), ("QUEUE", 0))


def render(snap: Snapshot) -> str:
    """The human form of one snapshot."""
    stamp = clock_text(snap.time, date=False, digits=0)
    lines = [f"{stamp}  {len(snap.groups)} reuseport group(s), {snap.plan} plan"
             + (f", last {snap.interval:.1f} s" if snap.interval else "")]
    if not snap.groups:
        lines.append("no SO_REUSEPORT group (TCP listener or UDP socket) found")
    for g in snap.groups:
        lines.append("")
        lines += group_lines(g)
    gaps = health_text(snap.health)
    if gaps:
        lines += ["", gaps]
    return "\n".join(lines) + "\n"


def group_lines(g: Group) -> list[str]:
    proto = g.protocol + ("6" if g.family == "ipv6" else "4")
    steer = "steered by a reuseport BPF program" if g.bpf else "kernel hash"
    dev = f"  dev {g.bound_dev_if}" if g.bound_dev_if else ""
    unit = "connections" if g.protocol == "tcp" else "datagrams"
    head = (f"{proto} {g.local}  netns {g.netns}  group {g.id:08x}  {g.size} socket(s)  "
            f"{steer}{dev}  ({unit})")
    rows = [tuple(name for name, _ in MEMBER_COLUMNS)]
    for m in g.members:
        owners = owner_labels(m.owners)
        queue = f"{m.queue}/{m.backlog}" if m.backlog is not None else f"{m.queue}B"
        rows.append((owners, str(m.inode), str(m.delivered), _rate(m.rate),
                     "-" if m.share is None else f"{m.share * 100:.1f}%", queue))
    rows.append(("total", "", str(g.delivered), _rate(g.rate), "", ""))
    lines = [head] + ["  " + _columns(r) for r in rows]
    lines.append("  imbalance " + g.imbalance.text())
    return lines


def _columns(values: tuple[str, ...]) -> str:
    cells = []
    for v, (name, width) in zip(values, MEMBER_COLUMNS):
        if not width:
            cells.append(v)
        elif name in ("OWNERS",):
            cells.append(v.ljust(width))
        else:
            cells.append(v.rjust(width))
    return "  ".join(cells).rstrip()


def owner_labels(owners: Iterable[Owner]) -> str:
    """``nginx[812] nginx[813]``, escaped for a terminal (names are anybody's)."""
    return printable(" ".join(o.label() for o in owners)) or "-"


def _rate(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:.1f}"


def event_line(e: MemberEvent) -> str:
    stamp = clock_text(e.time, date=False)
    proto = e.protocol + ("6" if e.family == "ipv6" else "4")
    owners = owner_labels(e.owners)
    tail = f"  after {e.delivered} delivered" if e.kind == "leave" else ""
    return (f"{stamp} {e.kind:<5} {proto} {e.local}  netns {e.netns}  group {e.group:08x}  "
            f"{owners}  inode {e.inode}{tail}")


HEALTH_WORDS = {
    "namespaces_gone": "namespace(s) gone",
    "unreadable_processes": "unreadable process(es)",
    "flags_unknown": "socket(s) without flags",
    "map_full": "deliveries not counted (counter map full)",
    "no_cookie": "deliveries not counted (kprobe plan: socket had no cookie yet)",
    "missed": "counting-program runs skipped by the kernel (nested on one CPU)",
    "unattributed": "deliveries to sockets not shown (another namespace, or a member "
                    "that came and went between two reads)",
}


def health_text(health: dict[str, int]) -> str:
    gaps = [f"{health[k]} {words}" for k, words in HEALTH_WORDS.items() if health.get(k)]
    return ("could not see or count: " + "; ".join(gaps)) if gaps else ""
