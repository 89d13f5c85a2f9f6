"""The TIME_WAIT screen: TIME_WAIT sockets by port, remote and the process
that closed first, with the time they have left; ephemeral-port pressure
per source and destination."""

from __future__ import annotations

from typing import Callable

from rich.text import Text
from textual.app import ComposeResult
from textual.widgets import Static

from tracer.state import PressureRow, Snapshot, TimewaitRow
from tracer.text import printable
from tracer.views import timewait_to_json

from .base import Pane
from .render import bar, count, seconds_left
from .table import Column, Row, VirtualTable

COLUMNS = (
    Column("PORT", 9, keep="whole"),
    Column("REMOTE", 15, flex=3),
    Column("CLOSED BY", 12, flex=3, keep="pid"),
    Column("COUNT", 7, right=True),
    Column("LEFT", 7, right=True),
)

PRESSURE_COLUMNS = (
    Column("SOURCE", 15, flex=1),
    Column("DESTINATION", 21, flex=2, keep="port"),
    Column("IN USE", 13, right=True),
    Column("SHARE", 6, right=True),
    Column("LEVEL", 7),
    Column("NETNS", 10, flex=1, hide_below=110),
)

LEVEL_STYLE = {"full": "error", "warning": "warn"}


def tw_row(r: TimewaitRow) -> Row:
    return Row((r.port, r.remote, r.closer), (r.port, r.remote, r.closer, count(r.count),
                                              seconds_left(r.min_left_ms, r.max_left_ms)),
               "dim" if r.closer == "unknown" else "")


def pressure_row(p: PressureRow, netns_text: Callable[[int], str] = str) -> Row:
    return Row((p.netns, p.source, p.destination),
               (p.source, p.destination, f"{p.in_use}/{p.capacity}", f"{p.share:.0%}",
                p.level, netns_text(p.netns)), LEVEL_STYLE.get(p.level, ""))


def summary(snap: Snapshot, width: int) -> Text:
    tw = snap.timewait
    out = Text()
    if tw is None:
        out.append("TIME_WAIT sockets not read yet", "dim italic")
        return out
    out.append(f"{count(tw.total)} TIME_WAIT", "bold")
    out.append(f" · closer known for {count(tw.attributed)}"
               f" · {tw.collectors} collector(s) recording")
    full = sum(1 for p in tw.pressure if p.level == "full")
    warn = sum(1 for p in tw.pressure if p.level == "warning")
    if full:
        out.append(f" · {full} destination(s) out of ephemeral ports", "bold red")
    elif warn:
        out.append(f" · {warn} destination(s) near ephemeral-port exhaustion", "yellow")
    out.append("\n")
    if tw.total:
        # The time-left histogram on one line: "≤10s ███▌ 12 ≤20s ▎ 3 …"
        peak = max(c for _, c in tw.histogram) or 1
        labels = sum(len(f"≤{e}s ") + len(str(n)) + 2 for e, n in tw.histogram)
        cell = max(min((width - 10 - labels) // max(len(tw.histogram), 1), 8), 1)
        out.append("time left", "bold")
        for edge, n in tw.histogram:
            out.append(f" ≤{edge}s ")
            out.append(bar(n, peak, cell).rstrip() or "·", "cyan")
            out.append(f" {n}")
        out.append("\n")
    for note in tw.notes:
        out.append(printable(note) + "\n", "dim")
    return out


class TimewaitPane(Pane):
    PARTS = ("timewait", "names")
    ABOUT = """TIME_WAIT sockets by local port and remote address, with the process that
closed first and left them (when the collector saw the close), and how long
they have left. Below: ephemeral ports in use per source and destination,
against the namespace's ip_local_port_range: at `full`, connect() to that
destination fails with EADDRNOTAVAIL."""
    SAVE_NAME = "timewait"

    def screen_json(self) -> object:
        """``portscope timewait --json``'s form."""
        snap = self.snapshot
        return timewait_to_json(snap.timewait) if snap and snap.timewait else {}

    def __init__(self) -> None:
        super().__init__("5 TIME_WAIT", id="timewait")

    def compose(self) -> ComposeResult:
        yield Static(id="tw-summary", classes="summary")
        yield VirtualTable(COLUMNS, id="tw-table", empty="no TIME_WAIT socket")
        yield Static("Ephemeral ports in use, per source and destination", classes="section")
        yield VirtualTable(PRESSURE_COLUMNS, id="tw-pressure", show_cursor=False,
                           empty="no connection from the ephemeral range")

    @property
    def table(self) -> VirtualTable:
        return self.query_one("#tw-table", VirtualTable)

    def main_widget(self) -> VirtualTable:
        return self.table

    def render_snapshot(self, snap: Snapshot) -> None:
        width = self.size.width or 80
        self.query_one("#tw-summary", Static).update(summary(snap, width - 2))
        tw = snap.timewait
        self.table.set_rows([tw_row(r) for r in tw.rows] if tw else [])
        self.query_one("#tw-pressure", VirtualTable).set_rows(
            [pressure_row(p, snap.netns_text) for p in tw.pressure] if tw else [])
