"""What every screen (tab) has in common: it renders a snapshot of the state
model, and only when the parts it shows changed."""

from __future__ import annotations

from textual.widget import Widget
from textual.widgets import TabPane

from tracer.state import Snapshot


class Pane(TabPane):
    """A screen. Subclasses name the snapshot parts they read in ``PARTS``
    and draw them in :meth:`render_snapshot`."""

    PARTS: tuple[str, ...] = ()
    # What the screen shows, for its help (``?``); its keys come from BINDINGS.
    ABOUT = ""
    # The name of its saved JSON file (``s``), and whether it is JSON lines.
    SAVE_NAME = ""
    SAVE_LINES = False

    def __init__(self, title: str, id: str) -> None:
        super().__init__(title, id=id)
        self.number, _, self.name_shown = title.partition(" ")  # "2", "Conflicts"
        self._seen: tuple[int, ...] | None = None
        self.snapshot: Snapshot | None = None

    def show(self, snap: Snapshot, force: bool = False) -> bool:
        """Draw ``snap`` if a part this screen shows changed; True if drawn."""
        seen = tuple(getattr(snap.versions, p) for p in self.PARTS)
        if seen == self._seen and not force:
            return False
        self._seen = seen
        self.snapshot = snap
        self.render_snapshot(snap)
        return True

    def render_snapshot(self, snap: Snapshot) -> None:
        raise NotImplementedError

    def screen_json(self) -> object:
        """What ``s`` saves: the rows shown (after any filter), in the form
        the matching command's --json prints them."""
        raise NotImplementedError

    def main_widget(self) -> Widget | None:
        """What gets the focus when the screen is shown."""
        return None
