"""The terminal UI driven like a user would (Textual's pilot), over a state
model filled from a real recorded session (tests/data/tui-session.jsonl,
recorded by scripts/record-tui-fixture with the live collector)."""

from __future__ import annotations

import pytest
from textual.widgets import Input

from tracer.records import EventExplanation
from tracer.state import StateModel
from tui.app import make_app

from tests.recorded_session import (
    SIZE,
    active,
    aio,
    column,
    load,
    recorded,
    recorded_listeners,
    recorded_time_wait,
    table,
    text_of,
)


@pytest.fixture
def model() -> StateModel:
    return load()


@aio
async def test_every_screen_has_its_key(model):
    app = make_app(model)
    async with app.run_test(size=SIZE) as pilot:
        assert active(app) == "overview"
        for key, screen in zip("23451", ("conflicts", "ports", "groups", "timewait", "overview")):
            await pilot.press(key)
            await pilot.pause()
            assert active(app) == screen
            pane = app.active_pane
            assert pane.snapshot is not None, f"{screen} drew nothing"
            assert app.focused is pane.main_widget()


@aio
async def test_quick_keys_end_on_the_last_screen_pressed(model):
    """Keys pressed faster than a screen settles: the focus given to the
    screen being left must not switch back to it (it once did: '2' then '4'
    within a frame ended on Conflicts)."""
    app = make_app(model)
    async with app.run_test(size=SIZE) as pilot:
        # The pilot waits for the app between keys; a terminal does not. Both
        # key presses are handled before either screen has been drawn.
        for keys, screen in (("24", "groups"), ("32", "conflicts"), ("513", "ports")):
            for key in keys:
                app.simulate_key(key)
            await pilot.pause(0.3)
            assert active(app) == screen, keys
            assert app.focused is app.active_pane.main_widget()


@aio
async def test_overview_counts_and_latest_conflicts(model):
    app = make_app(model)
    async with app.run_test(size=SIZE):
        summary = text_of(app, "#ov-summary")
        assert "tracepoint plan" in summary and "replay" in summary
        assert f"{recorded_listeners()} listeners" in summary
        assert f"{recorded_time_wait():,} TIME_WAIT" in summary
        assert "2 reuseport groups" in summary and "9 conflicts" in summary
        assert "not used: fentry" in summary
        latest = table(app, "#ov-latest")
        assert latest.row_count == 9
        assert column(latest, "RESULT")[-1] == "EADDRNOTAVAIL"


@aio
async def test_overview_enter_opens_the_conflict(model):
    app = make_app(model)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("home", "enter")
        await pilot.pause()
        assert active(app) == "conflicts"
        first = model.snapshot().conflicts[0]
        assert table(app, "#conflict-table").cursor_key == first.seq
        assert "0.0.0.0:8080" in text_of(app, "#conflict-text")


@aio
async def test_selecting_a_conflict_shows_blockers_rule_and_fixes(model):
    app = make_app(model)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("2")
        await pilot.pause()
        t = table(app, "#conflict-table")
        assert t.row_count == 9 and t.cursor == 8  # follows the newest
        # EADDRNOTAVAIL of connect(): the ephemeral range is exhausted
        assert "ip_local_port_range" in text_of(app, "#conflict-text")
        await pilot.press("home")
        detail = text_of(app, "#conflict-text")
        assert "bind() EADDRINUSE" in detail and "Blocked by" in detail
        assert "listener, same_address" in detail and "Fixes" in detail
        assert "stop or reconfigure" in detail
        for _ in range(4):
            await pilot.press("down")
        detail = text_of(app, "#conflict-text")
        assert "0.0.0.0:7000" in detail and "reuseport_other_uid" in detail
        assert "run the new socket's process as uid 0" in detail
        await pilot.press("down", "down")
        detail = text_of(app, "#conflict-text")
        assert "TIME_WAIT" in detail and "wait 60 s" in detail


@aio
async def test_conflicts_follow_new_ones_until_the_user_moves(model):
    app = make_app(model)
    ev = model.snapshot().conflicts[0].event
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("2")
        t = table(app, "#conflict-table")
        seq = model.add_conflict(ev, pending=True)
        app.pull()
        await pilot.pause()
        assert t.cursor_key == seq and "explaining" in text_of(app, "#conflict-text")
        assert column(t, "BLOCKED BY")[-1] == "…explaining"
        model.explain(seq, EventExplanation(error="the socket's namespace is gone"))
        app.pull()
        await pilot.pause()
        assert "namespace is gone" in text_of(app, "#conflict-text")
        await pilot.press("up")
        reading = t.cursor_key
        model.add_conflict(ev)
        app.pull()
        await pilot.pause()
        assert t.cursor_key == reading  # what the user reads does not move
        await pilot.press("f")  # follow: jump to the newest and stay there
        assert t.cursor == t.row_count - 1
        await pilot.press("f")
        model.add_conflict(ev)
        app.pull()
        await pilot.pause()
        assert t.cursor == t.row_count - 2


@aio
async def test_ports_filter_as_you_type(model):
    app = make_app(model)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("3")
        t = table(app, "#port-table")
        everything = t.row_count
        assert everything == len(model.snapshot().ports) > 100
        assert column(t, "STATE")[0] == "UNCONN"  # sorted by port: 5353/udp first
        await pilot.press("slash")
        assert isinstance(app.focused, Input)
        await pilot.press(*":8080")  # digits go to the filter, not to the screen keys
        await pilot.pause()
        assert active(app) == "ports"
        assert 0 < t.row_count < everything
        assert all(local.endswith(":8080") for local in column(t, "LOCAL"))
        await pilot.press(*" listen")
        await pilot.pause()
        assert column(t, "STATE") == ["LISTEN"]
        assert "shown" in text_of(app, "#port-summary")
        await pilot.press("enter")  # back to the table
        assert app.focused is t
        await pilot.press("escape")  # clears the filter
        await pilot.pause()
        assert t.row_count == everything
        await pilot.press("l")  # listeners only
        await pilot.pause()
        assert set(column(t, "STATE")) == {"LISTEN"} and t.row_count == recorded_listeners()
        assert "rp g" in " ".join(column(t, "FLAGS"))  # reuseport group shown in the flags
        await pilot.press("l")
        await pilot.pause()
        assert t.row_count == everything


