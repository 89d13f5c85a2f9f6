"""The Conflicts screen: every failed bind(), listen() and connect() as it
happens; the selected one's explanation (blockers, rule, fixes) below."""

from __future__ import annotations

from typing import Callable

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.widgets import Input, Static

from tracer.state import Conflict, Snapshot, clock_text, matches
from tracer.text import printable

from .base import Pane
from .render import owner_facts
from .table import Column, Row, VirtualTable

COLUMNS = (
    Column("TIME", 8),
    Column("CALL", 7),
    Column("RESULT", 13, keep="whole"),
    Column("PROTO", 5, hide_below=100),
    Column("WHO", 12, flex=1, keep="pid"),
    Column("REQUESTED", 15, flex=1, keep="port"),
    Column("BLOCKED BY", 12, flex=5, keep="pid"),
)

STYLES = {"EADDRINUSE": "error", "EADDRNOTAVAIL": "warn"}


def conflict_row(c: Conflict) -> Row:
    ev = c.event
    return Row(c.seq, (clock_text(ev.time)[:8], ev.call, c.result, c.proto, c.who,
                       ev.requested, c.blocked_by()), STYLES.get(c.result, ""))


def _seq(c: Conflict) -> int:
    return c.seq


def search_text(c: Conflict, netns_name: str = "") -> str:
    """What the ``/`` filter matches: the row's words, the namespace's name,
    and ``pid=``, ``uid=``, ``ns=`` and ``lport=`` forms of its numbers
    (``:8080`` is the requested port exactly)."""
    ev = c.event
    return " ".join((ev.call, c.result, c.proto, c.who, ev.requested, c.blocked_by(), netns_name,
                     f"pid={ev.pid} uid={ev.uid} ns={ev.netns} lport={ev.port} ")).lower()


def detail(c: Conflict, netns_text: Callable[[int], str] = str) -> Text:
    """The explanation of one conflict, as the detail pane shows it;
    ``netns_text`` names a namespace beside its inode."""
    ev = c.event
    s = printable  # every value may come from a journal: escaped, never markup
    out = Text()
    out.append(f"{s(ev.call)}() ", "bold")
    out.append(s(c.result), "bold red" if c.result == "EADDRINUSE" else "bold yellow")
    out.append(f"  {s(c.proto)} {s(ev.requested)}  {clock_text(ev.time)}\n")
    options = s(",".join(ev.options.names())) or "none"
    dev = f" dev={ev.options.bound_dev_if}" if ev.options.bound_dev_if else ""
    out.append(f"by {s(c.who)} uid {ev.uid} (socket uid {ev.sock_uid}) · options {options}{dev}"
               f" · netns {s(netns_text(ev.netns))} · inode {ev.inode}\n", "dim")
    if c.caller is not None and (facts := owner_facts(c.caller)):
        out.append(f"   {s(facts)}\n", "dim")
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
    # The fix first: it is what the on-call engineer came for; then who
    # blocks; the kernel's reasons last, as they can run past the bottom of
    # an 80x24 terminal (d scrolls there).
    if x.fixes:
        out.append("\nFixes\n", "bold")
        for fix in x.fix_texts:
            out.append(f"  • {s(fix)}\n", "green")
    if x.blockers or x.rule in ("", "conflict"):
        out.append("\nBlocked by\n", "bold")
    if not x.blockers and x.rule in ("", "conflict"):
        out.append("  nothing left by the time we looked (the blocker closed meanwhile)\n")
    for b in x.blockers:
        out.append(f"  {s(b.who)} ", "bold")
        out.append(f"{s(b.state)} {s(b.local)}  ")
        out.append(s(b.rule) + (f", {s(b.overlap)}" if b.overlap else ""), "magenta")
        out.append("\n")
        for o in b.owners[:OWNERS_DETAILED]:
            if facts := owner_facts(o):
                out.append(f"    {s(o.comm)}[{o.pid}]: {s(facts)}\n", "cyan")
        if len(b.owners) > OWNERS_DETAILED:
            out.append(f"    and {len(b.owners) - OWNERS_DETAILED} more holder(s)\n", "dim")
        if b.why:
            out.append(f"    {s(b.why)}\n", "dim")
    if ev.capture is not None:
        out.append(f"  {capture_line(ev.capture)}\n", "dim")
    if x.reasons:
        out.append("\nWhy\n", "bold")
        for i, reason in enumerate(x.reason_texts):
            out.append(f"  {'•' if i == 0 else 'then:'} {s(reason)}\n")
    if x.notes:
        out.append("\nNotes\n", "bold")
        for note in x.note_texts:
            out.append(f"  • {s(note)}\n")
    return out


