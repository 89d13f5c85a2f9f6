"""tracer.text.printable: what others wrote, shown safely, and unambiguously."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.hostile import NAMES, RAW_BYTES, assert_safe, hostile_text
from tracer.text import clock_text, printable, system_text


@pytest.mark.parametrize("raw,shown", [
    ("\x1b]2;PWND\x07", "\\x1b]2;PWND\\x07"),
    ("\x1b[31mEVIL\n", "\\x1b[31mEVIL\\n"),
    ("a\tb\rc", "a\\tb\\rc"),
    ("x\u009b31m", "x\\u009b31m"),  # C1 CSI
    ("abc\u202eevil\u2066", "abc\\u202eevil\\u2066"),  # bidi overrides
    ("a\x7fb\x00", "a\\x7fb\\x00"),
    ("back\\slash", "back\\\\slash"),  # doubled: an escape always means a byte
    ("nginx\u00a0", "nginx\\u00a0"),  # a space that is not one
    ("[reverse]x", "[reverse]x"),  # markup is plain text here; the TUI never parses it
    ("日本語 ok", "日本語 ok"),
    ("nginx", "nginx"),
])
def test_examples(raw: str, shown: str) -> None:
    assert printable(raw) == shown


def test_bytes_that_are_not_utf8_are_shown_as_hex() -> None:
    assert printable(RAW_BYTES) == "\\xff\\xfe\\x1b]2;B\\x07\\n"
    assert printable(system_text(b"a\xffb")) == "a\\xffb"
    assert system_text(b"a\xffb").encode("utf-8", "surrogateescape") == b"a\xffb"


def _unescape(text: str) -> str:
    """The inverse of printable(): proves that two different inputs are
    never shown the same (an attacker cannot make one name look like another)."""
    def one(m: re.Match[str]) -> str:
        e = m.group(0)
        if e in ("\\\\", "\\n", "\\r", "\\t"):
            return {"\\\\": "\\", "\\n": "\n", "\\r": "\r", "\\t": "\t"}[e]
        code = int(e[2:], 16)
        if e[1] == "x" and code >= 0x80:
            return chr(0xDC00 + code)  # a byte that was not UTF-8
        return chr(code)
    return re.sub(r"\\\\|\\[nrt]|\\x[0-9a-f]{2}|\\u[0-9a-f]{4}|\\U[0-9a-f]{8}", one, text)


@given(hostile_text())
def test_output_is_safe_and_reversible(text: str) -> None:
    shown = printable(text)
    assert_safe(shown)
    assert "\n" not in shown and shown.isprintable()
    assert _unescape(shown) == text


@given(st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl",
                                                             "Zp", "Zs")) | st.just(" ")))
def test_printable_text_is_left_alone(text: str) -> None:
    assert printable(text) == text.replace("\\", "\\\\")


@pytest.mark.parametrize("name", sorted(NAMES))
def test_every_named_attack_is_neutralised(name: str) -> None:
    assert_safe(printable(NAMES[name]))


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_clock_text_never_fails(t: float) -> None:
    assert isinstance(clock_text(t), str) and isinstance(clock_text(t, date=False, digits=6), str)
