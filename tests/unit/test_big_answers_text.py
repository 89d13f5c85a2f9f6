"""How `ports` and `timewait` summarise big answers in text (the kernel
tests compare the counts with ss: tests/kernel/test_big_answers.py)."""

from __future__ import annotations

from tracer.inventory import Inventory
from tracer.ports import ALIKE, _timer_range, summarise
from tracer.timewait import Group, TimewaitReport, render


def tw_row(remote_port: int, left: float, owners: str = "-") -> tuple[str, ...]:
    return ("4026531840", "tcp4", "TIME_WAIT", "10.0.0.1:443", f"10.0.0.7:{remote_port}", "0/0",
            f"timewait:{left:.1f}s", "0", "0", "-", owners)


def test_rows_alike_but_for_the_remote_port_are_one_line():
    rows = [(tw_row(40000 + i, 5.0 + i), ()) for i in range(12)]
    listener = (("4026531840", "tcp4", "LISTEN", "10.0.0.1:443", "*", "0/128", "-", "0",
                 "77", "-", "nginx[812]"), ())
    out = summarise([listener, *rows])
    assert out[0] == listener
    [(cells, _)] = out[1:]
    assert cells[4] == "10.0.0.7:* x12" and cells[8] == "-"
    assert cells[6] == "timewait:5.0-16.0s"  # numerically, not as strings


def test_few_alike_rows_and_different_owners_stay_apart():
    few = [(tw_row(40000 + i, 1.0), ()) for i in range(ALIKE - 1)]
    assert summarise(few) == few
    mixed = [(tw_row(40000 + i, 1.0, owners=f"app[{i % 2 + 1}]"), ()) for i in range(10)]
    assert sorted(c[4] for c, _ in summarise(mixed)) == ["10.0.0.7:* x5", "10.0.0.7:* x5"]


def test_timer_ranges():
    assert _timer_range(["timewait:9.5s", "timewait:40.0s"]) == "timewait:9.5-40.0s"
    assert _timer_range(["-", "-"]) == "-"
    assert _timer_range(["keepalive:1.0s", "on:2.0s"]) == "various"


def test_timewait_top_sums_the_rest():
    groups = [Group(f"10.0.0.{i}", count=100 - i, min_left_ms=1000, max_left_ms=2000)
              for i in range(50)]
    r = TimewaitReport(total=sum(g.count for g in groups), attributed=0, collectors=0,
                       groups=groups, histogram=[("10", 0), ("60", 4_775)], pressure=[],
                       inventory=Inventory([]))
    text = render(r, "remote", top=3)
    assert "10.0.0.2 " in text and "10.0.0.3 " not in text
    rest = sum(g.count for g in groups[3:])
    assert "47 more group(s)" in text and f" {rest}  (--all" in text
    assert "10.0.0.49 " in render(r, "remote", top=None)
