"""Text that others wrote, made safe to show: the one function every human
surface (line output, the terminal UI, reports, error sentences) passes it
through.

Process names, executable paths, command lines, cgroup paths, namespace
names and journal contents are written by whoever is on the host, an
attacker included. ``prctl(PR_SET_NAME)`` accepts any byte but NUL, so a
process can be called ``"\\x1b]2;PWND\\x07"`` (sets the terminal's title),
``"\\x1b[2J"`` (clears the screen) or ``"x\\n12:00:00 bind ok ..."`` (forges
a whole output line). Such bytes must never reach a terminal raw.

:func:`printable` keeps exactly the characters Unicode calls printable and
shows every other one escaped, the way Python writes it in a string
literal: control characters (C0, DEL, C1) and escape sequences, newlines,
bidirectional overrides (U+202A-U+202E, U+2066-U+2069) and every other
format character, unusual spaces, and bytes that were not valid UTF-8
(decoded with ``surrogateescape``: shown as ``\\xNN``). A backslash is
doubled, so that an escape in the output always means the byte was there.

Machine formats keep the exact value instead, escaped as they require:
``--json`` and the journal through ``json`` (``\\u001b``, ``\\udcff``),
metrics through Prometheus' own label escaping (tracer/series.py).
"""

from __future__ import annotations

import time

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def printable(value: object) -> str:
    """``value`` as text that holds only printable characters.

    Bytes are decoded as UTF-8 first (invalid bytes shown as ``\\xNN``);
    anything else is formatted with ``str()``. Idempotent on text that is
    printable and holds no backslash, which is almost all text: that case
    costs one ``str.isprintable`` call."""
    if isinstance(value, bytes):
        text = value.decode("utf-8", "surrogateescape")
    else:
        text = value if isinstance(value, str) else str(value)
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(_escape(ch) for ch in text)


def _escape(ch: str) -> str:
    if ch.isprintable() and ch != "\\":
        return ch
    named = _NAMED.get(ch)
    if named:
        return named
    code = ord(ch)
    if code < 0x80:
        return f"\\x{code:02x}"
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def system_text(raw: bytes) -> str:
    """Bytes from the kernel or a file (a process name, a cgroup path) as
    text that keeps every byte: invalid UTF-8 is kept with
    ``surrogateescape``, so that JSON and the journal can record it exactly
    and :func:`printable` can show it as ``\\xNN``."""
    return raw.decode("utf-8", "surrogateescape")


def clock_text(t: float, date: bool = True, digits: int = 3) -> str:
    """A wall-clock time, local, as ``2026-11-21 06:00:05.123`` (or without
    the date); a value no calendar holds (a damaged journal's) is shown as
    the number it is instead of failing."""
    try:
        whole = time.localtime(t)
        fraction = f"{int(t % 1 * 10 ** digits):0{digits}d}" if digits else ""
    except (OverflowError, ValueError, OSError):
        return f"{t:.{digits}f}s"
    head = time.strftime("%Y-%m-%d %H:%M:%S" if date else "%H:%M:%S", whole)
    return head + (f".{fraction}" if digits else "")


def sql_text(value: str | None) -> str | bytes | None:
    """A text value as SQLite can store it exactly. Text read from the host
    keeps bytes that are not UTF-8 as surrogates (tracer.text.system_text),
    which SQLite's UTF-8 TEXT cannot hold: such a value is stored as a BLOB
    of its exact bytes, and the reader turns it back into the same text."""
    if value is None:
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogateescape")
    return value
