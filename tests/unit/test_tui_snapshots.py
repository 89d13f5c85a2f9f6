"""What each screen shows, pinned (pytest-textual-snapshot), at the 80x24 an
on-call engineer often has over ssh and at a large size, over the recorded
session in tests/data/tui-session.jsonl (long names, a wide-character name,
a long unit, thousands of sockets). That every pid, errno and port on them
is whole is asserted on its own, in test_tui_operator.py.

After a deliberate change of the screens: look at them, then
``pytest tests/unit/test_tui_snapshots.py --snapshot-update``.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tracer.recording import load_recording
from tui.app import make_app

RECORDING = Path(__file__).resolve().parent.parent / "data" / "tui-session.jsonl"

# (screen key, keys pressed on it to show its selection or detail)
SCREENS = {
    "overview": ("1", ()),
    "conflicts": ("2", ("home",)),  # the first conflict: a listener blocks it
    "conflicts-filtered": ("2", ("slash", *":6000", "enter")),  # two, TIME_WAIT blocks them
    "conflicts-help": ("2", ("question_mark",)),
    "ports": ("3", ()),
    "ports-filtered": ("3", ("slash", *":9443")),
    "groups": ("4", ("down",)),  # the 3-member group with its bars
    "timewait": ("5", ()),
}
SIZES = {"80x24": (80, 24), "160x48": (160, 48)}


@pytest.fixture
def utc(monkeypatch):
    """Times on screen in UTC, whatever the machine's zone."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("screen", SCREENS)
def test_screen(snap_compare, utc, screen, size):
    key, keys = SCREENS[screen]
    app = make_app(load_recording(RECORDING))

    async def settle(pilot):
        await pilot.pause()

    assert snap_compare(app, press=[key, *keys], terminal_size=SIZES[size], run_before=settle)
