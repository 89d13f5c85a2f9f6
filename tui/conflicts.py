"""The Conflicts screen: every failed bind(), listen() and connect() as it
happens; the selected one's explanation (blockers, rule, fixes) below."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.widgets import Static

from tracer.state import Conflict, Snapshot, clock_text
from tracer.text import printable

from .base import Pane
from .table import Column, Row, VirtualTable

COLUMNS = (
    Column("TIME", 8),
    Column("CALL", 7),
    Column("RESULT", 13),
    Column("PROTO", 5, hide_below=100),
    Column("WHO", 12, flex=1),
    Column("REQUESTED", 15, flex=1),
    Column("BLOCKED BY", 12, flex=5),
)

STYLES = {"EADDRINUSE": "error", "EADDRNOTAVAIL": "warn"}


def conflict_row(c: Conflict) -> Row:
    ev = c.event
    return Row(c.seq, (clock_text(ev.time)[:8], ev.call, c.result, c.proto, c.who,
                       ev.requested, c.blocked_by()), STYLES.get(c.result, ""))


def _seq(c: Conflict) -> int:
    return c.seq


def detail(c: Conflict) -> Text:
    """The explanation of one conflict, as the detail pane shows it."""
    ev = c.event
    s = printable  # every value may come from a journal: escaped, never markup
    out = Text()
    out.append(f"{s(ev.call)}() ", "bold")
    out.append(s(c.result), "bold red" if c.result == "EADDRINUSE" else "bold yellow")
    out.append(f"  {s(c.proto)} {s(ev.requested)}  {clock_text(ev.time)}\n")
    options = s(",".join(ev.options.names())) or "none"
    dev = f" dev={ev.options.bound_dev_if}" if ev.options.bound_dev_if else ""
    out.append(f"by {s(c.who)} uid {ev.uid} (socket uid {ev.sock_uid}) · options {options}{dev}"
               f" · netns {ev.netns} · inode {ev.inode}\n", "dim")
    x = c.explanation
    if x is None:
        if c.pending:
            out.append("\nexplaining: reading the port's sockets…\n", "italic")
        hint = c.hint()
        if hint:
            out.append("\n" + hint + "\n")
        return out
    if x.error:
        out.append("\nno explanation: ", "bold")
        out.append(s(x.error) + "\n")
        return out
    if x.reasons:
        out.append("\nWhy\n", "bold")
        for i, reason in enumerate(x.reason_texts):
            out.append(f"  {'•' if i == 0 else 'then:'} {s(reason)}\n")
    if x.blockers or x.rule in ("", "conflict"):
        out.append("\nBlocked by\n", "bold")
    if not x.blockers and x.rule in ("", "conflict"):
        out.append("  nothing left by the time we looked (the blocker closed meanwhile)\n")
    for b in x.blockers:
        out.append(f"  {s(b.who)} ", "bold")
        out.append(f"{s(b.state)} {s(b.local)}  ")
        out.append(s(b.rule) + (f", {s(b.overlap)}" if b.overlap else ""), "magenta")
        out.append("\n")
        if b.why:
            out.append(f"    {s(b.why)}\n", "dim")
    if ev.capture is not None:
        out.append(f"  {capture_line(ev.capture)}\n", "dim")
    if x.fixes:
        out.append("\nFixes\n", "bold")
        for fix in x.fix_texts:
            out.append(f"  • {s(fix)}\n", "green")
    if x.notes:
        out.append("\nNotes\n", "bold")
        for note in x.note_texts:
            out.append(f"  • {s(note)}\n")
    return out


CAPTURE_WHEN = {"refusal": "at the port allocator's refusal", "exit": "as the call returned"}


def capture_line(cap) -> str:  # type: ignore[no-untyped-def]
    """Where the blockers above come from, when the probe read them."""
    shown = "" if cap.complete else "at least "
    return (f"read in the kernel {CAPTURE_WHEN.get(cap.when, cap.when)}: {shown}{cap.seen} "
            f"socket(s) on the port, {len(cap.sockets)} kept")


class ConflictsPane(Pane):
    PARTS = ("conflicts",)
    BINDINGS = [Binding("f", "follow", "Follow")]

    def __init__(self) -> None:
        super().__init__("2 Conflicts", id="conflicts")
        self._by_seq: dict[int, Conflict] = {}

    def compose(self) -> ComposeResult:
        yield VirtualTable(COLUMNS, id="conflict-table", follow=True,
                           empty="no failed bind(), listen() or connect() yet")
        with VerticalScroll(id="conflict-detail", classes="detail"):
            yield Static(id="conflict-text")

    @property
    def table(self) -> VirtualTable:
        return self.query_one("#conflict-table", VirtualTable)

    def main_widget(self) -> VirtualTable:
        return self.table

    def render_snapshot(self, snap: Snapshot) -> None:
        conflicts = snap.conflicts
        self._by_seq = {c.seq: c for c in conflicts}
        # Rows are made only for the lines on screen.
        self.table.set_rows(conflicts, conflict_row, _seq)
        self._show_detail(self.table.cursor_key)

    def _show_detail(self, key: object) -> None:
        c = self._by_seq.get(key)  # type: ignore[arg-type]
        text = detail(c) if c else Text("select a conflict to see who blocks it and what "
                                         "would fix it", "dim italic")
        self.query_one("#conflict-text", Static).update(text)

    def on_virtual_table_highlighted(self, event: VirtualTable.Highlighted) -> None:
        event.stop()
        self._show_detail(event.key)

    def select(self, seq: int) -> None:
        """Put the cursor on conflict ``seq`` (from the Overview)."""
        table = self.table
        table.follow = False
        table.move_to(seq)
        table.refresh()

    def action_follow(self) -> None:
        """Jump to the newest conflict and follow; when already following, stop."""
        table = self.table
        at_end = table.cursor >= table.row_count - 1
        table.follow = not (table.follow and at_end)
        if table.follow:
            table.action_last()
        self.notify("following new conflicts" if table.follow else "not following: the "
                    "cursor stays where it is", timeout=2)
