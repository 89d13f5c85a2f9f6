"""Decoding of raw ps_event records into CallEvent and its JSON form."""

import ctypes
import json
import socket

import pytest

from tracer.events import Clock, decode
from tracer.layout import PsEvent, PsKind, PsOpt, PsPlan, PsQuality

JSON_KEYS = {
    "time", "call", "result", "errno", "pid", "tid", "uid", "sock_uid", "comm", "cgroup_id",
    "netns", "family", "protocol", "addr_family", "addr", "port", "bound_addr", "bound_port",
    "options", "bound_dev_if", "inode", "plan", "addr_unreadable", "get_port",
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
