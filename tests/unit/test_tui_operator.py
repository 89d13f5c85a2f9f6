"""The terminal UI as an on-call engineer uses it over ssh: at 80x24 and
at 160x48 every pid, errno and port on screen is whole; ``?`` lists the
keys of the screen it is opened on; ``/`` filters the conflicts; ``s``
saves what a screen shows as the matching command's JSON. Over the
recorded session (long process names, a wide-character name, a long unit
name, thousands of sockets: scripts/record-tui-fixture)."""

from __future__ import annotations

import io
import json
import re

import pytest
from rich.console import Console
from textual.widgets import Input

from tui.app import make_app
from tui.help import HelpScreen
from tui.table import VirtualTable

from tests.recorded_session import RECORDING, aio, column, load, recorded, table, text_of

SIZES = [(80, 24), (160, 48)]
SCREENS = {"1": "overview", "2": "conflicts", "3": "ports", "4": "groups", "5": "timewait"}
PID_SHOWN = re.compile(r"\[(\d+)\]")
CUT_PID = re.compile(r"\[\d+(?![\d\]])")


def screen_text(app) -> str:
    """Every line of the terminal, as the user sees it."""
    console = Console(width=app.size.width, file=io.StringIO(), record=True, color_system=None)
    console.print(app.screen._compositor.render_update(full=True,
                                                        screen_stack=app._background_screens))
    return console.export_text()


def recorded_pids() -> set[int]:
    """Every pid the recording names (callers, owners, members, closers)."""
    return {int(p) for p in PID_SHOWN.findall(RECORDING.read_text())} | {
        d["pid"] for d in recorded("event")}


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("key", SCREENS)
def test_every_pid_on_screen_is_whole(size, key):
    @aio
    async def run():
        app = make_app(load())
        async with app.run_test(size=size) as pilot:
            await pilot.press(key)
            await pilot.pause()
            for _ in range(2):  # columns are laid out again once rows are measured
                await pilot.pause()
            text = screen_text(app)
            assert not CUT_PID.search(text), text
            shown = {int(p) for p in PID_SHOWN.findall(text)}
            assert shown, text  # every screen names someone
            assert shown <= recorded_pids(), (shown - recorded_pids(), text)
            return app, text
    run()


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_each_conflict_row_shows_its_callers_pid_errno_and_port(size):
    @aio
    async def run():
        model = load()
        app = make_app(model)
        async with app.run_test(size=size) as pilot:
            await pilot.press("2")
            await pilot.pause()
            await pilot.pause()
            lines = screen_text(app).splitlines()
            t = table(app, "#conflict-table")
            top = round(t.scroll_y)
            body = [ln for ln in lines if re.match(r"\d\d:\d\d:\d\d ", ln)]
            visible = model.snapshot().conflicts[top:top + len(body)]
            assert len(body) == len(visible) > 0
            for line, c in zip(body, visible):
                ev = c.event
                assert f"[{ev.pid}]" in line, line
                assert re.search(rf"\b{c.result}\b", line), line
                assert f":{ev.port}" in line, line
    run()


@aio
async def test_help_lists_the_keys_of_the_screen_it_is_opened_on():
    app = make_app(load())
    async with app.run_test(size=(80, 24)) as pilot:
        for key, name in SCREENS.items():
            await pilot.press(key, "question_mark")
            await pilot.pause()
            assert isinstance(app.screen, HelpScreen), name
            text = text_of(app, "#help-text")
            pane = app.active_pane
            assert pane.name_shown in text
            for binding in pane.BINDINGS:  # the screen's own keys, each with its key
                assert binding.description in text, (name, binding)
                assert app.get_key_display(binding) in text
            assert "Everywhere" in text and "Save" in text and "Quit" in text
            if isinstance(pane.main_widget(), VirtualTable):
                assert "page down" in text
            await pilot.press("escape")
            await pilot.pause()
            assert not isinstance(app.screen, HelpScreen)
        # '?' typed into a filter is text, not the help
        await pilot.press("2", "slash", "question_mark")
        await pilot.pause()
        assert isinstance(app.focused, Input) and app.focused.value == "?"
        assert not isinstance(app.screen, HelpScreen)


@aio
async def test_conflicts_filter_by_port_errno_process_pid_and_netns():
    model = load()
    app = make_app(model)
    conflicts = model.snapshot().conflicts
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("2")
        t = table(app, "#conflict-table")
        assert t.row_count == len(conflicts)

        async def typed(query: str) -> list[int]:
            inp = app.query_one("#conflict-filter", Input)
            inp.value = ""
            await pilot.press("slash", *query, "enter")
            await pilot.pause()
            return [r.key for r in t.all_rows()]

        assert await typed(":6000") == [c.seq for c in conflicts if c.event.port == 6000] != []
        assert await typed("eaddrnotavail") == [c.seq for c in conflicts
                                                if c.result == "EADDRNOTAVAIL"] != []
        # a process is found as the caller and as a blocker
        canary = [c.seq for c in conflicts if "deploy-canary-7[" in c.who + c.blocked_by()]
        assert await typed("deploy-canary") == canary
        assert {conflicts[i].event.comm for i in canary} == {"deploy-canary-7",
                                                             "payments-api-v2"}
        pid = conflicts[0].event.pid
        assert await typed(f"pid={pid}") == [c.seq for c in conflicts if c.event.pid == pid]
        assert await typed(f"ns={conflicts[0].event.netns}") == [c.seq for c in conflicts]
        assert await typed("ns=1") == []
        name = model.snapshot().netns_names[conflicts[0].event.netns]
        assert await typed(name) == [c.seq for c in conflicts]  # the namespace by its name
        # the blockers' names are searched too
        assert await typed("payments-api-v2 :8080") == [
            c.seq for c in conflicts
            if c.event.port == 8080 and "payments-api-v2[" in c.who + c.blocked_by()] != []
        await pilot.press("escape")
        await pilot.pause()
        assert t.row_count == len(conflicts)


