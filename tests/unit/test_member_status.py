"""What `portscope groups` concludes about each member and group, from
figures (no privileges needed): the stable group id, a member's status
between two reads, the balance's most and least served members and causes,
and who waits on a socket as /proc shows it. The kernel-facing halves are
proven in tests/kernel/test_groups.py and test_real_servers.py."""

from __future__ import annotations

import dataclasses
import socket

import pytest

from tracer.acceptors import _pairs
from tracer.balance import imbalance
from tracer.groups import group_lines
from tracer.records import Acceptor, Group, Member, Owner, reading_from_json
from tracer.records.groups import GroupsReading
from tracer.reuseport import _causes, _Seen, member_status
from tracer.sockflags import group_id

V4 = socket.AF_INET
V6 = socket.AF_INET6
LOOPBACK = socket.inet_aton("127.0.0.1") + bytes(12)
WORKER = Owner(pid=812, comm="nginx")
MASTER = Owner(pid=800, comm="nginx")


def test_group_id_depends_on_what_makes_a_group_and_nothing_else() -> None:
    base = (4026531840, socket.IPPROTO_TCP, V4, LOOPBACK, 8080, 0, 33, False)
    same = group_id(*base)
    assert same == group_id(*base) != 0
    # The 12 bytes after an IPv4 address are not part of it.
    assert group_id(*base[:3], socket.inet_aton("127.0.0.1") + b"\xff" * 12, *base[4:]) == same
    for i, other in ((0, 4026532000), (1, socket.IPPROTO_UDP), (2, V6), (4, 8081), (5, 3),
                     (6, 1000), (7, True)):
        changed = list(base)
        changed[i] = other
        assert group_id(*changed) != same, f"field {i} does not change the id"


def member(**kw: object) -> Member:
    fields = dict(cookie=1, inode=70, state="LISTEN", owners=(MASTER, WORKER), delivered=100,
                  rate=1.0, window=100, share=0.5, queue=0, backlog=128,
                  acceptors=(Acceptor(WORKER, 812, "epoll"),), drops=0)
    fields.update(kw)
    return Member(**fields)  # type: ignore[arg-type]


def seen(queue: int, delivered: int, drops: int | None = 0) -> _Seen:
    return _Seen(None, None, delivered, queue, drops)  # type: ignore[arg-type]


def test_a_healthy_member_is_ok() -> None:
    m = member(queue=3, delivered=150)
    assert member_status(m, seen(2, 100), 1.0, set()) == ("ok", ())


def test_stopped_worker_is_named_even_before_anything_waits() -> None:
    status, problems = member_status(member(), None, None, {812})
    assert status == "stopped" and "nginx[812] is stopped" in problems[0]
    # The master holds it but does not take its connections: not stopped
    # because only the master is.
    assert member_status(member(), None, None, {800})[0] == "ok"
    # Without a known taker, every holder must be stopped.
    assert member_status(member(acceptors=()), None, None, {800})[0] == "ok"
    assert member_status(member(acceptors=()), None, None, {800, 812})[0] == "stopped"


def test_connections_waiting_through_an_interval_with_none_taken() -> None:
    # 5 waited, 20 arrived, 25 wait: nothing left the queue.
    status, problems = member_status(member(queue=25, delivered=120), seen(5, 100), 1.0, set())
    assert status == "not_accepting" and "accepted nothing in the last 1.0 s" in problems[0]
    # One left it: accepting, slowly.
    assert member_status(member(queue=24, delivered=120), seen(5, 100), 1.0, set())[0] == "ok"
    # Nothing waited at the start of the interval: too early to say.
    assert member_status(member(queue=20, delivered=120), seen(0, 100), 1.0, set())[0] == "ok"


def test_drops_since_the_last_read_and_a_full_queue() -> None:
    status, problems = member_status(member(queue=128, drops=7, delivered=140),
                                     seen(128, 133, 0), 2.0, set())
    assert status == "dropping" and problems[0].startswith("refused 7 connection(s) in the last 2.0 s")
    # Drops are not deliveries that wait: 128 waited, 7 came and were dropped.
    assert len(problems) == 2 and "accepted nothing" in problems[1]
    assert member_status(member(queue=128, drops=0), seen(0, 100), 1.0, set())[0] == "dropping"
    udp = member(backlog=None, queue=4096, drops=3)
    assert member_status(udp, seen(4096, 100, 1), 1.0, set())[1][0].startswith(
        "dropped 2 datagram(s)")


def test_worst_status_first() -> None:
    status, problems = member_status(member(queue=128, drops=9), seen(128, 100, 1), 1.0, {812})
    assert status == "stopped" and len(problems) == 3


