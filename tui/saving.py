"""Saving what a screen shows as JSON: the key ``s`` writes the current
screen's data, in the form the matching command's ``--json`` prints, to a
new file whose name the UI then shows.

The file is created, never overwritten (O_EXCL, mode 0600): the directory
may be a shared one such as /tmp, where another user could have planted a
link under the name we chose."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Sequence

MAX_TRIES = 100  # names tried in one directory (same screen, same second)


class SaveError(Exception):
    """No directory would take the file; the message is one sentence."""


def file_name(screen: str, when: float, n: int, lines: bool) -> str:
    """``portscope-conflicts-20261207-101500.jsonl`` (``-2``... when taken)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(when))
    suffix = "" if n == 0 else f"-{n + 1}"
    return f"portscope-{screen}-{stamp}{suffix}.{'jsonl' if lines else 'json'}"


def encode(data: object, lines: bool) -> bytes:
    """One JSON document, or one per line (``trace --json``'s form)."""
    if lines:
        assert isinstance(data, (list, tuple))
        return "".join(json.dumps(d, sort_keys=True) + "\n" for d in data).encode()
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def default_directories() -> list[Path]:
    """Where to save: the directory portscope was started in, else the
    temporary directory (a read-only or foreign working directory)."""
    return [Path.cwd(), Path(tempfile.gettempdir())]


def save(screen: str, data: object, lines: bool, directories: Sequence[Path] | None = None,
         when: float | None = None) -> Path:
    """Write ``data`` to a new file; its path. SaveError when no directory
    takes it (each directory's reason in the sentence)."""
    body = encode(data, lines)
    when = time.time() if when is None else when
    reasons: list[str] = []
    for directory in directories or default_directories():
        try:
            return _create(directory, screen, when, lines, body)
        except OSError as exc:
            reasons.append(f"{directory}: {exc.strerror or exc}")
    raise SaveError("could not save the screen: " + "; ".join(reasons))


def _create(directory: Path, screen: str, when: float, lines: bool, body: bytes) -> Path:
    for n in range(MAX_TRIES):
        path = directory / file_name(screen, when, n, lines)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            continue
        with os.fdopen(fd, "wb") as f:
            f.write(body)
        return path.resolve()
    raise FileExistsError(17, f"{MAX_TRIES} files of this second already exist")
