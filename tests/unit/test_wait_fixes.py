"""Which fixes the explainer offers when only sockets nobody holds block a
bind: waiting always, destroying them (``ss -K``) only where the kernel frees
them. What the kernel frees is asked of it (tracer/sockdestroy.py, proven
against ``ss -K`` in tests/kernel/test_sockdestroy.py and, bind by bind, in
the explainer matrix); here the answer is given, to see each decision."""

from __future__ import annotations

import pytest

from tracer import sockdestroy
from tracer.explain import Request, explain_captured
from tracer.inventory import Inventory, Socket
from tracer.sockdiag import SockRecord

NETNS = 4026531840


def waiting(state: str, timer: str, rport: int) -> Socket:
    rec = SockRecord(NETNS, "tcp", "ipv4", state, "127.0.0.1", 8080, "127.0.0.1", rport,
                     0, 0, timer, 30_000, 0, 0, rport, 0)
    return Socket(rec, None, ())


def kinds(able: sockdestroy.Destroyable | None, *blockers: Socket,
          monkeypatch: pytest.MonkeyPatch) -> tuple[set[str], dict[str, object]]:
    monkeypatch.setattr(sockdestroy, "destroyable", lambda: able)
    ex = explain_captured(Request(port=8080, protocol="tcp", addr="127.0.0.1"),
                          Inventory(list(blockers)))
    assert ex.errno == "EADDRINUSE" and len(ex.blockers) == len(blockers)
    notes = {n.kind: n.params for n in ex.notes}
    return {f.kind for f in ex.fixes}, notes


TW = waiting("TIME_WAIT", "timewait", 5000)
ORPHAN = waiting("FIN_WAIT1", "on", 5001)


@pytest.mark.parametrize("able", [sockdestroy.Destroyable(True, True), None])
def test_destroy_is_offered_where_the_kernel_frees_them_or_cannot_be_asked(
        able: sockdestroy.Destroyable | None, monkeypatch: pytest.MonkeyPatch) -> None:
    fixes, notes = kinds(able, TW, ORPHAN, monkeypatch=monkeypatch)
    assert {"wait", "destroy_socket"} <= fixes and "destroy_keeps" not in notes


def test_a_kernel_that_keeps_time_wait_gets_no_destroy_and_a_note(
        monkeypatch: pytest.MonkeyPatch) -> None:
    fixes, notes = kinds(sockdestroy.Destroyable(False, True), TW, ORPHAN,
                         monkeypatch=monkeypatch)
    assert "wait" in fixes and "destroy_socket" not in fixes
    assert notes["destroy_keeps"] == {"states": ["TIME_WAIT"]}


def test_what_the_kernel_frees_is_judged_per_kind_of_blocker(
        monkeypatch: pytest.MonkeyPatch) -> None:
    fixes, _ = kinds(sockdestroy.Destroyable(True, False), TW, monkeypatch=monkeypatch)
    assert "destroy_socket" in fixes  # the orphans it keeps are not among the blockers
    fixes, notes = kinds(sockdestroy.Destroyable(True, False), ORPHAN, monkeypatch=monkeypatch)
    assert "destroy_socket" not in fixes and notes["destroy_keeps"] == {"states": ["FIN_WAIT1"]}
