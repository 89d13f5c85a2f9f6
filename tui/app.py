"""portscope's terminal UI: five screens over the collector's state model.

The app reads one thing, an object with a ``snapshot()`` method returning a
:class:`tracer.state.Snapshot` (the :class:`~tracer.state.StateModel` the
collector fills, or one filled from a recording). A timer pulls the newest
snapshot a few times a second and redraws the shown screen only if a part
it shows has a new version: however fast the kernel produces events, the UI
handles at most one state per tick and never queues any (that is the
coalescing). The app never talks to the kernel.

Build it with :func:`make_app`; ``portscope`` (no arguments, on a terminal)
and ``portscope ui`` run it over the live collector.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Protocol

from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.css.query import NoMatches
from textual.widgets import Footer, Input, Static, TabbedContent, TabPane

from tracer.state import Snapshot
from tracer.text import clock_text, printable

from .base import Pane
from .conflicts import ConflictsPane
from .groups import GroupsPane
from .help import HelpScreen, KeyHelp, help_text
from .overview import OverviewPane
from .ports import PortsPane
from .render import count, rate
from .saving import SaveError, save
from .table import VirtualTable
from .timewait import TimewaitPane

REFRESH_HZ = 4.0
SCREENS = ("overview", "conflicts", "ports", "groups", "timewait")
TALL = 40  # rows from which lists get more room


class StateSource(Protocol):
    def snapshot(self) -> Snapshot: ...


class ReplayControl(Protocol):
    """A state source the user moves through in time (``portscope replay``:
    :class:`tracer.replay.JournalReplay`)."""

    def position(self) -> Any: ...  # time, index, total, start, end, playing, speed
    def step(self, n: int) -> None: ...
    def seek(self, seconds: float) -> None: ...
    def home(self) -> None: ...
    def end_(self) -> None: ...
    def toggle(self) -> None: ...
    def faster(self) -> None: ...
    def slower(self) -> None: ...


def replay_status_text(snap: Snapshot, pos: Any) -> Text:
    """The status line of a replay: where it stands in the recording."""
    out = Text()
    out.append("portscope", "bold")
    out.append(" │ ")
    out.append("▶ " if pos.playing else "⏸ ", "bold green" if pos.playing else "bold yellow")
    out.append(clock_text(pos.time), "bold")
    out.append(f" │ event {count(pos.index)}/{count(pos.total)}")
    out.append(f" │ {pos.speed:g}x")
    if snap.health.lost:
        out.append(" │ ")
        out.append(f"{count(snap.health.lost)} lost", "bold red")
    out.append(f" │ {count(snap.conflicts_total)} conflicts")
    return out


def status_text(snap: Snapshot, paused: bool, position: Any = None) -> Text:
    if position is not None:
        return replay_status_text(snap, position)
    h = snap.health
    out = Text()
    out.append("portscope", "bold")
    out.append(f" │ {printable(h.source)} · {printable(h.plan or '?')}")
    out.append(f" │ {rate(h.events_per_s)}")
    out.append(" │ ")
    out.append(f"{count(h.lost)} lost", "bold red" if h.lost else "")
    out.append(f" │ {count(snap.conflicts_total)} conflicts")
    if h.errors:
        out.append(f" │ {len(h.errors)} error(s)", "bold red")
    if paused:
        out.append(" │ PAUSED (p)", "bold reverse yellow")
    return out


class Screens(TabbedContent):
    """The five screens as tabs. The screen decides the focus, never the
    reverse: Textual's TabbedContent shows the pane that receives the focus,
    and the focus given to a screen arrives as a message after the next key
    has been read, so two keys pressed within a frame ('2' then '4') would
    end on the screen that was left, not on the last one pressed."""

    def on_tab_pane_focused(self, event: TabPane.Focused) -> None:
        event.prevent_default()  # TabbedContent's own handler would switch screens
        event.stop()


class PortscopeApp(App[None]):
    CSS_PATH = Path(__file__).with_name("portscope.tcss")
    TITLE = "portscope"
    ENABLE_COMMAND_PALETTE = False
    _SCREENS = Binding.Group("Screens", compact=True)
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        # The tab bar names the screens with their keys: not again in the
        # footer, which keeps its room for the keys of the screen shown.
        Binding("1", "show('overview')", "Overview", group=_SCREENS, show=False),
        Binding("2", "show('conflicts')", "Conflicts", group=_SCREENS, show=False),
        Binding("3", "show('ports')", "Ports", group=_SCREENS, show=False),
        Binding("4", "show('groups')", "Groups", group=_SCREENS, show=False),
        Binding("5", "show('timewait')", "TIME_WAIT", group=_SCREENS, show=False),
        Binding("p", "pause", "Pause",
                tooltip="Pause: the screens stay as they are, the collector goes on"),
        Binding("s", "save", "Save",
                tooltip="Save what this screen shows as JSON (its command's --json) to a "
                        "new file, in the directory portscope runs in (else the temporary "
                        "directory); the file's name is shown"),
        # First in the footer, whatever else is there (a replay's keys): it
        # is how every other key is found. A priority key, so it is off while
        # a filter is typed (check_action), where "?" is text.
        Binding("question_mark", "help", "Help", key_display="?", tooltip="Help: this screen",
                priority=True),
    ]
    # Replay only (hidden and passed on otherwise, and while typing in a filter).
    _SEEK = Binding.Group("±1m", compact=True)
    _STEP = Binding.Group("Step", compact=True)
    _SPEED = Binding.Group("Speed", compact=True)
    _JUMP = Binding.Group("Ends", compact=True)
    BINDINGS += [
        Binding("space", "replay_toggle", "Play", key_display="space", priority=True),
        Binding("left", "replay_step(-1)", "Step", key_display="←", group=_STEP, priority=True),
        Binding("right", "replay_step(1)", "Step", key_display="→", group=_STEP, priority=True),
        Binding("shift+left,left_square_bracket", "replay_seek(-60)", "-1m", key_display="[",
                group=_SEEK, priority=True),
        Binding("shift+right,right_square_bracket", "replay_seek(60)", "+1m", key_display="]",
                group=_SEEK, priority=True),
        Binding("home", "replay_home", "Start", key_display="home", group=_JUMP, priority=True),
        Binding("end", "replay_end", "End", key_display="/end", group=_JUMP, priority=True),
        Binding("minus", "replay_speed(-1)", "Slower", key_display="-", group=_SPEED,
                priority=True),
        Binding("plus,equals_sign", "replay_speed(1)", "Faster", key_display="+", group=_SPEED,
                priority=True),
    ]

    def __init__(self, source: StateSource, *, refresh_hz: float = REFRESH_HZ,
                 initial: str = "overview", should_stop: Callable[[], bool] | None = None) -> None:
        super().__init__()
        self.source = source
        # Asked at every tick: a stop signal (SIGTERM, SIGHUP) ends the app
        # the way q does, so that the terminal is given back as it was.
        self.should_stop = should_stop
        self.refresh_hz = refresh_hz
        self.initial = initial
        self.paused = False
        self.snap: Snapshot | None = None
        self.frames = 0  # snapshots drawn (for tests and the benchmark)
        self.skipped = 0  # versions never drawn because a newer one came first
        self._notified: set[tuple[str, str]] = set()
        replay = all(hasattr(source, a) for a in ("position", "step", "seek", "toggle"))
        self.replay: ReplayControl | None = source if replay else None  # type: ignore[assignment]
        self._position: Any = None
        self.saved: Path | None = None  # the last file the screen was saved to (s)

    def compose(self) -> ComposeResult:
        yield Static(id="status")
        with Screens(initial=self.initial, id="tabs"):
            yield OverviewPane()
            yield ConflictsPane()
            yield PortsPane()
            yield GroupsPane()
            yield TimewaitPane()
        yield Footer()

    def on_mount(self) -> None:
        self.set_interval(1 / self.refresh_hz, self.pull)
        self.pull()
        self._focus_active()

    def on_resize(self) -> None:
        self.set_class(self.size.height >= TALL, "-tall")

    # -- pulling the state

    def pull(self, force: bool = False) -> None:
        """Draw the newest snapshot if it is new (or ``force``)."""
        if self.should_stop is not None and self.should_stop():
            self.exit()
            return
        if self.focused is None and self.screen is self.screen_stack[0]:
            # A screen switched to within a frame can be focused while still
            # hidden, which Textual ignores: the keys would then reach no list.
            self._focus_active()
        if self.paused and not force:
            return
        snap = self.source.snapshot()
        position = self.replay.position() if self.replay is not None else None
        moved = position != self._position
        self._position = position
        if self.snap is not None and snap.version == self.snap.version and not force:
            if moved:  # a replay's time goes on between changes
                self.query_one("#status", Static).update(status_text(snap, self.paused, position))
            return
        if self.snap is not None and snap.version > self.snap.version + 1:
            self.skipped += snap.version - self.snap.version - 1
        self.snap = snap
        self.frames += 1
        self.query_one("#status", Static).update(status_text(snap, self.paused, position))
        pane = self.active_pane
        if pane is not None:
            pane.show(snap, force=force)
        self._notify_errors(snap)

    def _notify_errors(self, snap: Snapshot) -> None:
        for kind, sentence in snap.health.errors:
            if (kind, sentence) not in self._notified:
                self._notified.add((kind, sentence))
                self.notify(printable(sentence), title=printable(kind), severity="error",
                            timeout=10, markup=False)

    @property
    def active_pane(self) -> Pane | None:
        tabs = self.query_one("#tabs", TabbedContent)
        if not tabs.active:
            return None
        pane = tabs.get_pane(tabs.active)
        return pane if isinstance(pane, Pane) else None

    # -- screens

    def action_show(self, screen: str) -> None:
        self.query_one("#tabs", TabbedContent).active = screen

    def on_tabbed_content_tab_activated(self, event: TabbedContent.TabActivated) -> None:
        pane = self.active_pane
        if pane is not None and self.snap is not None:
            pane.show(self.snap)
        self.call_after_refresh(self._focus_active)

    def _focus_active(self) -> None:
        try:
            pane = self.active_pane
            widget = pane.main_widget() if pane else None
        except NoMatches:  # being composed or torn down: nothing to focus yet
            return
        if widget is not None:
            widget.focus()

    def on_overview_pane_open(self, event: OverviewPane.Open) -> None:
        self.action_show("conflicts")
        conflicts = self.query_one(ConflictsPane)
        if self.snap is not None:
            conflicts.show(self.snap)
        conflicts.select(event.seq)

    # -- replay

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "help":
            return not isinstance(self.focused, Input)
        if action.startswith("replay_"):
            # Disabled, the key goes on to the focused widget (a filter being typed).
            return self.replay is not None and not isinstance(self.focused, Input)
        if action == "pause":
            return self.replay is None  # a replay pauses with space
        return True

    def _replayed(self) -> None:
        self.pull()
        if self.snap is not None:  # the status line, even when nothing else changed
            self.query_one("#status", Static).update(
                status_text(self.snap, self.paused, self._position))

    def action_replay_toggle(self) -> None:
        assert self.replay is not None
        self.replay.toggle()
        self._replayed()

    def action_replay_step(self, n: int) -> None:
        assert self.replay is not None
        self.replay.step(n)
        self._replayed()

    def action_replay_seek(self, seconds: float) -> None:
        assert self.replay is not None
        self.replay.seek(seconds)
        self._replayed()

    def action_replay_home(self) -> None:
        assert self.replay is not None
        self.replay.home()
        self._replayed()

    def action_replay_end(self) -> None:
        assert self.replay is not None
        self.replay.end_()
        self._replayed()

    def action_replay_speed(self, direction: int) -> None:
        assert self.replay is not None
        (self.replay.faster if direction > 0 else self.replay.slower)()
        self._replayed()

    # -- help and saving

    def _keys(self, bindings: list) -> list[KeyHelp]:  # type: ignore[type-arg]
        # The tooltip is the longer description; the footer shows the short one.
        return [(self.get_key_display(b), b.tooltip or b.description) for b in bindings
                if isinstance(b, Binding) and b.description
                and self.check_action(b.action.split("(")[0], ()) is not False]

    def action_help(self) -> None:
        pane = self.active_pane
        if pane is None or isinstance(self.screen, HelpScreen):
            return
        sections = [(f"Keys of {pane.name_shown}", self._keys(pane.BINDINGS), False)]
        if isinstance(pane.main_widget(), VirtualTable):
            sections.append(("Moving in the list", self._keys(VirtualTable.BINDINGS), True))
        sections.append(("Everywhere", self._keys(self.BINDINGS), False))
        title = f"portscope: {pane.name_shown} (screen {pane.number})"
        self.push_screen(HelpScreen(help_text(title, pane.ABOUT, sections)))

    def action_save(self) -> None:
        pane = self.active_pane
        if pane is None or self.snap is None:
            return
        try:
            path = save(pane.SAVE_NAME or pane.id or "screen", pane.screen_json(),
                        pane.SAVE_LINES)
        except SaveError as exc:
            self.notify(printable(str(exc)), severity="error", timeout=10, markup=False)
            return
        self.saved = path
        self.notify(f"saved to {printable(str(path))}", title="Save JSON", timeout=8,
                    markup=False)

    def action_pause(self) -> None:
        self.paused = not self.paused
        if self.snap is not None:
            self.query_one("#status", Static).update(status_text(self.snap, self.paused))
        if not self.paused:
            self.pull()
        self.notify("paused: the screens stay as they are; the collector goes on"
                    if self.paused else "live again", timeout=3)


def make_app(state_source: StateSource, **options: object) -> PortscopeApp:
    """The app over ``state_source`` (anything with ``snapshot()``)."""
    return PortscopeApp(state_source, **options)  # type: ignore[arg-type]

