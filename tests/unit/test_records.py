"""The socket record's one row codec: what the recorder writes is what the
report's rules and replay read back, field by field (hostile bytes
included), and a row damaged beyond use is refused, never half-read."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest

from tracer import journal as jr
from tracer.history import Row
from tracer.records import SOCKET_COLUMNS, Owner, SocketRecord

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
    w.add_snapshot(jr.RecordedSnapshot(time.time(), 0.01, "periodic", [LISTENER, UDP], {}))
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
                                         "cgroup", "unit", "container"]


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
