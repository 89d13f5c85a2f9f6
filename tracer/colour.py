"""Colour on a terminal: whether to colour a command's text output, and the
ANSI SGR codes that do it (errnos, verdicts, fixes, headers).

Whether (:func:`wanted`), in this order:

- ``--color always`` colours, even into a pipe (``portscope --color always
  why 80 | less -R``); ``--color never`` does not;
- ``--color auto`` (the default): not when ``NO_COLOR`` is set to anything
  but the empty string (https://no-color.org); always when ``FORCE_COLOR``
  is (https://force-color.org); otherwise only when the output is a terminal
  whose ``TERM`` is not ``dumb``.

``--json`` and ``-o FILE`` are never coloured: the commands give those a
:data:`PLAIN` palette whatever the choice.

Safety: the text a palette colours is escaped first (tracer.text.printable)
and wrapped after, so a name that holds ``\\x1b[0m`` shows as the
characters ``\\x1b[0m`` inside our colour and can neither close it nor open
another: the only escape sequences in the output are the :data:`SGR` codes
below and :data:`RESET`. Text already escaped is marked :class:`Shown`
(every painted piece is); a piece that is not is escaped when it joins a
line (:func:`line`, :func:`shown`).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TextIO

from .text import printable

CHOICES = ("auto", "always", "never")
NO_COLOR = "NO_COLOR"
FORCE_COLOR = "FORCE_COLOR"
TERM = "TERM"

RESET = "\x1b[0m"
# What each role looks like: the SGR parameters (bold 1, red 31, green 32, yellow 33).
SGR = {
    "bad": "1;31",  # a failure: a refused call, a conflict, a stopped member
    "warn": "33",  # worth a look, not a failure by itself: EADDRNOTAVAIL, an uneven split
    "good": "32",  # free, ok, even, a plan that attaches
    "fix": "32",  # what would work
    "head": "1",  # a header or a title
}

# Errnos shown yellow: the call could not be made as asked, though nothing
# holds the port (an address not, or not yet, here), or it is still under
# way. Any other errno is a failure (red); "ok" is green.
WARNING_ERRNOS = frozenset({"EADDRNOTAVAIL", "EINPROGRESS", "EALREADY", "EAGAIN", "EINTR"})

# Verdicts and statuses of why, groups and doctor, to their role.
VERDICTS = {
    "free": "good", "conflict": "bad", "refused": "bad",  # why
    "even": "good", "uneven": "warn", "insufficient": None, "single": None, "idle": None,
    "ok": "good", "stopped": "bad", "dropping": "bad", "not_accepting": "warn",  # members
}


class Shown(str):
    """Text as it is shown: escaped, perhaps coloured. Printed as it is."""


def shown(part: str) -> Shown:
    """``part`` escaped, unless it is already :class:`Shown`."""
    return part if isinstance(part, Shown) else Shown(printable(part))


def escaped(text: str) -> Shown:
    """Text another function escaped already (a name through printable(), a
    namespace label) marked as such. It is checked, not trusted: escaped text
    holds only printable characters, and text that holds any other (an
    escape, a newline) is escaped here."""
    return Shown(text if text.isprintable() else printable(text))


def line(*parts: str) -> Shown:
    """One line of output from pieces: the :class:`Shown` ones kept, the
    others escaped."""
    return Shown("".join(shown(p) for p in parts))


def wanted(choice: str = "auto", stream: TextIO | None = None) -> bool:
    """Whether to colour what is written to ``stream`` (stdout by default)."""
    if choice == "always":
        return True
    if choice == "never":
        return False
    if os.environ.get(NO_COLOR):
        return False
    if os.environ.get(FORCE_COLOR):
        return True
    if os.environ.get(TERM) == "dumb":
        return False
    out = sys.stdout if stream is None else stream
    try:
        return bool(out.isatty())
    except (AttributeError, ValueError, OSError):  # closed, or no file behind it
        return False


class Palette:
    """Colours text for one output, or leaves it plain (``on`` false). Each
    method takes raw text (or :class:`Shown` text) and returns it escaped,
    coloured when on."""

    def __init__(self, on: bool) -> None:
        self.on = on

    def paint(self, text: str, role: str | None) -> Shown:
        safe = shown(text)
        if not self.on or not role or not safe:
            return safe
        return Shown(f"\x1b[{SGR[role]}m{safe}{RESET}")

    def errno(self, name: str | None, width: int = 0) -> Shown:
        """An errno name (``EADDRINUSE``) or ``ok``; padded to ``width``
        columns after the colour, so that a table's columns stay aligned."""
        name = name or "ok"
        role = "good" if name == "ok" else "warn" if name in WARNING_ERRNOS else "bad"
        painted = self.paint(name, role)
        return Shown(painted + " " * max(0, width - len(shown(name))))

    def verdict(self, verdict: str, text: str | None = None) -> Shown:
        """``text`` (the verdict itself by default) in the verdict's colour."""
        return self.paint(verdict if text is None else text, VERDICTS.get(verdict))

    def head(self, text: str) -> Shown:
        return self.paint(text, "head")

    def fix(self, text: str) -> Shown:
        return self.paint(text, "fix")


PLAIN = Palette(False)


def palette(args: argparse.Namespace | None = None, stream: TextIO | None = None) -> Palette:
    """The palette of a command writing text to ``stream`` (stdout by
    default), by its ``--color`` choice (auto when it has none)."""
    return Palette(wanted(getattr(args, "color", None) or "auto", stream))
