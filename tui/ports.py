"""The Ports screen: who holds what. Every socket but TIME_WAIT (their own
screen), by port, listeners first, with owners and the flags ss cannot show;
a filter narrows it as you type."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import Input, Static

from tracer.state import Snapshot, SocketRow, matches
from tracer.text import clock_text

from .base import Pane
from .render import count
from .table import Column, Row, VirtualTable

COLUMNS = (
    Column("PROTO", 5),
    Column("STATE", 10, keep="whole"),
    Column("LOCAL", 14, flex=1, keep="port"),
    Column("REMOTE", 15, flex=1, keep="port"),
    Column("QUEUE", 7, right=True),
    Column("FLAGS", 8, flex=1),
    Column("OWNERS", 10, flex=3, keep="pid"),
    Column("NETNS", 10, flex=1, hide_below=120),
    Column("UID", 5, right=True, hide_below=120),
    Column("INODE", 8, right=True, hide_below=140, keep="whole"),
    Column("TIMER", 9, hide_below=140),
)

# ss's short names: the table is read at 80 columns.
SHORT_STATES = {"ESTABLISHED": "ESTAB", "CLOSE": "UNCONN", "SYN_SENT": "SYN-SENT",
                "SYN_RECV": "SYN-RECV", "FIN_WAIT1": "FIN-WAIT1", "FIN_WAIT2": "FIN-WAIT2",
                "CLOSE_WAIT": "CLOSE-WAIT", "LAST_ACK": "LAST-ACK", "TIME_WAIT": "TIME-WAIT"}


def port_key(r: SocketRow) -> tuple:
    return (r.netns, r.cookie, r.inode, r.local, r.remote)


def port_row(r: SocketRow) -> Row:
    return Row(port_key(r),
               (r.proto, SHORT_STATES.get(r.state, r.state), r.local, r.remote, r.queue,
                r.flags, r.owners, r.netns_text or str(r.netns), str(r.uid), str(r.inode), r.timer),
               "ok" if r.state == "LISTEN" else ("dim" if r.owners == "-" else ""))


class PortsPane(Pane):
    PARTS = ("ports",)
    ABOUT = """Every socket but TIME_WAIT (screen 5 has those), by port, listeners first,
with its owners and the flags ss cannot show: ra SO_REUSEADDR, rp SO_REUSEPORT
and its group (g<id>/<members>), v6 IPV6_V6ONLY, fb IP_FREEBIND, tp
IP_TRANSPARENT, ? not readable. QUEUE is recv/send, or for a listener its
accept queue/backlog. The filter keeps rows containing every word typed:
a state, an owner, a user, a flag, `:443` (that local port exactly),
`uid=1000`, `ns=4026531840`."""
    SAVE_NAME = "ports"
    BINDINGS = [
        Binding("slash", "filter", "Filter",
                tooltip="Filter: type words, :PORT, a state, an owner, uid=, ns=; enter back "
                        "to the list"),
        Binding("l", "listeners", "Listeners", tooltip="Listeners only (again: every socket)"),
        Binding("escape", "clear", "Clear", show=False, tooltip="Clear the filter"),
    ]

    def __init__(self) -> None:
        super().__init__("3 Ports", id="ports")
        self.query_text = ""
        self.listeners_only = False
        self._source: tuple[SocketRow, ...] = ()
        self._listeners = 0
        self._shown: list[SocketRow] = []

    def screen_json(self) -> object:
        """``portscope ports --json``'s sockets, the ones shown."""
        return {"sockets": [r.to_json() for r in self._shown]}

    def compose(self) -> ComposeResult:
        yield Input(placeholder="/ filter: words, :PORT, state, owner, user, flag…",
                    id="port-filter", classes="filter")
        yield Static(id="port-summary", classes="summary")
        yield VirtualTable(COLUMNS, id="port-table", empty="no sockets read yet")

    @property
    def table(self) -> VirtualTable:
        return self.query_one("#port-table", VirtualTable)

    def main_widget(self) -> VirtualTable:
        return self.table

    def render_snapshot(self, snap: Snapshot) -> None:
        if snap.ports is not self._source:
            self._source = snap.ports
            self._listeners = sum(1 for r in snap.ports if r.state == "LISTEN")
        self._apply()

    def _apply(self) -> None:
        q = self.query_text.strip()
        lo = self.listeners_only
        shown = [r for r in self._source
                 if (not lo or r.state == "LISTEN") and (not q or matches(r.search, q))]
        # Rows are made only for the lines on screen.
        self._shown = shown
        self.table.set_rows(shown, port_row, port_key)
        total = len(self._source)
        listeners = self._listeners
        parts = [f"{count(total)} sockets (not TIME_WAIT)", f"{count(listeners)} listening"]
        if q or lo:
            parts.append(f"{count(len(shown))} shown" + (" · listeners only" if lo else ""))
        snap = self.snapshot
        if snap and snap.ports_taken_at:
            parts.append("read " + clock_text(snap.ports_taken_at, date=False, digits=0))
        self.query_one("#port-summary", Static).update(Text(" · ".join(parts)))

    def on_input_changed(self, event: Input.Changed) -> None:
        event.stop()
        self.query_text = event.value
        if self.snapshot is not None:
            self._apply()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.table.focus()

    def action_filter(self) -> None:
        self.query_one("#port-filter", Input).focus()

    def action_clear(self) -> None:
        inp = self.query_one("#port-filter", Input)
        if inp.value:
            inp.value = ""
        self.table.focus()

    def action_listeners(self) -> None:
        self.listeners_only = not self.listeners_only
        if self.snapshot is not None:
            self._apply()