def group(members: list[Member], bpf: bool = False) -> Group:
    members = [dataclasses.replace(m, share=m.window / sum(x.window for x in members))
               for m in members]
    return Group(0x1A2B3C4D, 4026531840, "tcp", "ipv4", "127.0.0.1", 8080, 0, len(members), bpf,
                 members, 10.0, imbalance([m.window for m in members], 10.0),
                 _causes(bpf, members))


def test_balance_names_the_most_and_least_served_and_says_chance() -> None:
    workers = [Owner(pid=900 + i, comm="nginx") for i in range(3)]
    ms = [member(inode=70 + i, window=w, owners=(MASTER, workers[i]),
                 acceptors=(Acceptor(workers[i], 900 + i, "epoll"),))
          for i, w in enumerate((300, 100, 200))]
    g = group(ms)
    text = g.balance_text()
    assert "uneven" in text
    assert "most: nginx[900] (inode 70) got 300, 1.50x its even share" in text
    assert "least: nginx[901] (inode 71) got 100, 0.50x its even share" in text
    assert "no structural cause seen" in text
    b = g.balance()
    assert b["cause"] == "unexplained" and b["most"]["inode"] == 70 and b["least"]["inode"] == 71
    even = group([dataclasses.replace(m, window=200) for m in ms])
    assert even.balance()["cause"] == "chance" and "even" in even.balance_text()


def test_balance_says_structure_for_a_bpf_selector_and_an_unserved_member() -> None:
    ms = [member(inode=70, window=500), member(inode=71, window=0, status="stopped",
                                               acceptors=(Acceptor(MASTER, 800, "epoll"),))]
    g = group(ms, bpf=True)
    assert g.balance()["cause"] == "structure"
    assert "a reuseport BPF program chooses the member" in g.balance_text()
    assert "nginx[800] (inode 71) is stopped" in g.balance_text()
    assert [m.inode for m in g.flagged] == [71]


def test_text_output_names_the_taker_and_keeps_the_holders_apart() -> None:
    ms = [member(inode=70), member(inode=71, acceptors=(), status="not_accepting",
                                   problems=("accepted nothing \x1b[31m",))]
    lines = "\n".join(group_lines(group(ms)))
    assert "nginx[812]" in lines.splitlines()[2]
    assert "nginx[800] nginx[812] *" in lines  # no taker seen: its holders, marked
    assert "held by (fds): nginx[800] nginx[812]" in lines
    assert "! inode 71: accepted nothing \\x1b[31m" in lines  # escaped
    assert "\x1b" not in lines


def test_members_read_back_from_json_with_takers_and_status() -> None:
    ms = [member(acceptors=(Acceptor(WORKER, 815, "accept"),), status="dropping",
                 problems=("refused 3",), drops=3)]
    reading = GroupsReading(1.7e9, 1.0, "fentry", [group(ms)], [], {})
    back = reading_from_json(reading.to_json())
    assert back.to_json() == reading.to_json()
    (m,) = back.groups[0].members
    assert m.acceptors[0].tid == 815 and m.acceptors[0].label() == "nginx[812] thread 815"
    assert m.status == "dropping" and m.drops == 3
    with pytest.raises(ValueError):
        reading_from_json({"groups": [{**reading.to_json()["groups"][0],
                                       "members": [{**ms[0].to_json(), "acceptors": "x"}]}]})


def test_epoll_fdinfo_lines_are_read_by_name() -> None:
    line = b"tfd:        5 events:       19 data:                5  pos:0 ino:6f2a sdev:8"
    fields = dict(_pairs(line))
    assert fields[b"tfd"] == b"5" and fields[b"events"] == b"19" and fields[b"ino"] == b"6f2a"


def test_the_ui_flags_a_member_not_served_in_its_row_and_detail() -> None:
    from tracer.views import GroupViews
    from tui.groups import detail, group_row

    ms = [member(inode=70, window=300, owners=(MASTER, WORKER)),
          member(inode=71, window=280, status="stopped", acceptors=(Acceptor(MASTER, 800, "epoll"),),
                 problems=("nginx[800] is stopped (SIGSTOP or a debugger); 9 wait",))]
    reading = GroupsReading(1.7e9, 1.0, "fentry", [group(ms)], [], {})
    (view,) = GroupViews().update(reading)
    row = group_row(view)
    assert "1 stopped" in row.cells and row.style == "error"
    text = detail(view, 100).plain
    assert "! inode 71 stopped: nginx[800] is stopped (SIGSTOP or a debugger); 9 wait" in text
    assert "SERVED BY" in text and "held by   nginx[800] nginx[812]" in text
    assert "balance   over" in text