OWNERS_DETAILED = 3  # holders of one blocker described (after fork: every worker)


CAPTURE_WHEN = {"refusal": "at the port allocator's refusal", "exit": "as the call returned"}


def capture_line(cap) -> str:  # type: ignore[no-untyped-def]
    """Where the blockers above come from, when the probe read them."""
    shown = "" if cap.complete else "at least "
    return (f"read in the kernel {CAPTURE_WHEN.get(cap.when, cap.when)}: {shown}{cap.seen} "
            f"socket(s) on the port, {len(cap.sockets)} kept")


class ConflictsPane(Pane):
    PARTS = ("conflicts", "names")
    ABOUT = """Every failed bind(), listen() and connect() on the host, newest last; the
selected one's explanation below it: who blocks it, the fix, then why
(the kernel's rule), and notes. The list follows new conflicts until you
move the cursor (f follows again). The filter keeps rows containing every
word typed: a process, an errno, an address, `:8080` (that port exactly),
`pid=123`, `uid=1000`, `ns=4026531840` or the namespace's name."""
    SAVE_NAME = "conflicts"
    SAVE_LINES = True  # portscope trace --json: one event per line
    BINDINGS = [
        Binding("f", "follow", "Follow", tooltip="Follow the newest conflict (again)"),
        Binding("slash", "filter", "Filter",
                tooltip="Filter: type words, :PORT, pid=, uid=, ns=; enter back to the list"),
        Binding("d", "detail", "Detail",
                tooltip="Detail: into the explanation, where PgDn and arrows scroll; d back"),
        Binding("escape", "clear", "Clear", show=False, tooltip="Clear the filter"),
    ]

    def __init__(self) -> None:
        super().__init__("2 Conflicts", id="conflicts")
        self._by_seq: dict[int, Conflict] = {}
        self.query_text = ""
        self._shown: list[Conflict] = []
        # The filter's text of each conflict, made once (and again when its
        # explanation arrives).
        self._search: dict[int, tuple[tuple[int, str], str]] = {}

    def compose(self) -> ComposeResult:
        yield Input(placeholder="/ filter: process, errno, address, :PORT, pid=, ns=…",
                    id="conflict-filter", classes="filter")
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
        self._by_seq = {c.seq: c for c in snap.conflicts}
        # Conflicts dropped from the model (it keeps the newest) leave the cache.
        self._search = {k: v for k, v in self._search.items() if k in self._by_seq}
        self._apply()

    def _apply(self) -> None:
        snap = self.snapshot
        conflicts = list(snap.conflicts) if snap else []
        q = self.query_text.strip()
        if q:
            conflicts = [c for c in conflicts if matches(self._search_of(c), q)]
        self._shown = conflicts
        # Rows are made only for the lines on screen.
        self.table.set_rows(conflicts, conflict_row, _seq)
        self._show_detail(self.table.cursor_key)

    def _search_of(self, c: Conflict) -> str:
        name = self.snapshot.netns_names.get(c.event.netns, "") if self.snapshot else ""
        known = self._search.get(c.seq)
        if known is None or known[0] != (id(c.explanation), name):
            known = self._search[c.seq] = ((id(c.explanation), name), search_text(c, name))
        return known[1]

    def screen_json(self) -> object:
        return [c.to_json() for c in self._shown]

    def on_input_changed(self, event: Input.Changed) -> None:
        event.stop()
        self.query_text = event.value
        self._apply()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.table.focus()

    def action_filter(self) -> None:
        self.query_one("#conflict-filter", Input).focus()

    def action_clear(self) -> None:
        inp = self.query_one("#conflict-filter", Input)
        if inp.value:
            inp.value = ""
        self.table.focus()

    def action_detail(self) -> None:
        """Into the explanation (PgDn/arrows scroll it); d or escape back."""
        detail_pane = self.query_one("#conflict-detail", VerticalScroll)
        if detail_pane.has_focus:
            self.table.focus()
        else:
            detail_pane.focus()

    def _show_detail(self, key: object) -> None:
        c = self._by_seq.get(key)  # type: ignore[arg-type]
        snap = self.snapshot
        text = detail(c, snap.netns_text if snap else str) if c else Text("select a conflict to see who blocks it and what "
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
