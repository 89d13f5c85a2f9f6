"""tracer.netprogs without the kernel: the run-array rule of combine(), the
JSON form of a program (and its refusal of damaged records), and the
struct bpf_sk_lookup a test run is given. What the kernel really does with
several programs is proven in tests/kernel/test_netprogs.py."""

from __future__ import annotations

import socket
import struct

import pytest

from tracer.netprogs import (
    LookupRun,
    NetProgram,
    combine,
    lookup_context,
)


def prog(n: int) -> NetProgram:
    return NetProgram("sk_lookup", n, f"p{n}", "0123456789abcdef", 4026531840, None, 100 + n,
                      n - 1)


def run(n: int, verdict: str, cookie: int | None = None) -> LookupRun:
    return LookupRun(prog(n), verdict, cookie, "why" if verdict == "unknown" else "")


def outcome(*runs: LookupRun) -> tuple[str, int | None, int | None]:
    o = combine(list(runs))
    assert o.runs == tuple(runs)
    return o.verdict, o.cookie, o.decided_by.prog_id if o.decided_by else None


def test_no_program_and_no_selection_pass_to_the_kernel() -> None:
    assert outcome() == ("pass", None, None)
    assert outcome(run(1, "pass"), run(2, "pass")) == ("pass", None, None)


def test_the_last_selection_wins() -> None:
    assert outcome(run(1, "pass", 11), run(2, "pass", 22), run(3, "pass")) == ("pass", 22, 2)


def test_a_drop_drops_unless_something_is_selected() -> None:
    assert outcome(run(1, "pass"), run(2, "drop"), run(3, "drop")) == ("drop", None, 2)
    assert outcome(run(1, "drop"), run(2, "pass", 22)) == ("pass", 22, 2)
    assert outcome(run(1, "pass", 11), run(2, "drop")) == ("pass", 11, 1)


def test_unknown_runs() -> None:
    # Anything could have come from the unknown run.
    assert outcome(run(1, "unknown")) == ("unknown", None, None)
    assert outcome(run(1, "pass", 11), run(2, "unknown")) == ("unknown", None, None)
    assert outcome(run(1, "drop"), run(2, "unknown")) == ("unknown", None, None)
    # A known selection after the last unknown run decides.
    assert outcome(run(1, "unknown"), run(2, "drop"), run(3, "pass", 33)) == ("pass", 33, 3)


GOOD = prog(1).to_json()


def test_json_round_trip() -> None:
    assert NetProgram.from_json(GOOD) == prog(1)
    cg = NetProgram("connect4", 7, "x", "ffffffffffffffff", None, "/system.slice/a.service",
                    None, 0)
    assert NetProgram.from_json(cg.to_json()) == cg


@pytest.mark.parametrize("damage", [
    {"kind": "xdp"}, {"prog_id": 0}, {"prog_id": -1}, {"prog_id": "5"}, {"prog_id": True},
    {"order": -1}, {"order": 1.5}, {"name": 5}, {"name": "x" * 65}, {"tag": "0123"},
    {"tag": "0123456789ABCDEF"}, {"tag": None}, {"netns": "x"}, {"netns": None},
    {"cgroup": "/x"}, {"link_id": -3}, {"link_id": 1 << 64},
])
def test_from_json_refuses_damage(damage: dict) -> None:
    with pytest.raises(ValueError):
        NetProgram.from_json({**GOOD, **damage})


@pytest.mark.parametrize("bad", [None, [], "x", {}, {k: v for k, v in GOOD.items() if k != "tag"}])
def test_from_json_refuses_what_is_no_program(bad: object) -> None:
    with pytest.raises(ValueError):
        NetProgram.from_json(bad)  # type: ignore[arg-type]


def test_lookup_context_layout() -> None:
    ctx = lookup_context("udp", "ipv4", ("10.0.0.1", 5353), ("10.0.0.2", 53), 3)
    assert len(ctx) == 72
    cookie, family, proto = struct.unpack_from("<QII", ctx, 0)
    assert (cookie, family, proto) == (0, socket.AF_INET, socket.IPPROTO_UDP)
    assert ctx[16:20] == bytes([10, 0, 0, 1]) and ctx[36:40] == b"\x14\xe9\0\0"  # network order
    assert ctx[40:44] == bytes([10, 0, 0, 2])
    assert struct.unpack_from("<II", ctx, 60) == (53, 3)  # local_port host order, ifindex
    v6 = lookup_context("tcp", "ipv6", ("::1", 1), ("2001:db8::2", 443))
    assert v6[20:36] == socket.inet_pton(socket.AF_INET6, "::1") and v6[16:20] == bytes(4)
    assert v6[44:60] == socket.inet_pton(socket.AF_INET6, "2001:db8::2")
    with pytest.raises(ValueError):
        lookup_context("tcp", "ipv4", ("::1", 1), ("127.0.0.1", 1))
