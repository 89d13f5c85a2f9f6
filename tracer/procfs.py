"""A process's command line and executable read straight from /proc, for
the commands that must start with nothing beyond the standard library
(`trace`); tracer/owners.py reads the same through psutil for the rest."""

from __future__ import annotations

import os


def command_of(pid: int, proc: str = "/proc") -> tuple[str | None, str | None]:
    """(command line, executable) of ``pid``; None each when it is gone,
    a kernel thread, or not readable. Bytes that are not UTF-8 are kept as
    surrogates: the caller escapes before printing."""
    try:
        with open(f"{proc}/{pid}/cmdline", "rb") as f:
            raw = f.read(65536)
    except OSError:
        raw = b""
    args = [a.decode(errors="surrogateescape") for a in raw.split(b"\0") if a]
    try:
        exe: str | None = os.readlink(f"{proc}/{pid}/exe")
    except OSError:
        exe = None
    return (" ".join(args) or None), exe
