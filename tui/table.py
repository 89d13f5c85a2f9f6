"""A virtual table: thousands of rows, only the visible ones rendered.

Textual's DataTable keeps a cell object per value and measures every cell
when rows are added: refilling 10,000 rows blocks the UI thread for 0.4 s
to 2 s (scripts/bench-tui prints the figure). Here the rows are a list of
any objects, replaced in one assignment and turned into text only for the
lines on screen, so a refresh costs about the same with 10 rows or 100,000. The cursor stays
on the same row *key* across updates, so a refresh never moves what the
user is reading.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Hashable, NamedTuple, Sequence

from rich.cells import cell_len, set_cell_size
from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.binding import Binding
from textual.geometry import Size
from textual.message import Message
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip

from tracer.text import printable


class Column(NamedTuple):
    label: str
    width: int  # fixed width, or the minimum width of a flexible column
    flex: int = 0  # share of the space left over (0: fixed)
    right: bool = False  # right-aligned (numbers)
    hide_below: int = 0  # hidden when the table is narrower than this
    # What a cut must spare (see KEEPS): "" (nothing: the end goes first),
    # "whole" (never cut: an errno, a state), "pid" (every ``name[pid]``
    # shown keeps its pid whole), "port" (an address keeps its ``:port``).
    keep: str = ""


class Row(NamedTuple):
    key: Hashable
    cells: tuple[str, ...]
    style: str = ""  # "", "error", "warn", "dim", "ok"


def fit(text: str, width: int, right: bool = False) -> str:
    """``text`` cut (with an ellipsis) or padded to exactly ``width`` cells
    (terminal cells: a wide character takes two)."""
    if width <= 0:
        return ""
    if text.isascii():  # the common case, one cell per character
        if len(text) > width:
            return text[: width - 1] + "…"
        return text.rjust(width) if right else text.ljust(width)
    size = cell_len(text)
    if size > width:
        return set_cell_size(text, width - 1) + "…"
    pad = " " * (width - size)
    return pad + text if right else text + pad


# ``name[pid]``: the pid is what an operator acts on (kill, nsenter, ps).
PID_TOKEN = re.compile(r"(\S*?)(\[\d+\])")
PORT_TAIL = re.compile(r":\d+$")
SHORTEST_NAME = 1  # cells of a name kept before its cut pid-bearing token


def _cut(text: str, width: int) -> str:
    """The first ``width`` cells of ``text`` (a wide character counts two)."""
    return text[:width] if text.isascii() else set_cell_size(text, width).rstrip()


def fit_pid(text: str, width: int) -> str:
    """``text`` in ``width`` cells with every ``[pid]`` it shows whole: the
    end goes first, then the first name is shortened (``pyth…[1399]``); a
    later owner that does not fit is left out whole, never half shown."""
    if cell_len(text) <= width:
        return text
    first = PID_TOKEN.search(text)
    if first is None:
        return _cut(text, width - 1) + "…"
    if cell_len(text[:first.end()]) + 1 <= width:
        cut = len(_cut(text, width - 1))
        for m in PID_TOKEN.finditer(text, first.end()):
            if m.start() < cut < m.end():  # inside a later owner: leave it out
                cut = m.start()
        return text[:cut].rstrip() + "…"
    rest = "…" if first.end() < len(text) else ""
    prefix, name, pid = text[:first.start()], first.group(1), first.group(2)
    room = width - cell_len(prefix) - len(pid) - len(rest) - 1
    if room < SHORTEST_NAME:  # narrower than any column is laid out
        return _cut(text, width - 1) + "…"
    return prefix + _cut(name, room) + "…" + pid + rest


def fit_port(text: str, width: int) -> str:
    """An address in ``width`` cells with its ``:port`` whole: the address
    is shortened (``[2001:db8:…]:8443``), never the port."""
    if cell_len(text) <= width:
        return text
    m = PORT_TAIL.search(text)
    room = width - len(m.group()) - 1 if m else -1
    if m is None or room < 1:
        return _cut(text, width - 1) + "…"
    return _cut(text[:m.start()], room) + "…" + m.group()


def least_width(text: str, keep: str) -> int:
    """The fewest cells ``text`` can be shown in with what ``keep`` spares."""
    if keep == "whole":
        return cell_len(text)
    if keep == "pid" and (m := PID_TOKEN.search(text)):
        name = min(cell_len(m.group(1)), SHORTEST_NAME)
        more = 1 if m.end() < len(text) else 0
        return cell_len(text[:m.start()]) + name + (1 if name < cell_len(m.group(1)) else 0) \
            + len(m.group(2)) + more
    if keep == "port" and (m := PORT_TAIL.search(text)):
        return min(cell_len(text), len(m.group()) + 2)
    return 0


def fit_cell(text: str, width: int, column: Column) -> str:
    """One cell: cut as its column allows (see :data:`Column.keep`), padded."""
    if column.keep == "pid":
        text = fit_pid(text, width)
    elif column.keep == "port":
        text = fit_port(text, width)
    return fit(text, width, column.right)


def layout(columns: Sequence[Column], total: int,
           least: Sequence[int] = ()) -> list[tuple[int, int]]:
    """(column index, width) of the columns shown in ``total`` cells, one
    space between columns; flexible columns share what is left. ``least``:
    per column, the cells its content needs (what it must not lose); when
    that is more than there is, columns that spare nothing give way first."""
    shown = [i for i, c in enumerate(columns) if total >= c.hide_below]
    base = {i: max(columns[i].width, least[i] if i < len(least) else 0) for i in shown}
    gaps = max(len(shown) - 1, 0)
    spare = total - gaps - sum(base.values())
    # Over budget: take from the columns that keep nothing, widest first.
    for i in sorted((i for i in shown if not columns[i].keep), key=lambda i: -base[i]):
        if spare >= 0:
            break
        give = min(-spare, max(base[i] - 3, 0))
        base[i] -= give
        spare += give
    flex_total = sum(columns[i].flex for i in shown)
    widths = []
    given = 0
    flex_seen = 0
    for i in shown:
        c = columns[i]
        w = base[i]
        if c.flex and spare > 0:
            flex_seen += c.flex
            share = spare * flex_seen // flex_total - given
            given += share
            w += share
        widths.append((i, w))
    return widths


def _row_key(row: Row) -> Hashable:
    return row.key


class VirtualTable(ScrollView, can_focus=True):
    """Rows of text with a fixed header and a cursor that follows its row."""

    DEFAULT_CSS = """
    VirtualTable {
        height: 1fr;
        scrollbar-size-vertical: 1;
        overflow-x: hidden;
    }
    VirtualTable > .vtable--header { text-style: bold; color: $text-accent; }
    VirtualTable > .vtable--cursor { background: $block-cursor-background; color: $block-cursor-foreground; text-style: bold; }
    VirtualTable > .vtable--cursor-blurred { background: $block-cursor-blurred-background; }
    VirtualTable > .vtable--error { color: $text-error; }
    VirtualTable > .vtable--warn { color: $text-warning; }
    VirtualTable > .vtable--ok { color: $text-success; }
    VirtualTable > .vtable--dim { color: $text-muted; }
    VirtualTable > .vtable--empty { color: $text-muted; text-style: italic; }
    """
    COMPONENT_CLASSES = {"vtable--header", "vtable--cursor", "vtable--cursor-blurred",
                         "vtable--error", "vtable--warn", "vtable--ok", "vtable--dim",
                         "vtable--empty"}
    BINDINGS = [
        Binding("up", "cursor(-1)", "Up", show=False),
        Binding("down", "cursor(1)", "Down", show=False),
        Binding("k", "cursor(-1)", "Up", show=False),
        Binding("j", "cursor(1)", "Down", show=False),
        Binding("pageup", "page(-1)", "Page up", show=False),
        Binding("pagedown", "page(1)", "Page down", show=False),
        Binding("home", "first", "First", show=False),
        Binding("end", "last", "Last", show=False),
        Binding("enter", "select", "Select", show=False),
    ]

    cursor: reactive[int] = reactive(0, always_update=False, repaint=False)

    class Highlighted(Message):
        """The cursor moved to another row (or the row under it changed)."""

        def __init__(self, table: "VirtualTable", key: Hashable | None) -> None:
            super().__init__()
            self.table = table
            self.key = key

        @property
        def control(self) -> "VirtualTable":
            return self.table

    class Selected(Highlighted):
        """Enter on a row."""

    def __init__(self, columns: Sequence[Column], *, empty: str = "nothing yet",
                 follow: bool = False, show_cursor: bool = True, name: str | None = None, id: str | None = None,
                 classes: str | None = None) -> None:
        super().__init__(name=name, id=id, classes=classes)
        self.columns = list(columns)
        # The rows: any objects, made into Row only when drawn (``make``),
        # so that 10,000 sockets cost a list assignment, not 10,000 Rows.
        self._items: Sequence[Any] = []
        self._make: Callable[[Any], Row] | None = None
        self._keyf: Callable[[Any], Hashable] = _row_key
        self._made: dict[int, Row] = {}
        self.empty = empty
        self.follow = follow  # keep the cursor on the newest (last) row while it is there
        self.show_cursor = show_cursor
        self.can_focus = show_cursor
        self._vt_index: dict[Hashable, int] = {}
        self._vt_layout: list[tuple[int, int]] = []
        self._vt_layout_width = -1
        self._vt_last_key: Hashable | None = None
        # Per column, the most cells a row drawn so far needs to keep its
        # pid, port or whole value (see least_width). It only grows, so
        # columns do not jump as the rows on screen change.
        self._vt_least = [0] * len(self.columns)

    # -- data

    @property
    def row_count(self) -> int:
        return len(self._items)

    def row(self, index: int) -> Row:
        made = self._made.get(index)
        if made is None:
            item = self._items[index]
            made = self._made[index] = self._make(item) if self._make else item
            self._vt_measure(made)
        return made

    def _vt_measure(self, row: Row) -> None:
        grew = False
        for i, c in enumerate(self.columns):
            if c.keep and i < len(row.cells):
                need = least_width(printable(row.cells[i]), c.keep)
                if need > self._vt_least[i]:
                    self._vt_least[i] = need
                    grew = True
        if grew:  # lay the columns out again, and draw the frame again with it
            self._vt_layout_width = -1
            self.refresh()

    def all_rows(self) -> list[Row]:
        return [self.row(i) for i in range(len(self._items))]

    @property
    def cursor_key(self) -> Hashable | None:
        if 0 <= self.cursor < len(self._items):
            return self._keyf(self._items[self.cursor])
        return None

    def set_rows(self, items: Sequence[Any], make: Callable[[Any], Row] | None = None,
                 key: Callable[[Any], Hashable] | None = None) -> None:
        """Replace every row: ``items`` are Rows, or anything ``make`` turns
        into a Row when it is drawn (``key`` gives its key without making
        it). The cursor stays on its key when the key is still there, and on
        the last row when following."""
        old_key = self.cursor_key
        at_end = self.cursor >= len(self._items) - 1
        self._items = items
        self._make = make
        self._keyf = key or _row_key
        self._made = {}
        keyf = self._keyf
        self._vt_index = {keyf(it): i for i, it in enumerate(items)}
        if self.follow and at_end:
            target = len(items) - 1
        elif old_key is not None and old_key in self._vt_index:
            target = self._vt_index[old_key]
        else:
            target = min(self.cursor, len(items) - 1)
        self.virtual_size = Size(self.size.width, len(items) + 1)
        self._set_cursor(max(target, 0), scroll=self.follow and at_end)
        self.refresh()

    def move_to(self, key: Hashable) -> bool:
        index = self._vt_index.get(key)
        if index is None:
            return False
        self._set_cursor(index)
        return True

    # -- cursor

    def _set_cursor(self, index: int, scroll: bool = True) -> None:
        index = max(0, min(index, len(self._items) - 1)) if self._items else 0
        self.set_reactive(VirtualTable.cursor, index)
        if scroll or not self._vt_visible(index):
            self._vt_reveal(index)
        key = self.cursor_key
        if key != self._vt_last_key:
            self._vt_last_key = key
            self.post_message(self.Highlighted(self, key))

    def _vt_visible(self, index: int) -> bool:
        top = round(self.scroll_y)
        return top <= index < top + max(self.size.height - 1, 1)

    def _vt_reveal(self, index: int) -> None:
        body = max(self.size.height - 1, 1)
        top = round(self.scroll_y)
        if index < top:
            top = index
        elif index >= top + body:
            top = index - body + 1
        self.scroll_to(y=top, animate=False, immediate=True)

    def action_cursor(self, delta: int) -> None:
        self._set_cursor(self.cursor + delta)
        self.refresh()

    def action_page(self, direction: int) -> None:
        self._set_cursor(self.cursor + direction * max(self.size.height - 2, 1))
        self.refresh()

    def action_first(self) -> None:
        self._set_cursor(0)
        self.refresh()

    def action_last(self) -> None:
        self._set_cursor(len(self._items) - 1)
        self.refresh()

    def action_select(self) -> None:
        if self._items:
            self.post_message(self.Selected(self, self.cursor_key))

    async def _on_click(self, event: events.Click) -> None:
        offset = event.get_content_offset(self)
        if offset is None or offset.y < 1:
            return
        index = round(self.scroll_y) + offset.y - 1
        if 0 <= index < len(self._items):
            self._set_cursor(index, scroll=False)
            self.refresh()
            if event.chain == 2:
                self.post_message(self.Selected(self, self.cursor_key))

    def on_resize(self, event: events.Resize) -> None:
        self.virtual_size = Size(event.size.width, len(self._items) + 1)
        self._vt_layout_width = -1

    def on_focus(self) -> None:
        self.refresh()

    def on_blur(self) -> None:
        self.refresh()

    # -- rendering

    def _vt_columns(self, width: int) -> list[tuple[int, int]]:
        if width != self._vt_layout_width:
            self._vt_layout = layout(self.columns, width, self._vt_least)
            self._vt_layout_width = width
        return self._vt_layout

    def _vt_line(self, cells: Sequence[str], widths: list[tuple[int, int]]) -> str:
        # Every cell escaped here, for every table: names, paths and journal
        # contents are anybody's, and a raw ESC would reach the terminal.
        return " ".join(fit_cell(printable(cells[i]) if i < len(cells) else "", w,
                                 self.columns[i]) for i, w in widths)

    def render_line(self, y: int) -> Strip:
        width = self.scrollable_content_region.width
        widths = self._vt_columns(width)
        base = self.rich_style
        if y == 0:
            labels = [c.label for c in self.columns]
            text = self._vt_line(labels, widths)
            style = base + self.get_component_rich_style("vtable--header")
            return Strip([Segment(fit(text, width), style)], width)
        index = round(self.scroll_y) + y - 1
        if index >= len(self._items):
            if index == 0:
                style = base + self.get_component_rich_style("vtable--empty")
                return Strip([Segment(fit(self.empty, width), style)], width)
            return Strip.blank(width, base)
        row = self.row(index)
        style: Style = base
        if row.style:
            style = style + self.get_component_rich_style(f"vtable--{row.style}")
        if index == self.cursor and self.show_cursor:
            if self.has_focus:
                style = style + self.get_component_rich_style("vtable--cursor")
            else:  # only the background: the row keeps its colour
                blurred = self.get_component_rich_style("vtable--cursor-blurred")
                style = style + Style(bgcolor=blurred.bgcolor)
        return Strip([Segment(fit(self._vt_line(row.cells, widths), width), style)], width)
