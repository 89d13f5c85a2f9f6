"""The Groups screen: each SO_REUSEPORT group, and for the selected one a bar
per member (its share of the deliveries), the group's rate as a sparkline,
the imbalance figures, and the members that joined or left."""

from __future__ import annotations

from typing import Callable

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import Static

from tracer.state import GroupView, Snapshot, clock_text
from tracer.text import printable

from .base import Pane
from .render import bar, count, owner_facts, rate, share, sparkline
from .table import Column, Row, VirtualTable, fit_pid

COLUMNS = (
    Column("GROUP", 14, flex=2, keep="port"),
    Column("PROTO", 5),
    Column("MEMBERS", 7, right=True),
    Column("RATE", 8, right=True),
    Column("BALANCE", 12),
    Column("NETNS", 10, flex=1, hide_below=110),
    Column("OWNERS", 8, flex=3, keep="pid"),
)

VERDICT_STYLE = {"uneven": "warn", "even": "ok"}
OWNERS_DESCRIBED = 4  # processes serving a group described in its detail


def group_row(g: GroupView, netns_text: Callable[[int], str] = str) -> Row:
    verdict = g.imbalance.verdict if g.imbalance else "-"
    if verdict == "insufficient":
        verdict = "too little"
    style = VERDICT_STYLE.get(g.imbalance.verdict if g.imbalance else "", "")
    if g.flagged:  # a member not served outranks any balance
        verdict = f"{len(g.flagged)} {g.flagged[0].status.replace('_', ' ')}"
        style = "error"
    members = str(len(g.members)) if len(g.members) == g.size else f"{len(g.members)}/{g.size}"
    return Row(g.key, (g.local, g.proto, members, rate(g.rate), verdict, netns_text(g.netns),
                       g.owners),
               style)


def detail(g: GroupView, width: int, netns_text: Callable[[int], str] = str) -> Text:
    width = max(width, 40)
    s = printable  # a journal's groups are whatever it holds: escaped
    out = Text()
    out.append(f"{s(g.local)} {s(g.proto)}", "bold")
    out.append(f" · netns {s(netns_text(g.netns))} · {len(g.members)} members"
               + (f" (kernel counts {g.size})" if g.size != len(g.members) else "")
               + f" · {count(g.delivered)} delivered · {rate(g.rate)}"
               + (" · steered by a BPF program" if g.bpf else "") + "\n")
    spark_w = max(min(len(g.history), width - 16), 0)
    out.append("rate      ", "bold")
    out.append(sparkline(g.history, spark_w) or "(after the second read)", "cyan")
    if g.history:
        out.append(f" {rate(g.history[-1])}")
    out.append("\n")
    if g.imbalance:
        out.append("balance   ", "bold")
        out.append(s(g.balance or g.imbalance.text) + "\n",
                   "yellow" if g.imbalance.verdict == "uneven" else "")
    for m in g.flagged:
        for problem in m.problems:
            out.append(f"! inode {m.inode} {m.status.replace('_', ' ')}: ", "bold red")
            out.append(s(problem) + "\n", "red")
    # A bar per member: its share of the deliveries since membership last
    # changed (what the imbalance is measured on), else of all it received.
    owners = [s(m.owner) for m in g.members]
    name_w = min(max((len(o) for o in owners), default=6), 24)
    figures_w = 34
    bar_w = max(width - name_w - figures_w - 2, 6)
    values = [m.share if m.share is not None else float(m.delivered) for m in g.members]
    peak = max(values, default=0)
    out.append(f"{'SERVED BY'.ljust(name_w)} {'SHARE'.ljust(bar_w)}"
               f" {'DELIVERED':>9} {'%':>4} {'RATE':>8} {'QUEUE':>9}\n", "bold")
    for m, v, name in zip(g.members, values, owners):
        owner = fit_pid(name, name_w)  # the pid whole, the name shortened
        queue = f"{m.queue}/{m.backlog}" if m.backlog is not None else str(m.queue)
        out.append(owner.ljust(name_w) + " ", "bold red" if m.status != "ok" else "")
        out.append(bar(v, peak, bar_w), "green" if m.status == "ok" else "red")
        out.append(f" {m.delivered:>9,} {share(m.share):>4} {rate(m.rate):>8} {queue:>9}\n")
    holders = dict.fromkeys(h for m in g.members for h in m.holders.split() if m.holders)
    if holders:
        out.append("held by   ", "bold")
        out.append(s(" ".join(holders)) + "\n", "dim")
    if any(m.owner.endswith(" *") for m in g.members):
        out.append("* no process was seen waiting on it: its holders are shown\n", "dim")
    # Who they are beyond comm[pid]: unit or container, command line.
    who = {o.pid: o for m in g.members for o in m.served_by}
    described = [(o, facts) for o in who.values()
                 if (facts := owner_facts(o))]
    for o, facts in described[:OWNERS_DESCRIBED]:
        out.append(f"  {s(o.comm)}[{o.pid}]: ", "bold")
        out.append(s(facts) + "\n", "cyan")
    if len(described) > OWNERS_DESCRIBED:
        out.append(f"  and {len(described) - OWNERS_DESCRIBED} more process(es)\n", "dim")
    if g.events:
        out.append("joined and left\n", "bold")
        for e in reversed(g.events[-8:]):
            mark, style = ("+", "green") if e.kind == "join" else ("-", "red")
            out.append(f"  {clock_text(e.time)[:8]} ")
            out.append(f"{mark} {s(e.kind):5} ", style)
            out.append(s(e.member) + (f" ({count(e.delivered)} delivered)" if e.kind == "leave"
                                   else "") + "\n")
    return out