@aio
async def test_ports_keep_the_selected_socket_across_refreshes(model):
    app = make_app(model)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("3")
        t = table(app, "#port-table")
        await pilot.press("down", "down", "down")
        key = t.cursor_key
        rows = list(model.snapshot().ports)
        model.set_ports(list(reversed(rows)))
        app.pull()
        await pilot.pause()
        assert t.cursor_key == key


@aio
async def test_groups_show_member_bars_rate_imbalance_and_marks(model):
    app = make_app(model)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("4")
        t = table(app, "#group-table")
        assert column(t, "GROUP") == ["0.0.0.0:7000", "0.0.0.0:9443"]
        assert column(t, "MEMBERS") == ["1", "3"]
        assert "one member" in text_of(app, "#group-text")
        await pilot.press("down")
        detail = text_of(app, "#group-text")
        assert "0.0.0.0:9443 tcp4" in detail and "3 members" in detail
        assert "█" in detail  # member bars
        assert any(ch in detail for ch in "▁▂▃▄▅▆▇")  # the rate sparkline
        assert "balance   over" in detail and "join" in detail and "leave" in detail


@aio
async def test_timewait_rows_and_port_pressure(model):
    app = make_app(model)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("5")
        t = table(app, "#tw-table")
        # The biggest group first: the server on 18200 closed first.
        rows = recorded("timewait")[-1]["rows"]
        assert t.all_rows()[0].cells[:2] == ("18200", "127.0.0.1") == tuple(rows[0][:2])
        assert t.all_rows()[0].cells[2].startswith("payments-api-v2[")
        assert any(r.cells[:2] == ("6000", "127.0.0.1") and r.cells[3] == "5"
                   for r in t.all_rows())
        summary = text_of(app, "#tw-summary")
        assert f"{recorded_time_wait():,} TIME_WAIT" in summary
        assert "out of ephemeral ports" in summary
        assert "≤60s" in summary
        pressure = table(app, "#tw-pressure")
        assert pressure.all_rows()[0].cells[2:5] == ("8/8", "100%", "full")
        assert pressure.all_rows()[0].style == "error"


@aio
async def test_updates_coalesce_when_the_ui_is_slower(model):
    app = make_app(model, refresh_hz=2)
    ev = model.snapshot().conflicts[0].event
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("2")
        frames = app.frames
        for _ in range(200):  # 200 versions between two ticks
            model.add_conflicts([(ev, None, False)] * 5)
        await pilot.pause(0.6)
        assert app.frames - frames <= 2
        assert app.skipped >= 190
        assert table(app, "#conflict-table").row_count == 1000  # the window, not more


@aio
async def test_pause_freezes_the_screens(model):
    app = make_app(model)
    ev = model.snapshot().conflicts[0].event
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("2", "p")
        t = table(app, "#conflict-table")
        model.add_conflict(ev)
        app.pull()
        await pilot.pause()
        assert t.row_count == 9 and "PAUSED" in text_of(app, "#status")
        await pilot.press("p")
        await pilot.pause()
        assert t.row_count == 10 and "PAUSED" not in text_of(app, "#status")


@aio
async def test_collector_errors_are_notified_once(model):
    app = make_app(model)
    async with app.run_test(size=SIZE) as pilot:
        model.set_error("groups", "reuseport groups are not counted: no tp_btf")
        for _ in range(3):
            app.pull(force=True)
            await pilot.pause()
        notes = [n for n in app._notifications if n.severity == "error"]
        assert len(notes) == 1 and "not counted" in notes[0].message
        assert "1 error(s)" in text_of(app, "#status")
        assert "not counted" in text_of(app, "#ov-summary")


@aio
async def test_live_health_figures_reach_the_status_line():
    model = StateModel()
    model.update_health(source="live", plan="fentry", events_per_s=1234.5, lost=17)
    app = make_app(model)
    async with app.run_test(size=SIZE):
        status = text_of(app, "#status")
        assert "live · fentry" in status and "1,234/s" in status and "17 lost" in status


@aio
async def test_q_quits(model):
    app = make_app(model)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("q")
        await pilot.pause()
    assert app.return_code == 0


@aio
async def test_large_terminal_shows_more_columns(model):
    app = make_app(model)
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.press("3")
        await pilot.pause()
        t = table(app, "#port-table")
        shown = [t.columns[i].label for i, _ in t._vt_layout]
        assert {"NETNS", "UID", "INODE", "TIMER"} <= set(shown)
        assert app.has_class("-tall")



def test_no_command_without_a_terminal_prints_help(capsys):
    from tracer import cli

    assert cli.main([]) == 2  # pytest's stdin is not a terminal
    assert "usage: portscope" in capsys.readouterr().out


def test_ui_errors_are_one_sentence_before_the_screen(capsys, tmp_path):
    from tracer import cli

    assert cli.main(["ui", "--replay", str(tmp_path / "missing.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("portscope: cannot replay") and "Traceback" not in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    assert cli.main(["ui", "--replay", str(bad)]) == 2
    assert "cannot replay" in capsys.readouterr().err
