"""``portscope groups``: how the kernel spreads connections and datagrams
over the members of each ``SO_REUSEPORT`` group, once or ``--watch``-ed, as
text or JSON (the model and its watcher: tracer/reuseport.py)."""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import sys
import time
from typing import Iterable, TextIO

from .colour import PLAIN, Palette, escaped, palette
from .errors import ExitStatus, UsageError
from .filters import Filter
from .inventory import select_namespaces_scan
from .nsnames import NetnsNames, with_netns_name
from .owners import Owner
from .plans import Plan
from .records import owner_detail
from .reuseport import Group, GroupsReading, GroupWatcher, MemberEvent
from .runtime import StopSignal
from .text import clock_text, printable

RECENT_EVENTS = 10  # events kept on screen in --watch on a terminal
CLEAR = "\x1b[H\x1b[2J"


def run(args: argparse.Namespace) -> ExitStatus:
    stop = StopSignal()
    flt = Filter.from_args(args)
    if flt.remote:
        raise UsageError("--dport and --dst can never match a reuseport group: its members "
                         "listen (TCP) or are unconnected (UDP), with no remote end")
    port = flt.local_ports([args.port] if args.port else [])
    flt = flt.resolved()
    # A bad --netns is one sentence before any probe loads; the walk names them.
    _, scan = select_namespaces_scan(flt.namespace())
    protocols = ("tcp",) if args.tcp else ("udp",) if args.udp else ("tcp", "udp")
    plan = None if args.plan == "auto" else Plan(args.plan)
    watcher = GroupWatcher(port=port[0] if port and len(port) == 1 else None,
                           netns=flt.namespace(), protocols=protocols, plan=plan,
                           btf_path=args.btf)
    out = sys.stdout
    try:
        skipped = "; ".join(f"{a.plan.value}: {a.reason}" for a in watcher.engine.group_attempts
                            if not a.ok) if watcher.engine else ""
        what = "Ctrl-C to stop" if args.watch else f"sampling for {args.interval:g} s"
        print(f"portscope: counting with the {watcher.plan.value} plan"
              + (f" ({skipped})" if skipped else "") + f"; {what}", file=sys.stderr, flush=True)
        screen = _Screen(out, args.json, args.watch and out.isatty(),
                         NetnsNames(scan, refresh_s=1.0), PLAIN if args.json else palette(args, out))
        screen.flt = flt
        screen.verbose = args.verbose
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

    flt = Filter()  # the groups and events shown: those it matches
    verbose = False  # -v: who serves each group, with command lines

    def __init__(self, out: TextIO, as_json: bool, redraw: bool,
                 names: NetnsNames | None = None, pal: Palette = PLAIN) -> None:
        self.out = out
        self.pal = pal
        self.names = names or NetnsNames(refresh_s=1.0)
        self.as_json = as_json
        self.redraw = redraw  # a terminal in --watch: redraw in place
        self.recent: collections.deque[MemberEvent] = collections.deque(maxlen=RECENT_EVENTS)

    def show(self, snap: GroupsReading) -> None:
        if self.flt.active:
            snap = dataclasses.replace(
                snap, groups=[g for g in snap.groups if self.flt.matches_group(g)],
                events=[e for e in snap.events if self.flt.matches_member_event(e)])
        if self.as_json:
            doc = snap.to_json()
            for key in ("groups", "events"):
                doc[key] = [with_netns_name(d, self.names) for d in doc[key]]  # type: ignore[attr-defined]
            self.out.write(json.dumps(doc, separators=(",", ":")) + "\n")
        elif self.redraw:
            self.recent.extend(snap.events)
            text = render(snap, self.names, self.pal, self.verbose)
            if self.recent:
                text += "\nrecent events:\n" + "\n".join(event_line(e, self.names)
                                                         for e in self.recent) + "\n"
            self.out.write(CLEAR + text)
        else:
            text = render(snap, self.names, self.pal, self.verbose)
            if snap.events:
                text += "\n" + "\n".join(event_line(e, self.names) for e in snap.events) + "\n"
            self.out.write(text + "\n")
        self.out.flush()


MEMBER_COLUMNS = (("SERVED BY", 26), ("INODE", 9), ("DELIVERED", 10), ("RATE/s", 9),
                  ("SHARE", 7), ("QUEUE", 11), ("DROPS", 6), ("STATUS", 0))


