"""Colour on a terminal (tracer/colour.py): when it is on (a real terminal
from pty.openpty(), a pipe, NO_COLOR, FORCE_COLOR, TERM=dumb, --color), what
each printer colours, and that a hostile name inside coloured text stays
escaped: the only escape sequences in the output are the ones we emit.

The end-to-end proof (portscope why under a pty, piped, with NO_COLOR) is
tests/kernel/test_colour_cli.py."""

from __future__ import annotations

import dataclasses
import functools
import io
import os
import pty
import re
from contextlib import redirect_stdout
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator, TextIO

import pytest
from hypothesis import given

from tests.hostile import NAMES, assert_safe, hostile_text
from tests.unit.test_hostile_surfaces import EVENT, _report_text, listener
from tracer import balance, colour, doctor, groups, report, reuseport, trace, why
from tracer.bindcheck import NamespaceFacts
from tracer.cli import BadArguments, build_parser
from tracer.colour import PLAIN, RESET, SGR, Palette
from tracer.explain import Request, explain
from tracer.inventory import Inventory
from tracer.netns import PortRange
from tracer.records import BlockerSummary, CallEvent, EventExplanation
from tracer.text import printable

ON = Palette(True)
OURS = {f"\x1b[{code}m" for code in SGR.values()} | {RESET}
ANY_SGR = re.compile(r"\x1b\[[0-9;]*m")
RED, YELLOW, GREEN, BOLD = (f"\x1b[{SGR[r]}m" for r in ("bad", "warn", "good", "head"))


def sequences(text: str) -> list[str]:
    return ANY_SGR.findall(text)


def plain(text: str) -> str:
    """``text`` without our SGR codes (and only those)."""
    for code in OURS:
        text = text.replace(code, "")
    return text


def assert_only_our_codes(text: str) -> None:
    """Every escape in ``text`` is one of our SGR codes; none is left once
    they are removed, and what is left is safe on a terminal."""
    assert set(sequences(text)) <= OURS, set(sequences(text)) - OURS
    assert "\x1b" not in plain(text), repr(text)
    assert_safe(plain(text), "coloured output without its colour")


# ---- when: the decision table ---------------------------------------------------------

@pytest.fixture
def tty() -> Iterator[TextIO]:
    """A real terminal: the slave end of a pseudo-terminal."""
    master, slave = pty.openpty()
    stream = os.fdopen(slave, "w")
    try:
        assert stream.isatty()
        yield stream
    finally:
        stream.close()
        os.close(master)


@pytest.fixture
def pipe() -> Iterator[TextIO]:
    read, write = os.pipe()
    stream = os.fdopen(write, "w")
    try:
        assert not stream.isatty()
        yield stream
    finally:
        stream.close()
        os.close(read)


@pytest.fixture(autouse=True)
def no_colour_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sets what it needs: none of the caller's own settings."""
    for name in ("NO_COLOR", "FORCE_COLOR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")


@pytest.mark.parametrize("choice", ["auto", "always", "never"])
@pytest.mark.parametrize("term", ["xterm-256color", "dumb", None])
@pytest.mark.parametrize("no_color", [None, "", "1", "0"])
@pytest.mark.parametrize("on_tty", [True, False])
def test_the_decision_table(choice: str, term: str | None, no_color: str | None, on_tty: bool,
                            tty: TextIO, pipe: TextIO, monkeypatch: pytest.MonkeyPatch) -> None:
    if term is None:
        monkeypatch.delenv("TERM")
    else:
        monkeypatch.setenv("TERM", term)
    if no_color is not None:
        monkeypatch.setenv("NO_COLOR", no_color)
    if choice == "always":
        expected = True  # even into a pipe, whatever the environment says
    elif choice == "never":
        expected = False
    else:  # NO_COLOR: any non-empty value ("0" too) disables; TERM unset is not dumb
        expected = on_tty and not no_color and term != "dumb"
    assert colour.wanted(choice, tty if on_tty else pipe) is expected


