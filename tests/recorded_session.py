"""What the terminal UI's tests share: the recorded session they run over
(tests/data/tui-session.jsonl, made by scripts/record-tui-fixture with the
live collector), the figures it holds, and how to read the screen back."""

from __future__ import annotations

import asyncio
import functools
import json
from pathlib import Path

from rich.console import Console
from textual.widgets import Static, TabbedContent

from tracer.recording import load_recording
from tracer.state import StateModel
from tui.table import VirtualTable

RECORDING = Path(__file__).resolve().parent / "data" / "tui-session.jsonl"
SIZE = (80, 24)


def load() -> StateModel:
    """A state model filled from the recording."""
    return load_recording(RECORDING)


def recorded(kind: str) -> list[dict]:
    """The recording's lines of one kind ("event", "ports", "timewait", ...):
    the figures the screens must show come from there, not from the test."""
    docs = [json.loads(line) for line in RECORDING.read_text().splitlines()]
    return [d for d in docs if d.get("record", "event") == kind]


def recorded_listeners() -> int:
    return sum(1 for s in recorded("ports")[-1]["sockets"] if s["state"] == "LISTEN")


def recorded_time_wait() -> int:
    return recorded("timewait")[-1]["total"]


def aio(test):
    """Run an async test (no pytest plugin needed)."""
    @functools.wraps(test)
    def run(*args, **kwargs):
        return asyncio.run(test(*args, **kwargs))
    return run


def text_of(app, selector: str) -> str:
    """What a Static shows, as plain text."""
    content = app.screen.query_one(selector, Static).content
    console = Console(width=200, record=True, file=open("/dev/null", "w"))
    console.print(content)
    return console.export_text()


def table(app, selector: str) -> VirtualTable:
    return app.query_one(selector, VirtualTable)


def column(t: VirtualTable, label: str) -> list[str]:
    i = [c.label for c in t.columns].index(label)
    return [r.cells[i] for r in t.all_rows()]


def active(app) -> str:
    return app.query_one(TabbedContent).active