def render(snap: GroupsReading, names: NetnsNames | None = None, pal: Palette = PLAIN,
           verbose: bool = False) -> str:
    """The human form of one snapshot (verdicts and statuses coloured by
    ``pal``; ``verbose``: who serves each group, with command lines)."""
    stamp = clock_text(snap.time, date=False, digits=0)
    lines = [f"{stamp}  {len(snap.groups)} reuseport group(s), {snap.plan} plan"
             + (f", last {snap.interval:.1f} s" if snap.interval else "")]
    if not snap.groups:
        lines.append("no SO_REUSEPORT group (TCP listener or UDP socket) found")
    for g in snap.groups:
        lines.append("")
        lines += group_lines(g, names, pal, verbose)
    gaps = health_text(snap.health)
    if gaps:
        lines += ["", gaps]
    return "\n".join(lines) + "\n"


def group_lines(g: Group, names: NetnsNames | None = None, pal: Palette = PLAIN,
                verbose: bool = False) -> list[str]:
    proto = g.protocol + ("6" if g.family == "ipv6" else "4")
    steer = "steered by a reuseport BPF program" if g.bpf else "kernel hash"
    dev = f"  dev {g.bound_dev_if}" if g.bound_dev_if else ""
    unit = "connections" if g.protocol == "tcp" else "datagrams"
    netns = names.text(g.netns) if names else g.netns
    head = (f"{proto} {g.local}  netns {netns}  group {g.id:08x}  {g.size} socket(s)  "
            f"{steer}{dev}  ({unit})")
    rows = [tuple(name for name, _ in MEMBER_COLUMNS)]
    unseen = False
    for m in g.members:
        served = printable(m.taker_label())
        unseen = unseen or not m.acceptors
        queue = f"{m.queue}/{m.backlog}" if m.backlog is not None else f"{m.queue}B"
        rows.append((served, str(m.inode), str(m.delivered), _rate(m.rate),
                     "-" if m.share is None else f"{m.share * 100:.1f}%", queue,
                     "-" if m.drops is None else str(m.drops),
                     pal.verdict(m.status, m.status.replace("_", " "))))
    rows.append(("total", "", str(g.delivered), _rate(g.rate), "", "", "", ""))
    lines = [pal.head(escaped(head))] + ["  " + _columns(r) for r in rows]
    for m in g.flagged:
        for problem in m.problems:
            lines.append(f"  {pal.verdict(m.status, '!')} inode {m.inode}: {printable(problem)}")
    # The holders as a second fact, where they are not what SERVED BY shows.
    holders = {o.pid: o for m in g.members for o in m.owners}
    takers = {a.owner.pid for m in g.members for a in m.acceptors}
    if takers and set(holders) != takers:
        lines.append("  held by (fds): " + owner_labels(sorted(holders.values(), key=lambda o: o.pid)))
    if unseen:
        lines.append("  * no process was seen waiting on this socket: its holders are shown")
    if verbose:  # -v: who they are beyond comm[pid]
        served = {o.pid: o for m in g.members for o in m.served_by}
        lines += [f"  {printable(owner_detail(o))}" for o in served.values()]
    # Coloured by the worst member not served (stopped, dropping: red; not
    # accepting: yellow), else by the split (uneven: yellow, even: green).
    verdict = g.flagged[0].status if g.flagged else g.imbalance.verdict if g.imbalance else ""
    lines.append("  balance " + pal.verdict(verdict, g.balance_text()))
    return lines


def _columns(values: tuple[str, ...]) -> str:
    cells = []
    for v, (name, width) in zip(values, MEMBER_COLUMNS):
        if not width:
            cells.append(v)
        elif name in ("SERVED BY",):
            cells.append(v.ljust(width))
        else:
            cells.append(v.rjust(width))
    return "  ".join(cells).rstrip()


def owner_labels(owners: Iterable[Owner]) -> str:
    """``nginx[812] nginx[813]``, escaped for a terminal (names are anybody's)."""
    return printable(" ".join(o.label() for o in owners)) or "-"


def _rate(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:.1f}"


def event_line(e: MemberEvent, names: NetnsNames | None = None) -> str:
    stamp = clock_text(e.time, date=False)
    proto = e.protocol + ("6" if e.family == "ipv6" else "4")
    owners = owner_labels(e.owners)
    tail = f"  after {e.delivered} delivered" if e.kind == "leave" else ""
    netns = names.text(e.netns) if names else e.netns
    return (f"{stamp} {e.kind:<5} {proto} {e.local}  netns {netns}  group {e.group:08x}  "
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
    "acceptors_unread": "process(es) whose waits could not be read (who accepts unknown)",
    "drops_unread": "member(s) the kernel gave no drop counter",
}


def health_text(health: dict[str, int]) -> str:
    gaps = [f"{health[k]} {words}" for k, words in HEALTH_WORDS.items() if health.get(k)]
    return ("could not see or count: " + "; ".join(gaps)) if gaps else ""
