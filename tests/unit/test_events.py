"""Decoding of raw ps_event records into CallEvent and its JSON form."""

import ctypes
import json
import socket

import pytest

from tracer.events import Clock, decode
from tracer.layout import (
    PsBlocker,
    PsCapture,
    PsEvent,
    PsEventBlocked,
    PsKind,
    PsOpt,
    PsPlan,
    PsQuality,
)
from tracer.records import CallEvent, Capture

JSON_KEYS = {
    "time", "call", "result", "errno", "pid", "tid", "uid", "sock_uid", "comm", "cgroup_id",
    "netns", "family", "protocol", "addr_family", "addr", "port", "bound_addr", "bound_port",
    "options", "bound_dev_if", "inode", "plan", "addr_unreadable", "get_port", "at_failure",
}


def raw_event(**fields: object) -> bytes:
    ev = PsEvent()
    defaults = dict(kind=PsKind.BIND, plan=PsPlan.TRACEPOINT, family=socket.AF_INET,
                    req_family=socket.AF_INET, protocol=socket.IPPROTO_TCP)
    for name, value in {**defaults, **fields}.items():
        if name in ("req_addr", "bound_addr"):
            getattr(ev, name)[: len(value)] = list(value)
        else:
            setattr(ev, name, value)
    return bytes(ev)


class FixedClock(Clock):
    def __init__(self) -> None:
        self.offset_ns = 1_000_000_000_000


def test_ipv4_failed_bind_decodes_every_field():
    raw = raw_event(
        ts_ns=5_000_000_000, pid=10, tid=11, uid=1000, sock_uid=1001, netns=4026531840,
        cgroup_id=77, sock_inode=12345, ret=-98, req_port=8080, bound_port=0,
        req_addr=socket.inet_aton("127.0.0.1"), opts=PsOpt.REUSEADDR | PsOpt.REUSEPORT,
        bound_dev_if=3, comm=b"nginx",
    )
    ev = decode(raw, FixedClock())
    assert ev.time == pytest.approx(1005.0)
    assert (ev.call, ev.pid, ev.tid, ev.uid, ev.sock_uid) == ("bind", 10, 11, 1000, 1001)
    assert (ev.netns, ev.cgroup_id, ev.inode, ev.comm) == (4026531840, 77, 12345, "nginx")
    assert (ev.family, ev.protocol, ev.addr, ev.port) == ("ipv4", "tcp", "127.0.0.1", 8080)
    assert ev.requested == "127.0.0.1:8080"
    assert (ev.errno, ev.errno_name, ev.ok) == (98, "EADDRINUSE", False)
    assert ev.options.names() == ["reuseaddr", "reuseport"]
    assert ev.options.bound_dev_if == 3
    assert ev.get_port is None and not ev.addr_unreadable


def test_ipv6_request_and_v4_mapped_address():
    mapped = socket.inet_pton(socket.AF_INET6, "::ffff:10.0.0.1")
    raw = raw_event(family=socket.AF_INET6, req_family=socket.AF_INET6, req_addr=mapped,
                    req_port=443, bound_addr=mapped, bound_port=443, opts=PsOpt.V6ONLY)
    ev = decode(raw, FixedClock())
    assert (ev.family, ev.addr_family, ev.addr) == ("ipv6", "ipv6", "::ffff:10.0.0.1")
    assert ev.requested == "[::ffff:10.0.0.1]:443" and ev.bound == "[::ffff:10.0.0.1]:443"
    assert ev.ok and ev.errno_name is None and ev.options.names() == ["v6only"]


def test_unspec_family_on_ipv4_socket_reads_as_ipv4_wildcard():
    ev = decode(raw_event(req_family=socket.AF_UNSPEC, req_port=80), FixedClock())
    assert (ev.addr_family, ev.addr, ev.port) == ("unspec", "0.0.0.0", 80)


def test_quality_flags():
    ev = decode(raw_event(quality=PsQuality.ADDR_UNREADABLE), FixedClock())
    assert ev.addr_unreadable
    seen = decode(raw_event(quality=PsQuality.GET_PORT_SEEN), FixedClock())
    refused = decode(raw_event(quality=PsQuality.GET_PORT_SEEN | PsQuality.GET_PORT_FAILED,
                               kind=PsKind.GET_PORT, plan=PsPlan.FENTRY), FixedClock())
    assert (seen.get_port, refused.get_port) == ("ok", "refused")
    assert (refused.call, refused.plan) == ("get_port", "fentry")


def test_json_keys_are_stable_and_serialisable():
    ev = decode(raw_event(ret=-99, kind=PsKind.CONNECT, protocol=socket.IPPROTO_UDP), FixedClock())
    doc = ev.to_json()
    assert set(doc) == JSON_KEYS
    assert (doc["call"], doc["result"], doc["errno"], doc["protocol"]) == (
        "connect", "EADDRNOTAVAIL", 99, "udp")
    json.dumps(doc)


def test_every_option_bit_has_a_name():
    all_bits = 0
    for flag in PsOpt:
        all_bits |= flag
    ev = decode(raw_event(opts=all_bits), FixedClock())
    assert len(ev.options.names()) == len(list(PsOpt))


