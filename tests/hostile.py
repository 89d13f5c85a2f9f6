"""Hostile text, and the check that a human surface shows none of it raw.

Shared by the unit tests (renderers, the fuzz suite) and the kernel tests
(real processes with such names): one definition of what "safe on a
terminal" means, independent of tracer.text, so that the tests do not
check the escaping with the escaping's own code.
"""

from __future__ import annotations

import unicodedata

from hypothesis import strategies as st

# What an attacker names a process, a file or a cgroup, and what each does
# to a terminal that shows it raw.
NAMES = {
    "title": "\x1b]2;PWND\x07",  # sets the window title
    "clear": "\x1b[2J\x1b[H",  # clears the screen
    "colour": "\x1b[31mEVIL\n",  # colours the line, then forges a new one
    "forged": "ok\n12:00:00 bind",  # a fake output line
    "bidi": "abc\u202eevil\u2066x",  # reverses what follows
    "c1": "x\u009b31mred",  # CSI as a single C1 character
    "markup": "[reverse]x[/]",  # Textual/Rich markup
    "del": "a\x7fb\x00c",  # DEL, NUL
}
RAW_BYTES = b"\xff\xfe\x1b]2;B\x07\n"  # not UTF-8, with control bytes


def hostile_text() -> st.SearchStrategy[str]:
    """Text with every kind of character a terminal may act on, mixed with
    ordinary ones; surrogates stand for bytes that were not UTF-8."""
    controls = st.sampled_from([chr(c) for c in range(0x20)] + ["\x7f"]
                               + [chr(c) for c in range(0x80, 0xA0)]
                               + ["\u202a", "\u202b", "\u202c", "\u202d", "\u202e",
                                  "\u2066", "\u2067", "\u2068", "\u2069", "\u2028",
                                  "\u2029", "\u200f", "\ufeff", "\u00a0"]
                               + [chr(0xDC80 + b) for b in range(0x80)])
    return st.one_of(
        st.sampled_from(list(NAMES.values())),
        st.lists(st.one_of(controls, st.characters(), st.sampled_from("[]\\/ e:")),
                 max_size=40).map("".join),
    )


def unsafe(text: str) -> list[str]:
    """The characters of ``text`` a terminal could act on, other than the
    newlines that end lines: control and format characters, line and
    paragraph separators, surrogates (invalid UTF-8), and any escape."""
    bad = []
    for ch in text:
        if ch == "\n":
            continue
        if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp") or ch == "\x1b":
            bad.append(repr(ch))
    return bad


def assert_safe(text: str, what: str = "output") -> None:
    bad = unsafe(text)
    assert not bad, f"{what} holds characters a terminal acts on: {bad[:8]} in {text[:300]!r}"


def assert_safe_bytes(data: bytes, what: str = "output") -> None:
    """A process's raw output: valid UTF-8 (no byte a terminal reads as
    control), and safe as text."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AssertionError(f"{what} is not valid UTF-8 ({exc}): {data[:300]!r}") from None
    assert_safe(text, what)
