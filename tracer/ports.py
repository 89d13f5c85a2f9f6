"""``portscope ports``: who holds what, in every network namespace."""

from __future__ import annotations

import argparse
import json

from .errors import ExitStatus, UsageError
from .explain import conn_of, holding
from .filters import Filter
from .inventory import Inventory, Socket, take
from .nsnames import NetnsNames, with_netns_name
from .records import owner_detail, owners_text
from .text import printable

HEADER = ("NETNS", "PROTO", "STATE", "LOCAL", "REMOTE", "QUEUE", "TIMER", "UID", "INODE",
          "FLAGS", "OWNERS")


def run(args: argparse.Namespace) -> ExitStatus:
    protocols = ("tcp",) if args.tcp else ("udp",) if args.udp else ("tcp", "udp")
    # Each --state is the kernel states it names (ss's groups name several).
    states = sorted({s for named in args.state for s in named}) if args.state else None
    flt = Filter.from_args(args)
    if flt.remote and states == ["LISTEN"]:
        raise UsageError("--state listen with --dport or --dst can never match: a listener "
                         "has no remote end")
    flt = flt.resolved()
    ports = flt.local_ports(args.ports) or [None]
    # The kernel filters one remote port as it filters the local one.
    remote_port = next(iter(flt.dports)) if len(flt.dports) == 1 else None
    sockets: list[Socket] = []
    inv = Inventory([])
    for port in ports:
        inv = take(port=port, protocols=protocols, states=states, netns=flt.namespace(),
                   remote_port=remote_port)
        sockets.extend(inv.sockets)
    sockets.sort(key=lambda s: (s.diag.netns, s.diag.local_port, s.diag.protocol, s.diag.state))
    left = who_left(sockets)
    if flt.active:
        sockets = [s for s in sockets if flt.matches_socket(s, left.get(conn_of(s)))]
    names = NetnsNames(inv.scan)
    if args.json:
        docs = []
        for s in sockets:
            doc = with_netns_name(s.to_json(), names)
            closer = left.get(conn_of(s))
            doc["closed_by"] = closer.to_json() | {"label": closer.label()} if closer else None
            docs.append(doc)
        print(json.dumps({"sockets": docs, "health": inv.health(),
                          "unreadable": [{"what": w, "problem": p} for w, p in inv.problems]}))
    else:
        rows = [(row(s, left.get(conn_of(s)), names), owner_details(s) if args.verbose else ())
                 for s in sockets]
        if not args.all:
            rows = summarise(rows)
        _print_table(rows, None if args.all else args.top)
        _print_health(inv)
    return ExitStatus.OK


def who_left(sockets: list[Socket]) -> dict:
    """Who closed the sockets no process holds (TIME_WAIT, orphans), as the
    running collectors recorded it in the kernel at the close."""
    from . import closers

    return closers.lookup(conn_of(s) for s in sockets
                          if holding(s) in ("time_wait", "orphan"))


def state_text(protocol: str, state: str) -> str:
    """A state as text output shows it: an unconnected UDP socket (the
    kernel's CLOSE) is UNCONN, as ss shows it; --json keeps CLOSE."""
    return "UNCONN" if protocol == "udp" and state == "CLOSE" else state


def row(s: Socket, closer: object = None, names: NetnsNames | None = None) -> tuple[str, ...]:
    d = s.diag
    proto = d.protocol + ("6" if d.family == "ipv6" else "4")
    local = f"[{d.local_addr}]:{d.local_port}" if d.family == "ipv6" else f"{d.local_addr}:{d.local_port}"
    remote = "*" if not d.remote_port else (
        f"[{d.remote_addr}]:{d.remote_port}" if d.family == "ipv6" else f"{d.remote_addr}:{d.remote_port}")
    # For a listener the queues are the accept queue and the backlog.
    queue = f"{d.rqueue}/{d.wqueue}"
    timer = f"{d.timer}:{d.timer_ms / 1000:.1f}s" if d.timer else "-"
    flags = ",".join(sorted(s.options)) if s.flags else "?"
    if s.flags and s.flags.group:
        flags += f" group={s.flags.group:08x}/{s.flags.group_size}"
        if s.flags.group_bpf_prog:
            flags += "+bpf"
    owners = owners_text(s.owners) or (
        f"left by {closer.label()}" if closer else "-")  # type: ignore[attr-defined]
    return (names.describe(d.netns) if names else str(d.netns), proto,
            state_text(d.protocol, d.state), local, remote, queue, timer, str(d.uid), str(d.inode),
            flags or "-", owners)


