"""The record layer's codecs: what a source writes (a socket row, an event
row, a JSON line of trace, groups or report) is what every sink reads back,
field by field (hostile bytes included), and input damaged beyond use is
refused, never half-read."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest

from tracer import journal as jr
from tracer.balance import imbalance
from tracer.history import Row
from tracer.records import (
    EVENT_COLUMNS,
    SOCKET_COLUMNS,
    BlockerSummary,
    CallEvent,
    Capture,
    Captured,
    EventExplanation,
    Finding,
    Fix,
    Group,
    GroupsReading,
    Member,
    MemberEvent,
    Note,
    Options,
    Owner,
    Reason,
    RecordedCall,
    RecordedSnapshot,
    SocketRecord,
    reading_from_json,
)

NETNS = 4026531840
NGINX = Owner(812, "nginx", "/usr/sbin/nginx", "nginx: worker process", uid=33, user="www-data",
              cgroup="/system.slice/nginx.service", unit="nginx.service")
# An executable path that is not UTF-8 (kept as surrogates by tracer.text.system_text)
# and a name with control bytes: written by whoever runs the process.
HOSTILE = Owner(4242, "\x1b]2;PWND\x07", "/tmp/\udcff\udcfeevil", "x\ny", uid=1000,
                container="0123456789ab")
LISTENER = SocketRecord(NETNS, "tcp", "ipv6", "LISTEN", "::", 8443, 3, 33, 77, 0xFEED,
                        frozenset({"reuseport", "v6only"}), 0x1A2B, 2, True, (NGINX, HOSTILE))
UDP = SocketRecord(NETNS, "udp", "ipv4", "CLOSE", "127.0.0.1", 53, 0, 0, 78, 0xBEEF, None,
                   None, None, None, ())


def test_the_codec_writes_every_column_of_the_table() -> None:
    assert set(SOCKET_COLUMNS) <= set(jr.COLUMNS["snapshot_sockets"])
    assert len(LISTENER.to_row(repr)) == len(SOCKET_COLUMNS)


def test_a_socket_reads_back_from_the_journal_as_it_was_written(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    w = jr.JournalWriter(str(path))
    w.start_session("tracepoint", 2.0)
    w.add_snapshot(RecordedSnapshot(time.time(), 0.01, "periodic", [LISTENER, UDP], {}))
    w.commit()
    w.close()
    reader = jr.JournalReader(str(path))
    snap = reader.snapshots()[0]
    back = [SocketRecord.from_row(r) for r in reader.sockets_in(snap["id"], snap["session"])]
    assert sorted(back, key=lambda s: s.port) == [UDP, LISTENER]  # type: ignore[arg-type]
    assert not reader.damaged


def test_the_record_keeps_what_the_journal_keeps() -> None:
    gone = Owner(9, "svc", readable=False, problem="gone", pod="p0d")
    assert gone.kept() == Owner(9, "svc")
    assert list(gone.journal_json()) == ["pid", "comm", "exe", "cmdline", "uid", "user",
                                         "cgroup", "unit", "container", "accepts"]
    # Who accepts on a shared listener is kept; a journal without it reads as unknown.
    taker = Owner(9, "nginx", accepts=True)
    assert taker.kept().accepts is True
    assert Owner.from_journal(taker.journal_json()) == taker
    assert Owner.from_journal({"pid": 9, "comm": "nginx"}).accepts is None


def test_equal_states_are_one_record_and_rows_stay_apart() -> None:
    assert LISTENER == dataclasses.replace(LISTENER) and hash(LISTENER) == hash(
        dataclasses.replace(LISTENER))
    fields = {f.name: getattr(LISTENER, f.name) for f in dataclasses.fields(SocketRecord)}
    a, b = Row(**fields, id=1, session=1, first=1, last=2), Row(**fields, id=9, session=2,
                                                                   first=5, last=5)
    assert a != b and len({a, b}) == 2  # the same state in two sessions: two rows
    assert a.pids == [812, 4242] and a.local == "[::]:8443"
    assert a.identities == {("/usr/sbin/nginx", "/system.slice/nginx.service"),
                            ("/tmp/\udcff\udcfeevil", None)}


GOOD = {"netns": NETNS, "protocol": "tcp", "family": "ipv4", "state": "LISTEN",
        "addr": "0.0.0.0", "port": 80, "bound_dev_if": 0, "uid": 0, "inode": 5, "cookie": 6,
        "options": "reuseaddr", "group_id": None, "group_size": None, "group_bpf": None,
        "owners": [{"pid": 1, "comm": "init"}]}


@pytest.mark.parametrize("damage", [
    {"protocol": "sctp"},
    {"family": "ipv6"},  # 0.0.0.0 is not an IPv6 address
    {"addr": "not-an-address"},
    {"addr": 7},
    {"port": 70000},
    {"port": -1},
    {"owners": {"pid": 1}},
    {"owners": [{"comm": "no pid"}]},
    {"owners": [{"pid": "1"}]},
    {"owners": [{"pid": 1, "comm": ["not", "text"]}]},
    {"owners": [{"pid": 1, "uid": "root"}]},
    {"owners": [{"pid": 1}, "not an owner"]},
], ids=lambda d: ",".join(f"{k}={v!r}" for k, v in d.items()))
def test_a_row_damaged_beyond_use_is_refused(damage: dict) -> None:
    assert SocketRecord.from_row(GOOD) is not None
    assert SocketRecord.from_row({**GOOD, **damage}) is None


def test_a_row_outside_any_group_has_no_group_facts() -> None:
    rec = SocketRecord.from_row({**GOOD, "group_id": 0, "group_size": 3, "group_bpf": 1})
    assert rec is not None and (rec.group, rec.group_size, rec.group_bpf) == (None, None, None)
    assert rec.options == frozenset({"reuseaddr"})
    assert SocketRecord.from_row({**GOOD, "options": ""}).options == frozenset()  # type: ignore[union-attr]


# ---- calls and explanations ------------------------------------------------------------

HELD = Captured("tcp", "ipv6", "LISTEN", "::", 8443, "::", 0, 0xFEED, 77, 33, NETNS,
                frozenset({"reuseport"}), 0, 812, "\x1b[2Jnginx")
CALL = CallEvent(1.7e9, "bind", 4242, 4243, 1000, 1000, "\x1b]2;PWND\x07", 99, NETNS, "ipv6",
                 "tcp", "ipv6", "::", 8443, "::", 0, Options(frozenset({"reuseport"}), 0), 91,
                 98, "tracepoint", False, None, Capture("exit", 3, False, (HELD,)))
SAID = EventExplanation(
    # (how the addresses overlap, and the rule's sentence, are shown live only:
    # trace --json and the journal keep the blocker's identity, state and rule)
    (BlockerSummary((812,), "nginx", "LISTEN", "[::]:8443", "reuseport_other_uid",
                    remote="[::]:0"),),
    reasons=(Reason("EADDRINUSE", "conflict", {"blockers": 1}),),
    fixes=(Fix("uid", "process", {"uid": 33, "for": "conflict"}),),
    notes=(Note("flags_unknown", {"sockets": 2}),))


def test_a_call_reads_back_from_its_json() -> None:
    assert CallEvent.from_json(CALL.to_json()) == CALL


def test_an_explanation_reads_back_from_its_json_with_its_sentences() -> None:
    back = EventExplanation.from_json(SAID.blockers_json(), SAID.to_json())
    assert back == SAID
    assert back is not None and back.fix_texts == SAID.fix_texts and back.rule == "conflict"
    # A sentence read back is the one written, even for a kind this version lacks.
    odd = Fix.from_json({"kind": "from_the_future", "target": "kernel", "params": {},
                         "text": "upgrade"})
    assert odd.text == "upgrade"
    error = EventExplanation(error="the socket's namespace is gone")
    assert EventExplanation.from_json(error.blockers_json(), error.to_json()) == error
    assert EventExplanation.from_json(None, None) is None


def test_a_call_reads_back_from_the_journal_as_it_was_written(tmp_path: Path) -> None:
    assert set(EVENT_COLUMNS) <= set(jr.COLUMNS["events"])
    w = jr.JournalWriter(str(tmp_path / "j.db"))
    w.start_session("tracepoint", 2.0)
    w.add_calls([(CALL, HOSTILE, SAID)])
    w.commit()
    w.close()
    reader = jr.JournalReader(str(tmp_path / "j.db"))
    (row,) = reader.events()
    back = RecordedCall.from_row(row)
    assert back is not None and not reader.damaged
    assert (back.time, back.call, back.pid, back.comm, back.addr, back.port, back.options,
            back.inode) == (CALL.time, "bind", 4242, CALL.comm, "::", 8443,
                            frozenset({"reuseport"}), 91)
    assert (back.exe, back.cgroup, back.owner_uid) == (HOSTILE.exe, None, 1000)
    assert back.explanation == SAID and back.blockers == SAID.blockers
    assert CallEvent.from_json(row["json"]) == CALL


@pytest.mark.parametrize("damage", [
    {"call": "accept"}, {"protocol": "sctp"}, {"bound_addr": "x"}, {"port": 70000},
    {"blockers": "not a list"}, {"explanation": {"reasons": "not a list"}},
    {"explanation": {"reasons": [{"errno": "EADDRINUSE", "rule": 5, "text": "x"}]}},
], ids=lambda d: ",".join(f"{k}={v!r}" for k, v in d.items()))
def test_an_event_row_damaged_beyond_use_is_refused(damage: dict) -> None:
    good = {"id": 1, "session": 1, "time": 1.0, "call": "bind", "result": "ok", "errno": 0,
            "pid": 1, "uid": 0, "sock_uid": 0, "comm": "x", "netns": NETNS, "family": "ipv4",
            "protocol": "tcp", "addr_family": "ipv4", "addr": "0.0.0.0", "port": 80,
            "bound_addr": "0.0.0.0", "bound_port": 80, "options": "", "bound_dev_if": 0,
            "inode": 5, "exe": None, "cgroup": None, "owner_uid": None, "blockers": None,
            "explanation": None}
    assert RecordedCall.from_row(good) is not None
    assert RecordedCall.from_row({**good, **damage}) is None


# ---- groups and findings --------------------------------------------------------------


def test_a_groups_reading_reads_back_from_its_json() -> None:
    members = [Member(0xC0 + i, 70 + i, "LISTEN", (NGINX,) if i else (HOSTILE,), 10 * i,
                      float(i), 10 * i, None, i, 128) for i in range(3)]
    group = Group(0x1A2B3C4D, NETNS, "tcp", "ipv4", "0.0.0.0", 8080, 0, 3, False, members, 9.5,
                  imbalance([0, 10, 20], 9.5))
    left = MemberEvent(1.7e9, "leave", group.id, NETNS, "tcp", "ipv4", "0.0.0.0", 8080, 0xC9, 79,
                       (NGINX,), 42)
    reading = GroupsReading(1.7e9, 1.0, "tracepoint", [group], [left], {"map_full": 0})
    doc = reading.to_json()
    back = reading_from_json(doc)
    assert back.to_json() == doc
    assert back.groups[0].id == group.id and back.groups[0].members[0].owners == (HOSTILE,)
    with pytest.raises(ValueError):
        reading_from_json({"groups": [{"id": "zz", "members": []}]})


def test_a_finding_reads_back_from_its_json() -> None:
    f = Finding("udp_shared", 1.7e9, NETNS, "udp", 53, [4242], [812], "shared",
                [{"type": "event", "id": 1}], ["a note"])
    assert Finding.from_json(f.to_json()) == f
    with pytest.raises(ValueError):
        Finding.from_json({**f.to_json(), "kind": "made_up"})
