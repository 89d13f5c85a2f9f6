"""Every human surface, fed what an attacker writes (process names, paths,
command lines, cgroup names, journal contents): nothing reaches the terminal
raw, nothing is read as markup, and one record stays one line.

The kernel-side proof (real processes with such names failing real binds,
every command and the TUI run against them) is tests/kernel/test_hostile.py;
here the renderers are driven directly, with Hypothesis choosing the text.
"""

from __future__ import annotations

import asyncio
import io
import json
from contextlib import redirect_stdout

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.hostile import NAMES, assert_safe, hostile_text
from tracer import balance, groups, ports, report, reuseport, timewait, trace, why
from tracer.bindcheck import NamespaceFacts
from tracer.bindrules import Rule
from tracer.explain import Request, explain
from tracer.inventory import Inventory, Socket
from tracer.netns import PortRange
from tracer.owners import Owner
from tracer.records import (
    BlockerSummary,
    CallEvent,
    EventExplanation,
    Fix,
    Note,
    Reason,
)
from tracer.sockdiag import SockRecord
from tracer.sockflags import SockFlags
from tracer.state import (
    GroupEvent,
    GroupView,
    MemberView,
    PressureRow,
    SocketRow,
    StateModel,
    TimewaitRow,
    TimewaitView,
)

EVENT = {
    "time": 1764000000.25, "call": "bind", "result": "EADDRINUSE", "errno": 98, "pid": 4242,
    "tid": 4242, "uid": 1000, "sock_uid": 1000, "comm": "x", "cgroup_id": 1, "netns": 4026531840,
    "family": "ipv4", "protocol": "tcp", "addr_family": "ipv4", "addr": "0.0.0.0", "port": 8080,
    "bound_addr": "0.0.0.0", "bound_port": 0, "options": ["reuseaddr"], "bound_dev_if": 0,
    "inode": 77, "plan": "tracepoint", "addr_unreadable": False, "get_port": None,
}


def owner(name: str, pid: int = 812) -> Owner:
    return Owner(pid=pid, comm=name, exe=f"/opt/{name}/bin", cmdline=f"{name} --serve {name}",
                 user=name, uid=1000, cgroup=f"/system.slice/{name}.service",
                 unit=f"{name}.service", container=None)


def listener(name: str, port: int = 8080) -> Socket:
    diag = SockRecord(4026531840, "tcp", "ipv4", "LISTEN", "0.0.0.0", port, "0.0.0.0", 0, 0, 128,
                      None, 0, 1000, 5151, 99, 0)
    flags = SockFlags(4026531840, "tcp", "ipv4", "LISTEN", "0.0.0.0", port, 99, 5151, 1000,
                      frozenset({"reuseport"}), 0, 7, 2, False, False)
    return Socket(diag, flags, (owner(name), owner(name, 813)))


def lines_of(text: str) -> list[str]:
    return text.split("\n")


# ---- line output: trace, why, ports, timewait, groups, report --------------------------


@given(hostile_text())
def test_trace_prints_one_safe_line_per_event(name: str) -> None:
    ev = CallEvent.from_json({**EVENT, "comm": name})
    line = trace.human_line(ev)
    assert_safe(line, "trace line")
    assert "\n" not in line
    blockers = EventExplanation((BlockerSummary((812,), name, "LISTEN", "0.0.0.0:8080", "listener"),),
                       error=None)
    assert_safe(blockers.text()) and "\n" not in blockers.text()
    failed = EventExplanation(error=f"the namespace of {name} is gone")
    assert "\n" not in failed.text()
    assert_safe(failed.text())


@given(hostile_text())
def test_why_names_hostile_owners_safely(name: str) -> None:
    inv = Inventory([listener(name)], namespaces=1)
    facts = NamespaceFacts(4026531840, 1024, {"ipv4": False, "ipv6": False}, False,
                           PortRange(32768, 60999, frozenset()))
    result = explain(Request(port=8080, uid=0), netns="4026531840", inventory=inv, facts=facts)
    assert result.verdict == "conflict"
    text = why.render(result)
    assert_safe(text, "why")
    # The structure survives: the verdict, one blocker, its rule, its fixes.
    head, *rest = lines_of(text)
    assert "would FAIL" in head
    assert sum(1 for ln in rest if ln.startswith("  blocked by ")) == 1
    assert sum(1 for ln in rest if ln.startswith("    rule: ")) == 1
    # JSON keeps the exact name.
    doc = json.loads(json.dumps(result.to_json()))
    assert doc["blockers"][0]["owners"][0]["comm"] == name