# Rows alike but for the remote port (a server's clients, TIME_WAIT left by
# them) are one line from this many on, unless --all.
ALIKE = 3
TOP = 100  # lines shown by default; the rest are counted


Line = tuple[tuple[str, ...], tuple[str, ...]]  # (a row's cells, lines under it)


def owner_details(s: Socket) -> tuple[str, ...]:
    """-v: each holder's command line and executable, under its row."""
    return tuple(f"    {owner_detail(o)}" for o in s.owners)


def summarise(rows: list[Line]) -> list[Line]:
    """Rows that differ only in the remote port, queue, timer and inode as
    one row: REMOTE ``10.0.0.7:* x2,999``, the timers' range. The order of
    the first of each kind is kept."""
    def kind(r: tuple[str, ...]) -> tuple[str, ...]:
        remote = r[4].rsplit(":", 1)[0] if r[4] != "*" else "*"
        return r[:4] + (remote,) + r[7:8] + r[9:]

    kinds: dict[tuple[str, ...], list[Line]] = {}
    for line in rows:
        kinds.setdefault(kind(line[0]), []).append(line)
    out = []
    for alike in kinds.values():
        if len(alike) < ALIKE or alike[0][0][4] == "*":
            out.extend(alike)
            continue
        first, details = alike[0]
        timer = _timer_range([r[6] for r, _ in alike])
        out.append((first[:4] + (f"{kind(first)[4]}:* x{len(alike):,}", "-", timer, first[7],
                                 "-") + first[9:], details))
    return out


def _timer_range(timers: list[str]) -> str:
    """``timewait:12.0-59.8s`` from ``timewait:12.0s``..., numerically."""
    names = {t.split(":", 1)[0] for t in timers}
    try:
        secs = [float(t.split(":", 1)[1].rstrip("s")) for t in timers]
    except (IndexError, ValueError):  # no timer ("-"), or several kinds
        return "-" if set(timers) == {"-"} else "various"
    if len(names) != 1:
        return "various"
    lo, hi = min(secs), max(secs)
    return f"{names.pop()}:{lo:.1f}s" if lo == hi else f"{names.pop()}:{lo:.1f}-{hi:.1f}s"


def _print_table(rows: list[Line], top: int | None = None) -> None:
    """``top``: the first lines shown (None: every one), the rest counted."""
    shown = rows if top is None else rows[:top]
    # Every cell escaped: owners' names, units and command lines are anybody's.
    lines = [(HEADER, ())] + [(tuple(printable(v) for v in r), d) for r, d in shown]
    widths = [max(len(r[i]) for r, _ in lines) for i in range(len(HEADER) - 1)]
    for r, details in lines:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)) + "  " + r[-1])
        for detail in details:
            print(printable(detail))
    if len(shown) < len(rows):
        print(f"... {len(rows) - len(shown):,} more line(s): --all shows every socket, "
              f"--top N the first N lines, --json every socket")


NAMED_PROBLEMS = 5  # unreadable processes named on the health line; the rest counted


def _print_health(inv: Inventory) -> None:
    """The last line: what could not be seen, naming which processes and why
    (a process that exited meanwhile is not worth a word: its sockets went
    with it)."""
    h = inv.health()
    gaps = [f"{v} {k.replace('_', ' ')}" for k, v in h.items() if k != "namespaces" and v]
    tail = f"; could not see: {', '.join(gaps)}" if gaps else ""
    print(f"\n{h['namespaces']} network namespace(s){tail}")
    named = unreadable_line(inv)
    if named:
        print(named)


def unreadable_line(inv: Inventory) -> str:
    """``could not read: pid 1 (permission denied), ...``, or ''."""
    if not inv.problems:
        return ""
    named = [f"{printable(w)} ({printable(p)})" for w, p in inv.problems[:NAMED_PROBLEMS]]
    more = len(inv.problems) - NAMED_PROBLEMS
    return "could not read: " + ", ".join(named) + (f", and {more} more" if more > 0 else "")
