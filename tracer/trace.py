"""``portscope trace``: stream bind()/listen()/connect() calls as they happen."""

from __future__ import annotations

import argparse
import json
import time
from typing import Callable

from .cgroups import CgroupIdentities
from .colour import PLAIN, Palette, palette
from .engine import Counters, Engine, EngineConfig
from .errors import ExitStatus
from .events import Clock, decode
from .filters import Filter
from .loader import open_engine
from .nsnames import NetnsNames, with_netns_name
from .onthespot import OnTheSpot
from .plans import Plan
from .procfs import command_of
from .records import CallEvent
from .runtime import (
    COALESCE_S,
    POLL_MS,
    Output,
    StopSignal,
    announce,
    report_losses,
    say,
)
from .text import clock_text, printable

COUNTER_CHECK_S = 1.0

COLUMNS = (
    ("TIME", 15), ("CALL", 7), ("RESULT", 13), ("PID", 7), ("COMM", 15), ("UID", 5),
    ("PROTO", 5), ("REQUESTED", 28), ("BOUND", 28), ("OPTIONS", 0),
)


def config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        plan=None if args.plan == "auto" else Plan(args.plan),
        errors_only=not args.all,
        # One --pid is filtered in the kernel; several, in the collector.
        pid=args.pid[0] if args.pid and len(args.pid) == 1 else 0,
        port=args.port or 0,
        ring_bytes=args.ring_size,
        btf_path=args.btf,
        # the on-the-spot explainer walks the sockets with the iterators
        iterators=not getattr(args, "no_explain", False),
    )


def human_line(ev: CallEvent, names: NetnsNames | None = None, pal: Palette = PLAIN,
               where: dict[str, str | None] | None = None) -> str:
    """One event's line, escaped; its RESULT (ok or the errno) coloured by
    ``pal``; ``where``: the caller's unit or container, shown at the end."""
    stamp = clock_text(ev.time, date=False, digits=6)
    options = list(ev.options.names())
    if ev.options.bound_dev_if:
        options.append(f"dev={ev.options.bound_dev_if}")
    if ev.addr_unreadable:
        options.append("addr-unreadable")
    proto = ev.protocol + ("6" if ev.family == "ipv6" else "4")
    bound = ev.bound if ev.bound_port or ev.call == "connect" else "-"
    values = (
        stamp, ev.call, pal.errno(ev.errno_name or "ok", RESULT_WIDTH), str(ev.pid),
        printable(ev.comm), str(ev.uid), proto,
        ev.requested, bound,
        ",".join(options) + f" netns={names.text(ev.netns) if names else ev.netns} ino={ev.inode}"
        + _where_text(where),
    )
    return _columns(values)


def _where_text(where: dict[str, str | None] | None) -> str:
    """`` container=1a2b3c4d5e6f`` or `` unit=nginx.service`` (escaped), or ""."""
    if not where:
        return ""
    if where.get("container"):
        return f" container={printable(where['container'] or '')}"
    return f" unit={printable(where['unit'] or '')}" if where.get("unit") else ""


def caller_line(ev: CallEvent) -> str:
    """``-v``: the caller's command line and executable under its event,
    read when the event is printed (a process that exited is said so)."""
    command, exe = command_of(ev.pid)
    if command is None and exe is None:
        return "    caller: gone, or not readable"
    shown_exe = f"  (exe {exe})" if exe and not (command or "").startswith(exe) else ""
    return printable(f"    caller: {command or '?'}{shown_exe}")


RESULT_WIDTH = dict(COLUMNS)["RESULT"]  # a coloured errno is padded before _columns sees it


def header_line() -> str:
    return _columns(tuple(name for name, _ in COLUMNS))


def _columns(values: tuple[str, ...]) -> str:
    return " ".join(v.ljust(w) if w else v for v, (_, w) in zip(values, COLUMNS)).rstrip()


