"""A real terminal for the UI tests: tmux, at a given size, read back with
capture-pane (what is on screen), and the pane's own state (its title, the
alternate screen, mouse reporting), which is what a program's escape
sequences change."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Callable

import pytest

from tests.needs import SLOWDOWN, need_tool

ROOT = Path(__file__).resolve().parents[2]

DEADLINE_S = 2.0 * SLOWDOWN  # from the kernel event to the screen: the promise
START_S = 60.0 * SLOWDOWN  # the app itself: probes loaded, first inventory read


class Terminal:
    """A tmux session running one command at 80x24 (or the size given).

    Each terminal has its own tmux server (its own socket, no user config):
    with one shared server, a new session started while the previous test's
    last session was closing met a server on its way out ("server exited
    unexpectedly")."""

    def __init__(self, command: str, width: int = 80, height: int = 24) -> None:
        self.name = f"portscope-e2e-{os.getpid()}-{time.monotonic_ns()}"
        self.tmux = need_tool("tmux")
        self._server = [self.tmux, "-L", self.name, "-f", "/dev/null"]
        subprocess.run([*self._server, "new-session", "-d", "-s", self.name, "-x", str(width),
                        "-y", str(height), command], check=True, cwd=ROOT)

    def screen(self) -> str:
        out = subprocess.run([*self._server, "capture-pane", "-p", "-t", self.name],
                             capture_output=True, text=True)
        return out.stdout

    def keys(self, *keys: str) -> None:
        subprocess.run([*self._server, "send-keys", "-t", self.name, *keys], check=True)

    def wait_for(self, ready: Callable[[str], bool], timeout: float) -> tuple[float, str]:
        """Seconds until ``ready(screen)``; fails with the last screen."""
        start = time.monotonic()
        while True:
            screen = self.screen()
            if ready(screen):
                return time.monotonic() - start, screen
            if time.monotonic() - start > timeout:
                pytest.fail(f"not on screen within {timeout} s; the screen was:\n{screen}")
            time.sleep(0.05)

    def close(self) -> None:
        """Ask portscope to quit (q), give it 10 s to leave, then end the session.

        The commands end in a shell's ``sleep``, so the session outlives the
        program: waiting for the session itself would always take 10 s."""
        subprocess.run([*self._server, "send-keys", "-t", self.name, "q"], capture_output=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.alive() and \
                self.state("pane_current_command").startswith("python"):
            time.sleep(0.1)
        subprocess.run([*self._server, "kill-session", "-t", self.name], capture_output=True)

    def hang_up(self) -> None:
        """End the session at once, as a dropped ssh connection does: the
        terminal goes away under whatever runs in it."""
        subprocess.run([*self._server, "kill-session", "-t", self.name], capture_output=True)

    def state(self, what: str) -> str:
        """A pane variable: pane_title, alternate_on, mouse_any_flag, pane_pid, ..."""
        out = subprocess.run([*self._server, "display-message", "-p", "-t", self.name,
                              f"#{{{what}}}"], capture_output=True, text=True)
        return out.stdout.strip()

    def alive(self) -> bool:
        return subprocess.run([*self._server, "has-session", "-t", self.name],
                              capture_output=True).returncode == 0