@aio
async def test_save_writes_what_the_matching_command_prints(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = load()
    app = make_app(model)
    snap = model.snapshot()
    async with app.run_test(size=(80, 24)) as pilot:
        # Conflicts, filtered: trace --json's lines, the shown ones only
        await pilot.press("2", "slash", *":6000", "enter", "s")
        await pilot.pause()
        saved = app.saved
        assert saved is not None and saved.parent == tmp_path and saved.suffix == ".jsonl"
        assert saved.stat().st_mode & 0o777 == 0o600
        lines = [json.loads(line) for line in saved.read_text().splitlines()]
        expected = [c.to_json() for c in snap.conflicts if c.event.port == 6000]
        assert lines == json.loads(json.dumps(expected)) and len(lines) == 2
        assert all("blockers" in d and "caller" in d for d in lines)

        # Ports: ports --json's sockets, as recorded
        await pilot.press("3", "s")
        await pilot.pause()
        doc = json.loads(app.saved.read_text())
        want = recorded("ports")[-1]["sockets"]
        key = lambda d: (d["netns"], d["inode"], d["local"], d["remote"])  # noqa: E731
        assert sorted(doc["sockets"], key=key) == sorted(want, key=key)

        # TIME_WAIT: timewait --json's form
        await pilot.press("5", "s")
        await pilot.pause()
        doc = json.loads(app.saved.read_text())
        tw = recorded("timewait")[-1]
        assert doc["total"] == tw["total"] and doc["rows"] == tw["rows"]

        # Groups: one per group, with its members
        await pilot.press("4", "s")
        await pilot.pause()
        doc = json.loads(app.saved.read_text())
        assert sorted(g["local"] for g in doc["groups"]) == sorted(g.local for g in snap.groups)
        assert all(g["members"] for g in doc["groups"])
        assert len(list(tmp_path.iterdir())) == 4  # four files, none overwritten


def test_save_never_follows_a_planted_link(tmp_path):
    from tui.saving import file_name, save
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    when = 1_800_000_000.0
    (tmp_path / file_name("ports", when, 0, False)).symlink_to(victim)
    path = save("ports", {"sockets": []}, False, [tmp_path], when=when)
    assert path.name == file_name("ports", when, 1, False)
    assert victim.read_text() == "keep me"


def test_save_says_why_no_directory_took_it(tmp_path):
    from tui.saving import SaveError, save
    locked = tmp_path / "ro"
    locked.mkdir(mode=0o500)
    with pytest.raises(SaveError, match="could not save the screen: .*(ro|No such)"):
        save("ports", {}, False, [tmp_path / "missing", locked / "sub"])


@aio
async def test_namespaces_are_named_beside_their_inodes():
    model = load()
    snap = model.snapshot()
    [(inode, name)] = snap.netns_names.items()  # the recording's one namespace, named
    assert name == next(s["netns_name"] for s in recorded("ports")[-1]["sockets"])
    app = make_app(model)
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.press("3")
        await pilot.pause()
        t = table(app, "#port-table")
        assert set(column(t, "NETNS")) == {f"{inode} ({name})"}
        await pilot.press("2", "home")
        await pilot.pause()
        assert f"netns {inode} ({name})" in text_of(app, "#conflict-text")
        await pilot.press("4")
        await pilot.pause()
        assert f"netns {inode} ({name})" in text_of(app, "#group-text")
        await pilot.press("3", "slash", *name, "enter")  # the filter finds a namespace by name
        await pilot.pause()
        assert t.row_count == len(snap.ports)


@aio
async def test_the_details_say_who_owners_are_beyond_comm_pid():
    """Conflicts: the caller's and each blocker holder's unit and command
    line; Groups: those of each process serving the group."""
    model = load()
    snap = model.snapshot()
    app = make_app(model)
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.press("2", "home")
        await pilot.pause()
        first = snap.conflicts[0]
        detail = text_of(app, "#conflict-text")
        assert first.caller is not None and first.caller.cmdline
        assert first.caller.cmdline[:40] in detail
        holder = first.explanation.blockers[0].owners[0]
        assert holder.unit and f"{holder.comm}[{holder.pid}]: unit {holder.unit}" in detail
        await pilot.press("4")
        await pilot.pause()
        key = table(app, "#group-table").cursor_key
        group = next(g for g in snap.groups if g.key == key)
        served = {o.pid: o for m in group.members for o in m.served_by}
        assert served
        detail = text_of(app, "#group-text")
        for o in list(served.values())[:4]:
            assert f"{o.comm}[{o.pid}]: " in detail and (o.cmdline or "")[:40] in detail
