"""Colour end to end: `portscope why PORT` about a port a real listener
holds, run on a real terminal (a pseudo-terminal), into a pipe, with
NO_COLOR, TERM=dumb and --color always. What is proven here is what
portscope does with its output, not what the kernel does: native only
(scripts/kernel-matrix NATIVE_ONLY)."""

from __future__ import annotations

import errno
import os
import pty
import select
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.needs import SLOWDOWN, need_root
from tracer.colour import RESET, SGR

REPO = Path(__file__).resolve().parents[2]
RED = f"\x1b[{SGR['bad']}m"
TIMEOUT_S = 60 * SLOWDOWN


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port a listener of this process holds (127.0.0.1, chosen by the kernel)."""
    need_root()
    lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lst.bind(("127.0.0.1", 0))
    lst.listen()
    try:
        yield lst.getsockname()[1]
    finally:
        lst.close()


def environment(**changes: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR")}
    env["TERM"] = "xterm-256color"
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def on_a_terminal(*args: str, **env: str | None) -> tuple[int, bytes]:
    """portscope's exit status and what it wrote to a real terminal (its
    stdout is the slave end of a pty; stderr is a pipe, read apart)."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "tracer.cli", *args], cwd=REPO,
                                stdin=subprocess.DEVNULL, stdout=slave, stderr=subprocess.PIPE,
                                env=environment(**env))
    finally:
        os.close(slave)
    out = b""
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError as exc:  # EIO: every slave end is closed, the program is done
                if exc.errno != errno.EIO:
                    raise
                break
            if not chunk:
                break
            out += chunk
        else:
            proc.kill()
            pytest.fail(f"portscope {' '.join(args)} wrote {out!r} and did not finish in {TIMEOUT_S} s")
        status = proc.wait(timeout=TIMEOUT_S)
        assert proc.stderr is not None
        assert proc.stderr.read() == b""
    finally:
        os.close(master)
        if proc.stderr:
            proc.stderr.close()
    return status, out


def piped(*args: str, **env: str | None) -> tuple[int, bytes]:
    result = subprocess.run([sys.executable, "-m", "tracer.cli", *args], cwd=REPO,
                            capture_output=True, env=environment(**env), timeout=TIMEOUT_S)
    assert result.stderr == b""
    return result.returncode, result.stdout


CONFLICT = 5  # ExitStatus.CONFLICT: portscope why, the bind would fail


def test_why_on_a_terminal_colours_the_verdict_and_errno(held_port: int) -> None:
    status, out = on_a_terminal("why", str(held_port))
    text = out.decode()
    assert status == CONFLICT, text
    assert f"{RED}would FAIL with{RESET} {RED}EADDRINUSE{RESET}" in text
    assert f"{RED}blocked by{RESET} LISTEN 127.0.0.1:{held_port}" in text
    assert f"\x1b[{SGR['fix']}m" in text  # the fixes
    # The same answer as in a pipe, but for the colour (and the terminal's CR LF).
    _, plain = piped("why", str(held_port))
    for code in {RESET, *(f"\x1b[{c}m" for c in SGR.values())}:
        text = text.replace(code, "")
    assert text.replace("\r\n", "\n") == plain.decode()


def test_why_into_a_pipe_has_no_escape_byte(held_port: int) -> None:
    status, out = piped("why", str(held_port))
    assert status == CONFLICT
    assert b"would FAIL with EADDRINUSE" in out and b"\x1b" not in out


@pytest.mark.parametrize("env", [{"NO_COLOR": "1"}, {"TERM": "dumb"}])
def test_no_color_and_a_dumb_terminal_have_no_escape_byte(held_port: int, env: dict) -> None:
    status, out = on_a_terminal("why", str(held_port), **env)
    assert status == CONFLICT
    assert b"would FAIL with EADDRINUSE" in out and b"\x1b" not in out


def test_never_on_a_terminal_and_always_into_a_pipe(held_port: int) -> None:
    _, out = on_a_terminal("--color", "never", "why", str(held_port))
    assert b"would FAIL with EADDRINUSE" in out and b"\x1b" not in out
    _, out = piped("--color", "always", "why", str(held_port))
    assert f"{RED}would FAIL with{RESET} {RED}EADDRINUSE{RESET}".encode() in out
    _, out = on_a_terminal("why", str(held_port), NO_COLOR="")  # empty: as if unset
    assert f"{RED}EADDRINUSE{RESET}".encode() in out


def test_json_is_never_coloured_even_when_asked(held_port: int) -> None:
    status, out = on_a_terminal("--color", "always", "why", "--json", str(held_port))
    assert status == CONFLICT and b"\x1b" not in out and b'"EADDRINUSE"' in out