class Printer:
    def __init__(self, out: Output, as_json: bool, explainer: OnTheSpot | None,
                 pal: Palette = PLAIN, verbose: bool = False,
                 identities: CgroupIdentities | None = None) -> None:
        self.out = out
        self.as_json = as_json
        self.explainer = explainer
        self.pal = PLAIN if as_json else pal
        self.verbose = verbose and not as_json
        # one per run, shared with the --unit filter: each (pid, comm) whose
        # cgroup id does not resolve reads /proc once per IDENTITY_TTL_S
        self.identities = identities if identities is not None else CgroupIdentities()
        self.names = NetnsNames(refresh_s=1.0)  # namespaces made since are named too
        if not as_json:
            out.write(self.pal.head(header_line()) + "\n")

    def where(self, ev: CallEvent) -> dict[str, str | None]:
        """The caller's unit, container and pod (see CgroupIdentities)."""
        return self.identities.get(ev.pid, ev.cgroup_id, ev.comm)

    def emit(self, ev: CallEvent) -> None:
        found = self.explainer.explain(ev) if self.explainer else None
        if self.as_json:
            doc = with_netns_name(ev.to_json(), self.names)
            doc.update(self.where(ev))
            if found is not None:
                doc["blockers"] = found.blockers_json()
                doc["explanation"] = found.to_json()
            self.out.write(json.dumps(doc, separators=(",", ":")) + "\n")
        else:
            line = human_line(ev, self.names, self.pal, self.where(ev))
            if self.verbose:
                line += "\n" + caller_line(ev)
            if found is not None:
                label = "blocked by" if found.blockers or ev.errno_name == "EADDRINUSE" \
                    and ev.call != "connect" else "why"
                role = "bad" if label == "blocked by" else "warn"
                line += f"\n    {self.pal.paint(label + ':', role)} " + found.text()
            self.out.write(line + "\n")


def run(args: argparse.Namespace) -> ExitStatus:
    # A namespace named is resolved to its inode once, before the probes
    # load (a bad --netns is one sentence); the events carry the inode.
    args.filter = Filter.from_args(args).resolved()
    out = Output(getattr(args, "output", None))
    try:
        stop = StopSignal()
        engine = open_engine(config_from_args(args))
        try:
            announce(engine)
            status = _stream(engine, args, out, stop)
        finally:
            engine.close()
    except BaseException:
        out.close_quietly()
        raise
    out.close()
    return status


def open_output(path: str | None) -> Output:
    """stdout, or FILE opened for appending (see runtime.Output)."""
    return Output(path)


def output_palette(args: argparse.Namespace, out: Output) -> Palette:
    """Colour by --color on stdout; never in --json, never into -o FILE."""
    return palette(args, out.stream) if out.path is None and not args.json else PLAIN


def _stream(engine: Engine, args: argparse.Namespace, out: Output, stop: StopSignal) -> ExitStatus:
    clock = Clock()
    explainer = None if args.no_explain else OnTheSpot()
    printer = Printer(out, args.json, explainer, output_palette(args, out),
                      getattr(args, "verbose", False))

    def unit_of(ev: CallEvent) -> str | None:  # --unit asks what the line will show
        return printer.where(ev).get("unit")

    out.flush()
    deadline = time.monotonic() + args.duration if args.duration else None
    shown = 0
    reported = Counters()
    next_check = time.monotonic() + COUNTER_CHECK_S

    def show(raws: list[bytes]) -> bool:
        """Print the selected events; True once --count is reached."""
        nonlocal shown
        for raw in raws:
            ev = decode(raw, clock)
            if _selected(ev, args, unit_of):
                printer.emit(ev)
                shown += 1
                if args.count and shown >= args.count:
                    return True
        out.flush()
        return False

    try:
        while not stop.requested and (deadline is None or time.monotonic() < deadline):
            raws = engine.poll(POLL_MS)
            if show(raws):
                return ExitStatus.OK
            if raws:
                # Let a burst gather: the kernel wakes us only when we have
                # caught up, so one wakeup then serves many records.
                time.sleep(COALESCE_S)
            if time.monotonic() >= next_check:
                reported = report_losses(engine.counters(), reported)
                next_check = time.monotonic() + COUNTER_CHECK_S
        # What is already in the ring buffer happened: show it before leaving.
        show(engine.drain())
    finally:
        out.flush()
        if explainer:
            explainer.close()
        final = engine.counters()
        report_losses(final, reported)
        say(f"{shown} events shown, {final.lost} lost, {final.inflight_full} calls untraced")
    return ExitStatus.OK


_units: list[CgroupIdentities] = []  # made at the first --unit question


def _unit_of(ev: CallEvent) -> str | None:
    if not _units:
        _units.append(CgroupIdentities())
    return _units[0].get(ev.pid, ev.cgroup_id, ev.comm).get("unit")


def _selected(ev: CallEvent, args: argparse.Namespace,
              unit_of: Callable[[CallEvent], str | None] = _unit_of) -> bool:
    """The filters the kernel side does not apply (it filters one pid and
    the port)."""
    if args.errno and ev.errno not in args.errno:
        return False
    flt: Filter | None = getattr(args, "filter", None)
    return flt is None or flt.matches_event(ev, unit_of)
