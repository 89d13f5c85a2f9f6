"""The state model the terminal UI reads, the replay that fills it from a
recording, and the pure helpers the screens use. No terminal, no kernel."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from tracer.recording import Replay, load_recording
from tracer.records import (
    BlockerSummary,
    CallEvent,
    EventExplanation,
    reading_from_json,
)
from tracer.state import StateModel, matches
from tracer.views import (
    GroupViews,
    timewait_from_json,
    timewait_to_json,
    timewait_view,
)
from tui.render import bar, sparkline
from tui.table import Column, fit, layout

RECORDING = Path(__file__).resolve().parent.parent / "data" / "tui-session.jsonl"


def lines(kind: str) -> list[dict]:
    docs = [json.loads(line) for line in RECORDING.read_text().splitlines()]
    return [d for d in docs if d.get("record", "event") == kind]


def an_event(**changes):
    return CallEvent.from_json({**lines("event")[0], **changes})


# ---- the recording -----------------------------------------------------------


def test_recording_holds_every_kind_of_record():
    events = lines("event")
    assert {e["result"] for e in events} >= {"EADDRINUSE", "EADDRNOTAVAIL"}
    assert {e["call"] for e in events} >= {"bind", "listen", "connect"}
    rules = {b["rule"] for e in events for b in e.get("blockers") or []}
    assert rules >= {"listener", "reuseport_other_uid", "no_reuse", "time_wait"}
    assert len(lines("groups")) >= 5 and lines("ports") and lines("timewait")


def test_events_round_trip_through_json():
    for doc in lines("event"):
        ev = CallEvent.from_json(doc)
        back = ev.to_json()
        # A recording made before a key existed reads it as null.
        assert {k: doc.get(k) for k in back} == back


def test_explanations_from_json():
    listener = next(d for d in lines("event") if d["port"] == 8080 and d["call"] == "bind")
    x = EventExplanation.from_event_json(listener)
    assert x is not None and x.blockers[0].rule == "listener" and x.fixes
    assert "listening" in x.blockers[0].why
    gone = EventExplanation.from_event_json({"blockers": {"error": "gone"}})
    assert gone == EventExplanation(error="gone")
    assert EventExplanation.from_event_json({}) is None


def test_replay_fills_every_part_of_the_model():
    snap = load_recording(RECORDING).snapshot()
    assert len(snap.conflicts) == len(lines("event")) == snap.conflicts_total
    assert snap.ports and snap.listeners >= 5
    assert any(len(g.members) >= 3 and g.port == 9443 for g in snap.groups)
    total = lines("timewait")[-1]["total"]
    assert total > 1000  # thousands of sockets, as on a busy host
    assert snap.timewait is not None and snap.timewait.total == total
    assert snap.health.source == "replay" and snap.health.plan == "tracepoint"
    assert snap.time_wait == total


def test_replay_keeps_a_rate_history_and_join_leave_marks():
    snap = load_recording(RECORDING).snapshot()
    group = next(g for g in snap.groups if g.port == 9443)
    assert len(group.history) == len(lines("groups")) - 1  # no rate on the first read
    kinds = [e.kind for e in group.events]
    assert kinds == ["join", "leave"]
    assert group.imbalance is not None and "over" in group.imbalance.text


def test_replay_plays_at_the_recordings_pace():
    model = StateModel()
    replay = Replay(model, RECORDING)
    replay.play(speed=1000.0)
    replay._thread.join(10)
    assert model.snapshot().conflicts_total == len(lines("event"))


# ---- versions and coalescing ---------------------------------------------------


def test_each_change_bumps_the_version_of_its_part_only():
    model = StateModel()
    v0 = model.snapshot()
    model.add_conflict(an_event())
    v1 = model.snapshot()
    assert v1.version > v0.version and v1.versions.conflicts == v1.version
    assert v1.versions.ports == v0.versions.ports
    model.update_health(events=3)
    v2 = model.snapshot()
    assert v2.versions.health > v1.versions.health and v2.versions.conflicts == v1.versions.conflicts
    model.update_health(events=3)  # no change, no new version
    assert model.snapshot().version == v2.version


def test_snapshot_is_shared_until_something_changes():
    model = StateModel()
    model.add_conflict(an_event())
    assert model.snapshot() is model.snapshot()
    before = model.snapshot()
    model.add_conflict(an_event())
    after = model.snapshot()
    assert after is not before and len(before.conflicts) == 1  # the old view is unchanged


def test_conflicts_are_a_bounded_window():
    model = StateModel(max_conflicts=10)
    seqs = model.add_conflicts((an_event(), None, True) for _ in range(25))
    snap = model.snapshot()
    assert len(snap.conflicts) == 10 and snap.conflicts_total == 25
    assert [c.seq for c in snap.conflicts] == seqs[-10:]
    assert not model.explain(seqs[0], EventExplanation())  # left the window
    assert model.explain(seqs[-1], EventExplanation(error="x"))
    last = model.snapshot().conflicts[-1]
    assert last.explanation == EventExplanation(error="x") and not last.pending


def test_writers_in_threads_and_a_reader():
    model = StateModel()
    ev = an_event()

    def write():
        for _ in range(500):
            model.add_conflict(ev)

    threads = [threading.Thread(target=write) for _ in range(4)]
    for t in threads:
        t.start()
    versions = []
    while any(t.is_alive() for t in threads):
        versions.append(model.snapshot().version)
    for t in threads:
        t.join()
    assert versions == sorted(versions)
    snap = model.snapshot()
    assert snap.conflicts_total == 2000 and len({c.seq for c in snap.conflicts}) == 1000


def test_one_standing_error_per_kind():
    model = StateModel()
    model.set_error("ports", "ports could not be read: x")
    model.set_error("ports", "ports could not be read: y")
    model.set_error("groups", "no counters")
    assert model.snapshot().health.errors == (("groups", "no counters"),
                                              ("ports", "ports could not be read: y"))
    model.set_error("ports", None)
    assert model.snapshot().health.errors == (("groups", "no counters"),)


# ---- what the screens show ------------------------------------------------------


def test_blocked_by_summary():
    listener = BlockerSummary((812,), "nginx", "LISTEN", "0.0.0.0:80", "listener")
    udp = BlockerSummary((9,), "dns", "CLOSE", "0.0.0.0:53", "no_reuse")
    tw = BlockerSummary((), None, "TIME_WAIT", "127.0.0.1:80", "time_wait")
    assert EventExplanation((listener,)).summary() == "nginx[812] listener"
    assert EventExplanation((udp, listener)).summary() == "dns[9] no_reuse (CLOSE) +1"
    assert EventExplanation((tw, tw, tw)).summary() == "3 TIME_WAIT (time_wait)"
    assert EventExplanation(error="gone").summary() == "? gone"


def test_filter_words_and_exact_ports():
    snap = load_recording(RECORDING).snapshot()
    rows = snap.ports
    on_80 = [r for r in rows if matches(r.search, ":8080")]
    assert on_80 and all(r.port == 8080 for r in on_80)
    assert all(r.port == 8080 and r.state == "LISTEN"
               for r in rows if matches(r.search, "listen :8080"))
    assert [r for r in rows if matches(r.search, "LISTEN rp")]  # case-insensitive, flags
    assert not [r for r in rows if matches(r.search, "nosuchthing")]


def test_timewait_rows_group_by_port_remote_and_closer():
    def tw(lport, raddr, rport, left, netns=1):
        diag = SimpleNamespace(netns=netns, family="ipv4", local_addr="10.0.0.1",
                               local_port=lport, remote_addr=raddr, remote_port=rport,
                               state="TIME_WAIT", timer="timewait", timer_ms=left)
        return SimpleNamespace(diag=diag)

    rng = SimpleNamespace(low=32768, high=60999)
    sockets = [tw(80, "10.0.0.9", 40000 + i, 1000 * i) for i in range(1, 4)]
    sockets += [tw(40000 + i, "10.0.0.7", 5432, 30000) for i in range(5)]  # we connected out
    closer = SimpleNamespace(comm="nginx", pid=812)
    closers = {(1, "ipv4", "10.0.0.1", 80, "10.0.0.9", 40001): closer}
    view = timewait_view(sockets, closers, 1, {1: rng}, [], 0.0)
    assert view.total == 8 and view.attributed == 1
    keyed = {(r.port, r.remote, r.closer): (r.count, r.min_left_ms, r.max_left_ms)
             for r in view.rows}
    assert keyed == {
        ("ephemeral", "10.0.0.7:5432", "unknown"): (5, 30000, 30000),
        ("80", "10.0.0.9", "unknown"): (2, 2000, 3000),
        ("80", "10.0.0.9", "nginx[812]"): (1, 1000, 1000),
    }
    assert timewait_from_json(json.loads(json.dumps(timewait_to_json(view)))) == view


def test_group_views_forget_groups_that_are_gone():
    views = GroupViews()
    docs = lines("groups")
    for doc in docs:
        views.update(reading_from_json(doc))
    assert views._history
    assert views.update(reading_from_json({"groups": [], "events": []})) == []
    assert not views._history and not views._events


@pytest.mark.parametrize("value,peak,width,expected", [
    (0, 10, 4, "    "), (10, 10, 4, "████"), (5, 10, 4, "██  "), (1, 8, 4, "▌   "),
    (20, 10, 3, "███"),
])
def test_bars(value, peak, width, expected):
    assert bar(value, peak, width) == expected


def test_sparkline_scales_to_its_peak_and_keeps_the_latest():
    assert sparkline([0, 1, 2, 4], 10) == "▁▃▅█"
    assert sparkline(list(range(100)), 5)[-1] == "█" and len(sparkline(list(range(100)), 5)) == 5
    assert sparkline([0, 0], 4) == "▁▁" and sparkline([], 4) == ""


def test_table_layout_fits_the_width_and_hides_wide_only_columns():
    cols = [Column("A", 5), Column("B", 10, flex=1), Column("C", 10, flex=3),
            Column("D", 6, hide_below=100)]
    narrow = layout(cols, 80)
    assert [i for i, _ in narrow] == [0, 1, 2]
    assert sum(w for _, w in narrow) + len(narrow) - 1 == 80
    wide = layout(cols, 120)
    assert [i for i, _ in wide] == [0, 1, 2, 3] and sum(w for _, w in wide) + 3 == 120
    assert fit("abcdef", 4) == "abc…" and fit("ab", 4, right=True) == "  ab"