def test_record_size_matches_layout():
    assert len(raw_event()) == ctypes.sizeof(PsEvent)


# ---- a refused bind: the event, then what held the port -------------------------------


def blocked_record(listeners: list[dict], others: list[dict], **header: object) -> bytes:
    """As the probe sends it: the kept sockets contiguous, listeners first,
    and the record cut after the last of them."""
    rec = PsEventBlocked()
    rec.event = PsEvent.from_buffer_copy(raw_event(ret=-98, req_port=80))
    bl = rec.blockers
    for i, fields in enumerate(listeners + others):
        b = bl.sock[i]
        b.sock.family, b.sock.protocol, b.sock.port = socket.AF_INET, socket.IPPROTO_TCP, 80
        for name, value in fields.items():
            target = b if name in ("raddr", "rport", "tw_substate", "binder_pid",
                                   "binder_comm") else b.sock
            if name in ("addr", "raddr"):
                getattr(target, name)[:4] = list(socket.inet_aton(value))
            else:
                setattr(target, name, value)
    bl.front, bl.back = len(listeners), len(others)
    for name, value in {"when": PsCapture.REFUSAL, "complete": 1, **header}.items():
        setattr(bl, name, value)
    unused = len(bl.sock) - len(listeners) - len(others)
    return bytes(rec)[:ctypes.sizeof(rec) - unused * ctypes.sizeof(PsBlocker)]


def test_a_blocked_record_carries_its_sockets_listeners_first():
    raw = blocked_record(
        listeners=[dict(state=10, addr="127.0.0.1", inode=7, cookie=99, binder_pid=42,
                    binder_comm=b"nginx\x1b[2J", opts=PsOpt.REUSEPORT)],
        others=[dict(state=6, addr="127.0.0.1", raddr="127.0.0.1", rport=5555, tw_substate=5),
              dict(state=1, addr="127.0.0.1", raddr="10.0.0.2", rport=6666, inode=8)],
        seen=9)
    ev = decode(raw, FixedClock())
    cap = ev.capture
    assert (cap.when, cap.seen, cap.complete) == ("refusal", 9, True)
    listener, orphan, conn = cap.sockets
    assert (listener.state, listener.local, listener.inode, listener.cookie) == (
        "LISTEN", "127.0.0.1:80", 7, 99)
    assert (listener.binder_pid, listener.options) == (42, frozenset({"reuseport"}))
    assert listener.binder_comm == "nginx\x1b[2J"  # kept as written; escaped where shown
    # A TIME_WAIT minisocket keeps the state it closed from, as sock_diag says it.
    assert (orphan.state, orphan.timewait, orphan.remote) == ("FIN_WAIT2", True,
                                                             "127.0.0.1:5555")
    assert (conn.state, conn.timewait, conn.binder_pid) == ("ESTABLISHED", False, 0)


def test_a_blocked_event_survives_its_json():
    ev = decode(blocked_record([dict(state=10, addr="0.0.0.0", binder_pid=3, binder_comm=b"x")],
                               [], seen=1), FixedClock())
    doc = json.loads(json.dumps(ev.to_json()))
    assert CallEvent.from_json(doc) == ev
    assert doc["at_failure"]["sockets"][0]["binder"] == {"pid": 3, "comm": "x"}


def test_plain_records_have_no_capture_and_unknown_captures_are_ignored():
    assert decode(raw_event(ret=-98), FixedClock()).capture is None
    raw = blocked_record([dict(state=10)], [], when=PsCapture.NONE)
    assert decode(raw, FixedClock()).capture is None


@pytest.mark.parametrize("damage", [
    "not a dict", {"when": "yesterday", "seen": 1, "sockets": []},
    {"when": "exit", "seen": "1", "sockets": []}, {"when": "exit", "seen": 1, "sockets": [3]},
    {"when": "exit", "seen": 1, "sockets": [{"protocol": "tcp"}]},
])
def test_a_damaged_capture_is_one_value_error(damage: object):
    with pytest.raises(ValueError):
        Capture.from_json(damage)


def test_a_capture_with_a_bad_address_is_one_value_error():
    ev = decode(blocked_record([dict(state=10)], []), FixedClock())
    doc = ev.to_json()
    doc["at_failure"]["sockets"][0]["local"] = "nowhere"
    with pytest.raises(ValueError):
        CallEvent.from_json(doc)


def test_a_blocked_record_is_cut_after_its_last_socket():
    full = [dict(state=1, addr="127.0.0.1")] * len(PsEventBlocked().blockers.sock)
    assert len(blocked_record([], full)) == ctypes.sizeof(PsEventBlocked)
    one = blocked_record([dict(state=10)], [])
    assert len(one) == ctypes.sizeof(PsEventBlocked) - (len(full) - 1) * ctypes.sizeof(PsBlocker)
    assert len(decode(one, FixedClock()).capture.sockets) == 1
    # A record claiming more sockets than it carries keeps those it carries.
    claims = blocked_record([dict(state=10)], [], back=5)
    assert len(decode(claims, FixedClock()).capture.sockets) == 1