@pytest.mark.parametrize("force, no_color, choice, expected", [
    ("1", None, "auto", True),  # into a pipe
    ("0", None, "auto", True),  # force-color.org: any non-empty value
    ("", None, "auto", False),
    ("1", "1", "auto", False),  # NO_COLOR wins
    ("1", None, "never", False),  # the option wins
])
def test_force_color_colours_a_pipe(force: str, no_color: str | None, choice: str, expected: bool,
                                    pipe: TextIO, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORCE_COLOR", force)
    monkeypatch.setenv("TERM", "dumb")  # forced over TERM too
    if no_color:
        monkeypatch.setenv("NO_COLOR", no_color)
    assert colour.wanted(choice, pipe) is expected


def test_a_stream_without_a_file_is_not_a_terminal() -> None:
    assert colour.wanted("auto", io.StringIO()) is False
    closed = io.StringIO()
    closed.close()
    assert colour.wanted("auto", closed) is False


def test_the_option_is_global_with_three_choices(tty: TextIO) -> None:
    parser = build_parser()
    assert parser.parse_args(["why", "80"]).color == "auto"
    args = parser.parse_args(["--color", "never", "why", "80"])
    assert args.color == "never" and colour.palette(args, tty).on is False
    args = parser.parse_args(["--color", "always", "why", "80"])
    assert colour.palette(args, io.StringIO()).on is True
    assert colour.palette(parser.parse_args(["why", "80"]), tty).on is True
    with pytest.raises(BadArguments, match="invalid choice: 'sometimes'"):
        parser.parse_args(["--color", "sometimes", "why", "80"])


# ---- what: the roles ------------------------------------------------------------------

def test_errnos_verdicts_fixes_and_headers_have_their_colours() -> None:
    assert ON.errno("EADDRINUSE") == f"{RED}EADDRINUSE{RESET}"
    assert ON.errno("EACCES") == f"{RED}EACCES{RESET}"
    assert ON.errno("EADDRNOTAVAIL") == f"{YELLOW}EADDRNOTAVAIL{RESET}"
    assert ON.errno(None) == ON.errno("ok") == f"{GREEN}ok{RESET}"
    assert ON.errno("EPERM", 8) == f"{RED}EPERM{RESET}   "  # padded after the colour
    assert ON.verdict("free", "would succeed") == f"{GREEN}would succeed{RESET}"
    assert ON.verdict("conflict").startswith(RED) and ON.verdict("refused").startswith(RED)
    assert ON.verdict("uneven").startswith(YELLOW) and ON.verdict("even").startswith(GREEN)
    assert ON.verdict("not_accepting", "x").startswith(YELLOW)
    assert ON.verdict("stopped", "x").startswith(RED) and ON.verdict("dropping", "x").startswith(RED)
    assert ON.verdict("insufficient") == "insufficient"  # no colour: nothing to say
    assert ON.fix("set SO_REUSEADDR") == f"{GREEN}set SO_REUSEADDR{RESET}"
    assert ON.head("timeline:") == f"{BOLD}timeline:{RESET}"
    assert ON.paint("", "bad") == ""  # nothing to colour: no codes
    assert PLAIN.errno("EADDRINUSE", 13) == "EADDRINUSE   " and PLAIN.fix("a\x1bb") == "a\\x1bb"


# ---- escaped first, coloured after ----------------------------------------------------

@pytest.mark.parametrize("name", ["x\x1b[0mafter", "\x1b[31mred", "a\x1b[0m\x1b[32m\x9b0m",
                                  "back\\slash\x1b[0m", *NAMES.values()])
def test_a_hostile_name_is_escaped_inside_the_colour(name: str) -> None:
    out = ON.paint(name, "bad")
    assert out == f"{RED}{printable(name)}{RESET}"
    assert sequences(out) == [RED, RESET]  # exactly ours: the name's are shown, not run
    assert "\\x1b" in out or "\x1b" not in name
    assert_only_our_codes(out)
    # Text already shown (escaped) is not escaped twice; text that only
    # claims to be is checked.
    assert ON.paint(colour.escaped(printable(name)), "bad") == out
    assert colour.escaped(name) == printable(name)
    assert colour.line("<", out, name, ">") == f"<{out}{printable(name)}>"


def conflict_on(name: str):  # type: ignore[no-untyped-def]
    inv = Inventory([listener(name)], namespaces=1)
    facts = NamespaceFacts(4026531840, 1024, {"ipv4": False, "ipv6": False}, False,
                           PortRange(32768, 60999, frozenset()))
    return explain(Request(port=8080, uid=0), netns="4026531840", inventory=inv, facts=facts)


@given(hostile_text())
def test_why_colours_the_verdict_errno_and_fixes_around_hostile_owners(name: str) -> None:
    result = conflict_on(name)
    text = why.render(result, 0, ON)
    assert_only_our_codes(text)
    assert plain(text) == why.render(result)  # the colour adds codes, nothing else
    head = text.split("\n")[0]
    assert head.endswith(f"{RED}would FAIL with{RESET} {RED}EADDRINUSE{RESET}")
    assert f"  {RED}blocked by{RESET} " in text
    assert f"  {BOLD}what would work:{RESET}" in text
    fixes = [ln for ln in text.split("\n") if ln.startswith("    - ")]
    assert fixes and all(ln.startswith(f"    - {GREEN}") and ln.endswith(RESET) for ln in fixes)
    if "\x1b" in name:  # the name's own escapes are shown as text, never sent
        assert "\\x1b" in text


def test_why_colours_a_free_port_green() -> None:
    free = explain(Request(port=8080, uid=0), netns="4026531840", inventory=Inventory([]),
                   facts=NamespaceFacts(4026531840, 1024, {"ipv4": False, "ipv6": False}, False,
                                        PortRange(32768, 60999, frozenset())))
    assert why.render(free, 0, ON).split("\n")[0].endswith(f": {GREEN}would succeed{RESET}")


@given(hostile_text())
def test_trace_colours_the_result_and_the_blocked_by_label(name: str) -> None:
    ev = CallEvent.from_json({**EVENT, "comm": name})
    line = trace.human_line(ev, None, ON)
    assert_only_our_codes(line)
    assert plain(line) == trace.human_line(ev)  # the columns stay where they were
    assert f" {RED}EADDRINUSE{RESET}    " in line
    output, out = trace.Output(None), io.StringIO()
    output.stream = out
    found = EventExplanation((BlockerSummary((812,), name, "LISTEN", "0.0.0.0:8080", "listener"),),
                             error=None)
    printer = trace.Printer(output, False, SimpleNamespace(explain=lambda ev: found), ON)
    printer.emit(ev)
    header, first, second, end = out.getvalue().split("\n")
    assert header == f"{BOLD}{trace.header_line()}{RESET}"
    assert first == line and end == ""
    assert second.startswith(f"    {RED}blocked by:{RESET} ")
    assert_only_our_codes(second)


def test_trace_in_json_is_never_coloured() -> None:
    output, out = trace.Output(None), io.StringIO()
    output.stream = out
    printer = trace.Printer(output, True, None, ON)
    printer.emit(CallEvent.from_json(EVENT))
    assert "\x1b" not in out.getvalue() and '"result":"EADDRINUSE"' in out.getvalue()


def test_trace_colours_stdout_only(tmp_path: Path) -> None:
    always = SimpleNamespace(color="always", json=False)
    assert trace.output_palette(always, trace.Output(None)).on is True
    assert trace.output_palette(SimpleNamespace(color="always", json=True), trace.Output(None)).on is False
    to_file = trace.Output(str(tmp_path / "events.log"))
    try:
        assert trace.output_palette(always, to_file).on is False  # -o FILE: never
    finally:
        to_file.close()
    assert trace.output_palette(SimpleNamespace(color="never", json=False), trace.Output(None)).on is False


def hostile_group(name: str) -> reuseport.GroupsReading:
    sock = listener(name)
    ok = reuseport.Member(99, 5151, "LISTEN", sock.owners, 10, 1.0, 10, 1.0, 0, 128)
    stopped = dataclasses.replace(ok, cookie=100, inode=5152, status="stopped",
                                  problems=(f"{name}[812] is stopped (SIGSTOP)",))
    g = reuseport.Group(7, 4026531840, "tcp", "ipv4", "0.0.0.0", 8080, 0, 2, False, [ok, stopped],
                        1.0, balance.imbalance([10, 10], 1.0))
    return reuseport.GroupsReading(1764000000.0, 1.0, "tracepoint", [g], [], {})


@given(hostile_text())
def test_groups_colours_statuses_and_the_balance_verdict(name: str) -> None:
    snap = hostile_group(name)
    text = groups.render(snap, None, ON)
    assert_only_our_codes(text)
    assert plain(text) == groups.render(snap)
    lines = text.split("\n")
    assert any(ln.endswith(f"{GREEN}ok{RESET}") for ln in lines)
    assert any(ln.endswith(f"{RED}stopped{RESET}") for ln in lines)
    assert any(ln.startswith(f"  {RED}!{RESET} inode 5152: ") for ln in lines)
    # A member not served colours the balance red, whatever the split says.
    assert any(ln.startswith(f"  balance {RED}") for ln in lines)
    assert lines[2].startswith(BOLD + "tcp4 0.0.0.0:8080")


def test_groups_colours_an_uneven_split_yellow_and_an_even_one_green() -> None:
    snap = hostile_group("nginx")
    g = snap.groups[0]
    ok = g.members[0]
    for counts, colour_ in (([10, 10], GREEN), ([200, 10], YELLOW)):
        even = dataclasses.replace(g, members=[ok, dataclasses.replace(ok, cookie=100, inode=5152)],
                                   imbalance=balance.imbalance(counts, 10.0))
        text = groups.render(dataclasses.replace(snap, groups=[even]), None, ON)
        assert f"  balance {colour_}" in text, (counts, text)


def report_text(name: str, pal: Palette = PLAIN) -> str:
    """test_hostile_surfaces' journal of a hostile process, reported with ``pal``."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(report, "print_report", functools.partial(report.print_report, pal=pal))
        return _report_text(name)


@given(hostile_text())
def test_report_colours_findings_and_conflicts_around_hostile_journal_text(name: str) -> None:
    text = report_text(name, ON)
    assert_only_our_codes(text)
    assert plain(text) == report_text(name) == _report_text(name)
    assert f"{BOLD}1 finding:{RESET}" in text and f"{BOLD}timeline:{RESET}" in text
    assert f"  {RED}restart_race{RESET}  tcp port 8080" in text
    assert f"  {RED}conflict{RESET}   bind {RED}EADDRINUSE{RESET} 0.0.0.0:8080" in text
    assert f"  {RED}blocked by:{RESET} " in text


def test_doctor_colours_its_conclusions() -> None:
    out = io.StringIO()
    with redirect_stdout(out):
        doctor._out("\nportscope will use the fentry plan: the first ...", "good", ON)
        doctor._out("\nno plan attaches on this kernel.", "bad", ON)
        doctor._out(f"\nbcc engine: not available: {NAMES['colour']}", "warn", ON)
    text = out.getvalue()
    assert text.split("\n")[:5] == ["", f"{GREEN}portscope will use the fentry plan: the first ...{RESET}",
                                    "", f"{RED}no plan attaches on this kernel.{RESET}", ""]
    # The library's message is quoted, escaped inside the colour (its newline kept as a line).
    assert f"{YELLOW}bcc engine: not available: \\x1b[31mEVIL{RESET}" in text
    assert_only_our_codes(text)


def test_timewait_colours_a_destination_out_of_ports():
    from tracer import timewait
    from tracer.colour import Palette
    from tracer.inventory import Inventory

    full = timewait.Pressure(4026531840, "10.0.0.1", "10.0.0.9:5432", 28232, 28232)
    near = timewait.Pressure(4026531840, "10.0.0.1", "10.0.0.8:5432", 27000, 28232)
    r = timewait.TimewaitReport(0, 0, 1, [], timewait.histogram([]), [full, near],
                                Inventory([]))
    coloured = timewait.render(r, "port", pal=Palette(True))
    assert "\x1b[1;31mFULL: connect() fails with EADDRNOTAVAIL\x1b[0m" in coloured
    assert "\x1b[33mWARNING: nearly exhausted\x1b[0m" in coloured
    assert "\x1b" not in timewait.render(r, "port")