@given(hostile_text())
def test_ports_table_is_one_line_per_socket(name: str) -> None:
    out = io.StringIO()
    with redirect_stdout(out):
        # with -v: each holder's command line and executable under its socket
        ports._print_table([(ports.row(s), ports.owner_details(s))
                            for s in (listener(name), listener(name, 9090))])
        ports._print_health(Inventory([], namespaces=1))
    text = out.getvalue()
    assert_safe(text, "ports")
    assert len([ln for ln in lines_of(text) if ln.startswith("4026531840")]) == 2
    assert len([ln for ln in lines_of(text) if ln.startswith("    ")]) == 4  # 2 holders each


@given(hostile_text())
def test_timewait_groups_by_a_hostile_closer(name: str) -> None:
    r = timewait.TimewaitReport(3, 3, 1, [timewait.Group(f"{name}[812] uid 0", 3, 1000, 50000)],
                                timewait.histogram([1000, 2000, 50000]), [], Inventory([]),
                                [f"closed by {name}"])
    text = timewait.render(r, "process")
    assert_safe(text, "timewait")
    assert len([ln for ln in lines_of(text) if ln.rstrip().endswith("1-50")]) == 1


@given(hostile_text())
def test_groups_show_hostile_members_safely(name: str) -> None:
    sock = listener(name)
    member = reuseport.Member(99, 5151, "LISTEN", sock.owners, 10, 1.0, 10, 1.0, 0, 128)
    g = reuseport.Group(7, 4026531840, "tcp", "ipv4", "0.0.0.0", 8080, 0, 2, False, [member, member],
                        1.0, balance.imbalance([10, 10], 1.0))
    ev = reuseport.MemberEvent(1764000000.0, "join", 7, 4026531840, "tcp", "ipv4", "0.0.0.0", 8080,
                               99, 5151, sock.owners, 0)
    snap = reuseport.GroupsReading(1764000000.0, 1.0, "tracepoint", [g], [ev], {})
    text = groups.render(snap) + groups.event_line(ev)
    assert_safe(text, "groups")
    assert "\n" not in groups.event_line(ev)
    # -v: each process serving the group on one line of its own, escaped
    verbose = groups.render(snap, verbose=True)
    assert_safe(verbose, "groups -v")
    details = [ln for ln in lines_of(verbose) if ln.startswith("  ") and "--serve" in ln]
    assert len(details) == 2  # the two holders (pids 812 and 813), each once


def _report_text(name: str) -> str:
    evidence = [{"type": "event", "id": 1, "time": 1764000000.0, "call": "bind", "result": "EADDRINUSE",
                 "pid": 4242, "comm": name, "exe": f"/tmp/{name}", "cgroup": name, "uid": 1000,
                 "sock_uid": 1000, "protocol": "tcp", "local": "0.0.0.0:8080", "options": [name],
                 "inode": 5, "blockers": [{"pids": [812], "comm": name, "state": "LISTEN",
                                           "local": "0.0.0.0:8080", "rule": name}]},
                {"type": "snapshot", "snapshot": 3, "time": 1764000000.0, "protocol": "tcp",
                 "state": "LISTEN", "local": "0.0.0.0:8080", "options": ["reuseport"], "group": 7,
                 "group_size": 2, "bpf": False, "uid": 1000, "inode": 5,
                 "owners": [{"pid": 812, "comm": name, "exe": name, "uid": 0, "cgroup": name}]}]
    f = report.Finding("restart_race", 1764000000.0, 1, "tcp", 8080, [4242], [812],
                       f"pid 4242 ({name}) took tcp 0.0.0.0:8080", evidence, [name])
    entry = {"time": 1764000000.0, "netns": 1, "protocol": "tcp", "port": 8080, "what": "conflict",
             "call": "bind", "result": "EADDRINUSE", "local": "0.0.0.0:8080", "pids": [4242],
             "comm": name, "exe": name, "uid": 0, "options": [], "inode": 5, "count": 2,
             "until": 1764000001.0, "blockers": evidence[0]["blockers"]}
    summary = {"path": f"/var/lib/{name}.db", "schema": 1, "sessions": [], "events": 1,
               "snapshots": 1, "first": None, "last": None, "since": None, "notes": [name]}
    out = io.StringIO()
    with redirect_stdout(out):
        report.print_report(summary, [f], [entry])
    return out.getvalue()


@given(hostile_text())
def test_report_prints_hostile_journal_contents_safely(name: str) -> None:
    text = _report_text(name)
    assert_safe(text, "report")
    # Exactly the lines an ordinary name gives: nothing was split or forged.
    assert len(lines_of(text)) == len(lines_of(_report_text("nginx")))


# ---- the terminal UI ----------------------------------------------------------------


