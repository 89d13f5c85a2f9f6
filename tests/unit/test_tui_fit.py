"""How table cells are cut: the pid of ``name[pid]``, the port of an
address and a whole value (an errno, a state) are never cut, whatever the
width, the name's length or its characters (wide ones take two cells)."""

from __future__ import annotations

import random
import re

from rich.cells import cell_len

from tui.table import Column, fit_cell, fit_pid, fit_port, layout, least_width

CUT_PID = re.compile(r"\[\d+(?![\d\]])")  # "[1234" not followed by a digit or "]"
NAMES = ["nginx", "payments-api-v2", "決済サーバ", "a", "x" * 15, "envoy-worker-01"]
SUFFIXES = ["", " listener", " (payments-api-blue-green@eu-west-3.service)",
            " reuseport_other_uid (LISTEN)", " (+3 holding)"]


def owner_texts(rng: random.Random, n: int = 400) -> list[str]:
    texts = []
    for _ in range(n):
        owners = [f"{rng.choice(NAMES)}[{rng.randint(1, 4194304)}]"
                  for _ in range(rng.randint(1, 3))]
        texts.append(" ".join(owners) + rng.choice(SUFFIXES))
    return texts


def test_a_pid_is_never_cut_and_the_first_is_always_shown():
    rng = random.Random(7)
    for text in owner_texts(rng):
        first_pid = re.search(r"\[\d+\]", text).group()
        for width in range(least_width(text, "pid"), cell_len(text) + 2):
            out = fit_pid(text, width)
            assert cell_len(out) <= width, (text, width, out)
            assert first_pid in out, (text, width, out)
            assert not CUT_PID.search(out), (text, width, out)
            # every pid shown is one of the text's, whole
            assert set(re.findall(r"\[\d+\]", out)) <= set(re.findall(r"\[\d+\]", text))


def test_the_end_goes_before_the_name():
    assert fit_pid("python3[14093] listener, wildcard", 16) == "python3[14093]…"
    assert fit_pid("verylongprocessname[4194303]", 14) == "very…[4194303]"
    # a later owner that does not fit is left out whole, not half shown
    assert fit_pid("nginx[812] nginx[813] nginx[814]", 18) == "nginx[812]…"
    assert fit_pid("short[1]", 20) == "short[1]"


def test_a_port_is_never_cut():
    rng = random.Random(3)
    for _ in range(300):
        port = str(rng.randint(1, 65535))
        addr = rng.choice(["0.0.0.0", "127.0.0.1", "[2001:db8:1234:5678::1]",
                           "[::ffff:192.168.100.200]", "10.200.30.40"])
        text = f"{addr}:{port}"
        for width in range(least_width(text, "port"), len(text) + 2):
            out = fit_port(text, width)
            assert len(out) <= width and out.endswith(":" + port), (text, width, out)


def test_columns_that_keep_something_get_the_room_it_needs():
    cols = [Column("TIME", 8), Column("WHO", 8, flex=1, keep="pid"),
            Column("BLOCKED BY", 12, flex=3, keep="pid"), Column("NOTE", 20, flex=1)]
    who = "payments-api-v2[4194303]"
    need = least_width(who, "pid")
    assert need == len("p…[4194303]")
    widths = dict(layout(cols, 60, [0, need, need, 0]))
    assert widths[1] >= need and widths[2] >= need
    assert sum(widths.values()) + len(widths) - 1 <= 60
    # too narrow for everything: the column that keeps nothing gives way
    widths = dict(layout(cols, 44, [0, 24, 24, 0]))
    assert widths[1] == widths[2] == 24 and widths[3] < 20
    assert "[4194303]" in fit_cell(who, widths[1], cols[1])


def test_a_whole_value_widens_its_column():
    cols = [Column("RESULT", 6, keep="whole"), Column("REST", 4, flex=1)]
    need = least_width("EPROTONOSUPPORT", "whole")
    widths = dict(layout(cols, 40, [need, 0]))
    assert fit_cell("EPROTONOSUPPORT", widths[0], cols[0]).strip() == "EPROTONOSUPPORT"