class GroupsPane(Pane):
    PARTS = ("groups", "names")
    ABOUT = """Each SO_REUSEPORT group: sockets sharing one address and port, over which
the kernel spreads new connections (TCP) or datagrams (UDP). For the selected
group: its rate, a bar per member with its share of the deliveries, who
serves each member (the thread seen waiting in accept, poll or epoll on it;
* when nobody was: its holders), the balance verdict with its figures, and
the members that joined or left. A member nobody serves is shown in red."""
    SAVE_NAME = "groups"

    def screen_json(self) -> object:
        """``portscope groups --json``'s groups."""
        snap = self.snapshot
        return {"groups": [g.to_json() for g in snap.groups] if snap else []}

    def __init__(self) -> None:
        super().__init__("4 Groups", id="groups")
        self._by_key: dict[str, GroupView] = {}

    def compose(self) -> ComposeResult:
        yield VirtualTable(COLUMNS, id="group-table", empty="no SO_REUSEPORT group on this host")
        with VerticalScroll(id="group-detail", classes="detail"):
            yield Static(id="group-text")

    @property
    def table(self) -> VirtualTable:
        return self.query_one("#group-table", VirtualTable)

    def main_widget(self) -> VirtualTable:
        return self.table

    def render_snapshot(self, snap: Snapshot) -> None:
        self._by_key = {g.key: g for g in snap.groups}
        self.table.set_rows([group_row(g, snap.netns_text) for g in snap.groups])
        self._show_detail(self.table.cursor_key)

    def _show_detail(self, key: object) -> None:
        g = self._by_key.get(key)  # type: ignore[arg-type]
        width = self.query_one("#group-detail").size.width or 78
        snap = self.snapshot
        text = detail(g, width - 2, snap.netns_text if snap else str) if g else Text(
            "sockets that share a port with SO_REUSEPORT appear here, with how the kernel "
            "spreads connections and datagrams over them", "dim italic")
        self.query_one("#group-text", Static).update(text)

    def on_virtual_table_highlighted(self, event: VirtualTable.Highlighted) -> None:
        event.stop()
        self._show_detail(event.key)

    def on_resize(self) -> None:
        if self.snapshot is not None:
            self._show_detail(self.table.cursor_key)
