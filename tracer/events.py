"""The probes' ring buffer, decoded: ``decode()`` turns one raw ps_event
record into a :class:`~tracer.records.CallEvent` (the record, with its JSON
codec, is in tracer/records/calls.py)."""

from __future__ import annotations

import ctypes
import functools
import socket
import time

from .layout import (
    PsBlocker,
    PsCapture,
    PsEvent,
    PsEventBlocked,
    PsKind,
    PsPlan,
    PsQuality,
)
from .records import (
    FAMILIES,
    OPTION_NAMES,
    PROTOCOLS,
    TCP_STATES,
    CallEvent,
    Capture,
    Captured,
    Options,
)
from .text import system_text


def _ntop(family: int, raw: bytes) -> str:
    if family == socket.AF_INET6:
        return socket.inet_ntop(socket.AF_INET6, raw)
    return socket.inet_ntop(socket.AF_INET, raw[:4])


class Clock:
    """Converts the kernel's boot-time nanoseconds to wall-clock seconds."""

    def __init__(self) -> None:
        self.offset_ns = time.time_ns() - time.clock_gettime_ns(time.CLOCK_BOOTTIME)

    def wall(self, boot_ns: int) -> float:
        return (boot_ns + self.offset_ns) / 1e9


# Lookup tables built once: enum construction per event costs more than the
# rest of decoding (bench-trace decodes tens of thousands per second).
_KIND_NAMES = {int(k): k.name.lower() for k in PsKind}
_PLAN_NAMES = {int(p): p.name.lower() for p in PsPlan}
_SEEN, _REFUSED, _UNREADABLE = (int(PsQuality.GET_PORT_SEEN), int(PsQuality.GET_PORT_FAILED),
                                int(PsQuality.ADDR_UNREADABLE))


@functools.lru_cache(maxsize=1024)
def _options(bits: int, bound_dev_if: int) -> Options:
    return Options(frozenset(name for flag, name in OPTION_NAMES.items() if bits & flag),
                   bound_dev_if)


_CAPTURE_NAMES = {int(PsCapture.REFUSAL): "refusal", int(PsCapture.EXIT): "exit"}
_EVENT_SIZE = ctypes.sizeof(PsEvent)
_BLOCKED_SIZE = ctypes.sizeof(PsEventBlocked)
_BLOCKER_SIZE = ctypes.sizeof(PsBlocker)
_SOCKETS_AT = _BLOCKED_SIZE - _BLOCKER_SIZE * len(PsEventBlocked().blockers.sock)


_TIME_WAIT = 6


def _captured(b: PsBlocker) -> Captured:
    s = b.sock
    family = FAMILIES.get(s.family, str(s.family))
    timewait = s.protocol == socket.IPPROTO_TCP and s.state == _TIME_WAIT
    state = b.tw_substate if timewait and b.tw_substate else s.state
    return Captured(
        protocol=PROTOCOLS.get(s.protocol, str(s.protocol)), family=family,
        state=TCP_STATES.get(state, str(state)),  # UDP too: CLOSE or ESTABLISHED
        timewait=timewait,
        addr=_ntop(s.family, bytes(s.addr)), port=s.port,
        remote_addr=_ntop(s.family, bytes(b.raddr)), remote_port=b.rport,
        cookie=s.cookie, inode=s.inode, uid=s.sock_uid, netns=s.netns,
        options=_options(s.opts, 0).flags, bound_dev_if=s.bound_dev_if,
        binder_pid=b.binder_pid, binder_comm=system_text(b.binder_comm) if b.binder_pid else "",
    )


def _capture(raw: bytes) -> Capture | None:
    """The blockers after the event in a longer record (cut after the last
    socket kept), or None."""
    if len(raw) < _SOCKETS_AT:
        return None
    bl = PsEventBlocked.from_buffer_copy(raw[:_BLOCKED_SIZE].ljust(_BLOCKED_SIZE, b"\0")).blockers
    when = _CAPTURE_NAMES.get(bl.when)
    if when is None:
        return None
    present = (min(len(raw), _BLOCKED_SIZE) - _SOCKETS_AT) // _BLOCKER_SIZE
    kept = min(bl.front + bl.back, present)
    return Capture(when, bl.seen, bool(bl.complete),
                   tuple(_captured(bl.sock[i]) for i in range(kept)))


def decode(raw: bytes, clock: Clock) -> CallEvent:
    """One ring-buffer record: a struct ps_event, or a struct ps_event_blocked
    (the event of a refused bind or listen, then its blockers)."""
    ev = PsEvent.from_buffer_copy(raw[:_EVENT_SIZE])
    quality = ev.quality
    get_port = None
    if quality & _SEEN:
        get_port = "refused" if quality & _REFUSED else "ok"
    addr_family = FAMILIES.get(ev.req_family, str(ev.req_family))
    return CallEvent(
        time=clock.wall(ev.ts_ns),
        call=_KIND_NAMES.get(ev.kind, str(ev.kind)),
        pid=ev.pid,
        tid=ev.tid,
        uid=ev.uid,
        sock_uid=ev.sock_uid,
        comm=system_text(ev.comm),
        cgroup_id=ev.cgroup_id,
        netns=ev.netns,
        family=FAMILIES.get(ev.family, str(ev.family)),
        protocol=PROTOCOLS.get(ev.protocol, str(ev.protocol)),
        addr_family=addr_family,
        addr=_ntop(socket.AF_INET6 if addr_family == "ipv6" else socket.AF_INET, bytes(ev.req_addr)),
        port=ev.req_port,
        bound_addr=_ntop(ev.family, bytes(ev.bound_addr)),
        bound_port=ev.bound_port,
        options=_options(ev.opts, ev.bound_dev_if),
        inode=ev.sock_inode,
        errno=-ev.ret if ev.ret < 0 else 0,
        plan=_PLAN_NAMES.get(ev.plan, str(ev.plan)),
        addr_unreadable=bool(quality & _UNREADABLE),
        get_port=get_port,
        capture=_capture(raw),
    )
