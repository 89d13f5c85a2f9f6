"""The Overview screen: the probe plan and the collector's health, how many
listeners, TIME_WAIT sockets and reuseport groups there are, and the latest
conflicts."""

from __future__ import annotations

import dataclasses

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.message import Message
from textual.widgets import Static

from tracer.state import Snapshot
from tracer.text import clock_text, printable

from .base import Pane
from .conflicts import COLUMNS as CONFLICT_COLUMNS
from .conflicts import conflict_row
from .render import count, rate
from .table import Row, VirtualTable

LATEST = 50

# The Conflicts screen's columns but PROTO.
COLUMNS = tuple(c for c in CONFLICT_COLUMNS if c.label != "PROTO")


def _gaps(*items: tuple[int, str]) -> Text:
    """'0 lost · 3 untraced', the non-zero ones in bold yellow."""
    out = Text()
    for i, (n, what) in enumerate(items):
        if i:
            out.append(" · ")
        out.append(f"{count(n)} {what}", "bold yellow" if n else "")
    return out


def summary(snap: Snapshot) -> Table:
    h = snap.health
    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="bold", no_wrap=True, min_width=7)
    grid.add_column(overflow="ellipsis", no_wrap=True, ratio=1)

    plan = Text(f"{printable(h.plan or '?')} plan", "bold")
    plan.append(f" · {printable(h.source)}")
    if h.started:
        plan.append(" · since " + clock_text(h.started, date=False, digits=0))
    grid.add_row("Probes", plan)
    if h.plan_notes:
        # One line, the plans' names only: the kernel's reasons are long,
        # and portscope doctor (or ? here) tells them.
        names = [note.split(":", 1)[0] for note in h.plan_notes]
        grid.add_row("", Text("not used: " + printable(", ".join(names))
                              + " (portscope doctor says why)", "dim"))
    events = Text(f"{rate(h.events_per_s)} · {count(h.events)} read · ")
    events.append_text(_gaps((h.lost, "lost"), (h.untraced, "untraced")))
    grid.add_row("Events", events)
    sockets = Text(f"{count(snap.listeners)} listeners · {count(snap.time_wait)} TIME_WAIT"
                   f" · {count(len(snap.groups))} reuseport groups"
                   f" · {count(snap.conflicts_total)} conflicts")
    grid.add_row("Sockets", sockets)
    items = [(h.unreadable_processes, "unreadable processes"), (h.flags_unknown, "flags unknown"),
             (h.namespaces_gone, "namespaces gone")]
    if h.explain_failures or h.explain_skipped:
        items.append((h.explain_failures + h.explain_skipped, "unexplained"))
    grid.add_row("Gaps", _gaps(*items))
    if h.refresh_ms:
        grid.add_row("Refresh", Text(" · ".join(f"{k} {v:.0f} ms" for k, v in h.refresh_ms),
                                     "dim"))
    for kind, sentence in h.errors:
        grid.add_row(Text("Error", "bold red"), Text(printable(sentence), "red"))
    return grid


class OverviewPane(Pane):
    PARTS = ("conflicts", "ports", "groups", "timewait", "health")
    ABOUT = """The probe plan in use (and the better ones this kernel refused: portscope
doctor says why), the collector's health (events read and lost, processes
that could not be read), how many listeners, TIME_WAIT sockets and reuseport
groups there are, and the latest conflicts: enter opens one on screen 2."""
    SAVE_NAME = "overview"

    def screen_json(self) -> object:
        """The health, the counts and the latest conflicts shown."""
        snap = self.snapshot
        if snap is None:
            return {}
        return {"health": dataclasses.asdict(snap.health), "listeners": snap.listeners,
                "time_wait": snap.time_wait, "groups": len(snap.groups),
                "conflicts": snap.conflicts_total,
                "latest": [c.to_json() for c in snap.conflicts[-LATEST:]]}

    class Open(Message):
        """Show this conflict on the Conflicts screen."""

        def __init__(self, seq: int) -> None:
            super().__init__()
            self.seq = seq

    def __init__(self) -> None:
        super().__init__("1 Overview", id="overview")
        self._latest_seen = -1

    def compose(self) -> ComposeResult:
        yield Static(id="ov-summary", classes="summary")
        yield Static("Latest conflicts (enter: explain)", classes="section")
        yield VirtualTable(COLUMNS, id="ov-latest", follow=True,
                           empty="no failed bind(), listen() or connect() yet")

    def main_widget(self) -> VirtualTable:
        return self.query_one("#ov-latest", VirtualTable)

    def render_snapshot(self, snap: Snapshot) -> None:
        self.query_one("#ov-summary", Static).update(summary(snap))
        if snap.versions.conflicts != self._latest_seen:
            self._latest_seen = snap.versions.conflicts
            rows: list[Row] = [conflict_row(c) for c in snap.conflicts[-LATEST:]]
            self.main_widget().set_rows([Row(r.key, r.cells[:3] + r.cells[4:], r.style)
                                         for r in rows])

    def on_virtual_table_selected(self, event: VirtualTable.Selected) -> None:
        event.stop()
        if event.key is not None:
            self.post_message(self.Open(event.key))  # type: ignore[arg-type]