def hostile_model(name: str) -> StateModel:
    model = StateModel()
    blockers = (BlockerSummary((812,), name, "LISTEN", "0.0.0.0:8080", Rule.LISTENER.value,
                               name, name),)
    model.add_conflict(CallEvent.from_json({**EVENT, "comm": name}),
                       EventExplanation(blockers, fixes=(Fix.from_json(f"stop {name}"),),
                                        notes=(Note.from_json(f"note on {name}"),)))
    model.add_conflict(CallEvent.from_json({**EVENT, "comm": name, "call": name, "result": name}),
                       EventExplanation(error=f"gone: {name}"))
    row = SocketRow.build(netns=1, protocol="tcp", family="ipv4", state="LISTEN",
                          local="0.0.0.0:8080", remote="0.0.0.0:0", port=8080, rqueue=0, wqueue=128,
                          timer=None, timer_ms=0, uid=0, inode=5, cookie=9,
                          options=["reuseport", name], group=7, group_size=2, group_bpf=False,
                          owners=[(812, f"{name}[812] ({name}.service)", name)])
    model.set_ports([row])
    member = MemberView(9, 5, f"{name}[812]", "LISTEN", 10, 1.0, 0.5, 0, 128)
    model.set_groups([GroupView("1/tcp/7", 1, "tcp4", "0.0.0.0:8080", 8080, 2, False,
                                (member, member), 2.0, (1.0, 2.0),
                                (GroupEvent(1764000000.0, "join", f"{name}[812] inode 5", 0),), None)])
    model.set_timewait(TimewaitView(1, 1, 1, (TimewaitRow("8080", "10.0.0.1", f"{name}[812]", 1, 5, 9),),
                                    (("10", 1),), (PressureRow(1, "10.0.0.2", "10.0.0.1:80", 1, 10, "ok"),),
                                    (f"closer {name}",), 1764000000.0))
    model.update_health(plan=name, plan_notes=(f"fentry: {name}",))
    model.set_error("events", f"the events thread stopped: {name}")
    return model


@settings(max_examples=8)  # each example draws all five screens
@given(st.sampled_from(sorted(NAMES.values())) | hostile_text())
def test_every_screen_shows_hostile_text_escaped(name: str) -> None:
    from tui.app import make_app

    async def run() -> list[str]:
        app = make_app(hostile_model(name))
        shots = []
        async with app.run_test(size=(120, 40), notifications=True) as pilot:
            for key in "12345":
                await pilot.press(key)
                await pilot.pause()
                shots.append(app.export_screenshot())
        return shots

    for shot in asyncio.run(run()):
        # The SVG holds every character drawn (XML-escaped): none may be one
        # a terminal acts on.
        assert_safe(shot.replace("\n", " "), "a screen of the UI")


def test_markup_is_shown_as_typed() -> None:
    from tui.app import make_app

    async def run() -> str:
        app = make_app(hostile_model("[reverse]x[/]"))
        async with app.run_test(size=(120, 40), notifications=True) as pilot:
            await pilot.press("2")
            await pilot.pause()
            return app.export_screenshot()

    shot = asyncio.run(run())
    assert "[reverse]x[/]" in shot  # the Conflicts table and detail
    assert "stopped:&#160;[reverse]x[/]" in shot  # the error notification (SVG spaces)


@given(hostile_text())
def test_a_blocker_gone_since_is_named_safely(name: str) -> None:
    """The process that bound a socket, as the probe kept it at the bind,
    reaches the trace line, the TUI's detail and `ports`' health line
    escaped."""
    from tracer.records import Capture, Captured
    from tracer.state import Conflict
    from tui.conflicts import detail

    gone = BlockerSummary((812,), name, "LISTEN", "0.0.0.0:8080", "listener", held="gone")
    line = EventExplanation((gone,)).text()
    assert_safe(line) and "\n" not in line and "closed since" in line
    view = BlockerSummary((812,), name, "LISTEN", "0.0.0.0:8080", "listener", held="gone")
    held = Captured("tcp", "ipv4", "LISTEN", "0.0.0.0", 8080, "0.0.0.0", 0, 0, 5151, 0,
                    4026531840, frozenset(), 0, 812, name)
    ev = CallEvent.from_json({**EVENT, "comm": name})
    ev = type(ev)(**{**{f: getattr(ev, f) for f in ev.__slots__},
                     "capture": Capture("refusal", 1, True, (held,))})
    text = detail(Conflict(1, ev, EventExplanation(
        (view,), reasons=(Reason("EADDRINUSE", "conflict", {"blockers": 1}),)))).plain
    assert_safe(text, "the conflict's detail") and "read in the kernel" in text
    out = io.StringIO()
    with redirect_stdout(out):
        ports._print_health(Inventory([], namespaces=1, problems=[(f"pid 9 ({name})", name)]))
    assert_safe(out.getvalue(), "ports' health") and len(lines_of(out.getvalue().strip())) == 3
