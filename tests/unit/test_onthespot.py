"""How the sockets the probe read at a refusal join the sockets alive when
the explanation is made (tracer/onthespot.py). The kernel-side proof is
tests/kernel/test_blocker_capture.py; here the joining rules, case by case."""

from __future__ import annotations

from tracer.inventory import Inventory, Socket
from tracer.onthespot import _no_blocker_note, with_capture
from tracer.records import Capture, Captured
from tracer.sockdiag import SockRecord

NETNS = 4026531840


def captured(state: str = "LISTEN", cookie: int = 0, inode: int = 0, rport: int = 0,
             timewait: bool = False, pid: int = 0) -> Captured:
    return Captured("tcp", "ipv4", state, "127.0.0.1", 8080, "127.0.0.1" if rport else "0.0.0.0",
                    rport, cookie, inode, 0, NETNS, frozenset(), 0, pid, "old" if pid else "",
                    timewait)


def live(state: str = "LISTEN", cookie: int = 0, inode: int = 0, rport: int = 0) -> Socket:
    rec = SockRecord(NETNS, "tcp", "ipv4", state, "127.0.0.1", 8080,
                     "127.0.0.1" if rport else "0.0.0.0", rport, 0, 0, None, 0, 0, inode, cookie, 0)
    return Socket(rec, None, ())


def capture(*sockets: Captured, seen: int | None = None, complete: bool = True) -> Capture:
    return Capture("refusal", len(sockets) if seen is None else seen, complete, sockets)


def test_a_socket_still_there_is_not_added_twice() -> None:
    inv = Inventory([live(cookie=7, inode=70), live("TIME_WAIT", cookie=8, rport=5000)])
    got = with_capture(inv, capture(captured(cookie=7, inode=70),
                                    captured("TIME_WAIT", rport=5000, timewait=True)))
    assert len(got.sockets) == 2 and not any(s.gone for s in got.sockets)


def test_a_cookie_assigned_after_the_refusal_still_matches_by_inode() -> None:
    # The probe read the socket before sock_diag gave it a cookie.
    got = with_capture(Inventory([live(cookie=9, inode=70)]), capture(captured(inode=70)))
    assert len(got.sockets) == 1


def test_a_connection_that_became_time_wait_is_the_same_connection() -> None:
    got = with_capture(Inventory([live("TIME_WAIT", rport=5000)]),
                       capture(captured("FIN_WAIT2", rport=5000, timewait=True)))
    assert len(got.sockets) == 1


def test_a_socket_gone_since_is_added_with_the_process_that_bound_it() -> None:
    got = with_capture(Inventory([]), capture(captured(inode=70, pid=2 ** 22 - 1)))
    (s,) = got.sockets
    assert s.gone and s.diag.inode == 70 and s.diag.state == "LISTEN"
    (owner,) = s.owners
    assert (owner.pid, owner.comm, owner.readable, owner.problem) == (
        2 ** 22 - 1, "old", False, "gone")


def test_a_socket_nobody_holds_any_more_is_named_by_its_binder() -> None:
    # Its holder closed it between the inventory's two reads (the sockets,
    # then who holds them): still there, no process; the probe knew who bound it.
    got = with_capture(Inventory([live(cookie=7, inode=70)]),
                       capture(captured(cookie=7, inode=70, pid=2 ** 22 - 1)))
    (s,) = got.sockets
    assert not s.gone and [o.pid for o in s.owners] == [2 ** 22 - 1]
    # A socket whose holder was read keeps it; one without a binder stays unowned.
    held = Socket(live(cookie=8, inode=80).diag, None, got.sockets[0].owners)
    got = with_capture(Inventory([held, live(cookie=9, inode=90)]),
                       capture(captured(cookie=8, inode=80, pid=5), captured(cookie=9, inode=90)))
    assert [[o.pid for o in s.owners] for s in got.sockets] == [[2 ** 22 - 1], []]


def test_a_time_wait_gone_since_keeps_its_kind() -> None:
    (s,) = with_capture(Inventory([]), capture(captured("FIN_WAIT2", rport=5000,
                                                        timewait=True))).sockets
    assert s.gone and s.diag.timer == "timewait" and not s.owners


def test_why_no_blocker_is_left() -> None:
    assert _no_blocker_note(None).kind == "blocker_gone"
    assert _no_blocker_note(capture()).kind == "blocker_gone"
    crowded = _no_blocker_note(capture(captured(), seen=20))
    assert crowded.kind == "blocker_not_kept" and crowded.params["seen"] == 20
    assert _no_blocker_note(capture(captured(), complete=False)).kind == "blocker_not_kept"
    assert _no_blocker_note(capture(captured())).kind == "rules_disagree"
