"""The help screen (``?``): every key of the screen it was opened on, read
from the bindings themselves (so it cannot drift from what the keys do),
and a few lines on what that screen shows."""

from __future__ import annotations

from typing import Iterable

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

KeyHelp = tuple[str, str]  # (the key as shown, what it does)


def merged(keys: Iterable[KeyHelp]) -> list[KeyHelp]:
    """Keys that do the same thing on one line (``↑ k  Up``), in order."""
    by_what: dict[str, list[str]] = {}
    for key, what in keys:
        if key not in by_what.setdefault(what, []):
            by_what[what].append(key)
    return [(" ".join(ks), what) for what, ks in by_what.items()]


Section = tuple[str, Iterable[KeyHelp], bool]  # (title, keys, all on one line)


def key_lines(sections: Iterable[Section]) -> Text:
    """The keys, section by section, one per line, keys aligned; a compact
    section (the same everywhere: moving in a list) on one wrapped line, so
    that the screen's own keys fit in 80x24 with the rest."""
    out = Text()
    for title, keys, compact in sections:
        lines = merged(keys)
        if not lines:
            continue
        out.append(f"{title}\n", "bold")
        if compact:
            out.append("  ")
            for i, (key, what) in enumerate(lines):
                out.append(" · " if i else "")
                out.append(key, "bold cyan")
                out.append(f" {what.lower()}")
            out.append("\n")
            continue
        width = max(len(k) for k, _ in lines)
        for key, what in lines:
            out.append(f"  {key.ljust(width)}  ", "bold cyan")
            out.append(what + "\n")
    return out


def help_text(screen_title: str, about: str, sections: Iterable[Section]) -> Text:
    """The keys first (what ``?`` is pressed for), then what the screen shows."""
    out = Text()
    out.append(screen_title + "\n", "bold")
    out.append_text(key_lines(sections))
    out.append("\nThis screen\n", "bold")
    out.append(" ".join(about.split()) + "\n")  # reflowed to the window
    out.append("\n? or escape closes this help; ↑ ↓ scroll it.", "dim")
    return out


class HelpScreen(ModalScreen[None]):
    """Over the app, until ``?``, escape or q."""

    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll {
        width: 100%; max-width: 96; height: 100%; max-height: 40;
        border: round $primary; background: $surface; padding: 0 1;
    }
    """
    BINDINGS = [
        Binding("escape,question_mark,q", "dismiss", "Close", key_display="?"),
        Binding("down,j", "scroll(1)", "Down", show=False),
        Binding("up,k", "scroll(-1)", "Up", show=False),
    ]

    def __init__(self, text: Text) -> None:
        super().__init__(id="help")
        self.text = text

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-body"):
            yield Static(self.text, id="help-text")

    def action_scroll(self, lines: int) -> None:
        self.query_one("#help-body", VerticalScroll).scroll_relative(y=lines, animate=False)
