"""Decoded events: what a bind(), listen() or connect() asked for and got.

``decode()`` turns one raw ps_event record into a :class:`CallEvent`;
``CallEvent.to_json()`` is the stable JSON form documented in the README.
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import functools
import math
import socket
import time
from dataclasses import dataclass

from .layout import PsBlocker, PsCapture, PsEvent, PsEventBlocked, PsKind, PsOpt, PsPlan, PsQuality
from .text import system_text

FAMILIES = {socket.AF_INET: "ipv4", socket.AF_INET6: "ipv6", socket.AF_UNSPEC: "unspec"}
PROTOCOLS = {
    socket.IPPROTO_TCP: "tcp",
    socket.IPPROTO_UDP: "udp",
    136: "udplite",
    132: "sctp",
    socket.IPPROTO_ICMP: "icmp",
    socket.IPPROTO_ICMPV6: "icmpv6",
    socket.IPPROTO_RAW: "raw",
    0: "ip",
}
# include/net/tcp_states.h
TCP_STATES = {
    1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
    6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING",
    12: "NEW_SYN_RECV",
}
OPTION_NAMES = {
    int(PsOpt.REUSEADDR): "reuseaddr",
    int(PsOpt.REUSEPORT): "reuseport",
    int(PsOpt.V6ONLY): "v6only",
    int(PsOpt.FREEBIND): "freebind",
    int(PsOpt.TRANSPARENT): "transparent",
    int(PsOpt.BIND_ADDRESS_NO_PORT): "bind_address_no_port",
}


def errno_name(code: int) -> str | None:
    """'EADDRINUSE' for 98; None for 0."""
    if code == 0:
        return None
    return errno_mod.errorcode.get(code, f"E{code}")


def format_addr(family: str, addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if family == "ipv6" else f"{addr}:{port}"


def _ntop(family: int, raw: bytes) -> str:
    if family == socket.AF_INET6:
        return socket.inet_ntop(socket.AF_INET6, raw)
    return socket.inet_ntop(socket.AF_INET, raw[:4])


@dataclass(frozen=True, slots=True)
class Options:
    """Socket options at the moment of the call."""

    flags: frozenset[str]
    bound_dev_if: int

    def names(self) -> list[str]:
        """Stable order: the order of OPTION_NAMES."""
        return [n for n in OPTION_NAMES.values() if n in self.flags]


@dataclass(frozen=True, slots=True)
class Captured:
    """A socket that held the port when the kernel refused it, read by the
    probe at that moment (it may be gone by the time anyone looks)."""

    protocol: str
    family: str
    state: str  # as sock_diag names it (a TIME_WAIT minisocket: TIME_WAIT or FIN_WAIT2)
    addr: str
    port: int
    remote_addr: str
    remote_port: int
    cookie: int  # 0 when no one had asked the kernel for it yet
    inode: int  # 0 for TIME_WAIT and not yet accepted connections
    uid: int
    netns: int
    options: frozenset[str]
    bound_dev_if: int
    binder_pid: int  # the process whose traced bind()/listen() gave it the port; 0: unknown
    binder_comm: str
    timewait: bool = False  # a TIME_WAIT minisocket (no process can hold it)

    @property
    def local(self) -> str:
        return format_addr(self.family, self.addr, self.port)

    @property
    def remote(self) -> str:
        return format_addr(self.family, self.remote_addr, self.remote_port)

    def to_json(self) -> dict[str, object]:
        return {
            "protocol": self.protocol, "family": self.family, "state": self.state,
            "local": self.local, "remote": self.remote, "cookie": self.cookie,
            "inode": self.inode, "uid": self.uid, "netns": self.netns,
            "options": sorted(self.options), "bound_dev_if": self.bound_dev_if,
            "binder": {"pid": self.binder_pid, "comm": self.binder_comm}
            if self.binder_pid else None,
            "timewait": self.timewait,
        }


@dataclass(frozen=True, slots=True)
class Capture:
    """What held the port at a refused bind() or listen()."""

    when: str  # refusal (at the allocator's verdict) | exit (at the end of the call)
    seen: int  # sockets of the namespace found on the port
    complete: bool  # False: the walk stopped at its bound; seen is a lower bound
    sockets: tuple[Captured, ...]  # at most PS_MAX_BLOCKERS of them

    def to_json(self) -> dict[str, object]:
        return {"when": self.when, "seen": self.seen, "complete": self.complete,
                "sockets": [c.to_json() for c in self.sockets]}


@dataclass(frozen=True, slots=True)
class CallEvent:
    time: float  # wall clock, seconds since the epoch
    call: str  # bind | listen | connect | get_port
    pid: int
    tid: int
    uid: int
    sock_uid: int
    comm: str
    cgroup_id: int
    netns: int
    family: str  # the socket's: ipv4 | ipv6
    protocol: str
    addr_family: str  # of the requested address: ipv4 | ipv6 | unspec
    addr: str  # requested address (for connect: the destination)
    port: int  # requested port
    bound_addr: str  # local address held after the call
    bound_port: int  # local port held after the call (the one chosen for port 0)
    options: Options
    inode: int
    errno: int  # 0 on success
    plan: str
    addr_unreadable: bool
    get_port: str | None  # fentry/kprobe plans: "ok" | "refused"; else None
    capture: Capture | None = None  # EADDRINUSE of bind()/listen(): what held the port

    @property
    def ok(self) -> bool:
        return self.errno == 0

    @property
    def errno_name(self) -> str | None:
        return errno_name(self.errno)

    @property
    def requested(self) -> str:
        return format_addr(self.addr_family, self.addr, self.port)

    @property
    def bound(self) -> str:
        return format_addr(self.family, self.bound_addr, self.bound_port)

    def to_json(self) -> dict[str, object]:
        return {
            "time": self.time,
            "call": self.call,
            "result": "ok" if self.ok else self.errno_name,
            "errno": self.errno,
            "pid": self.pid,
            "tid": self.tid,
            "uid": self.uid,
            "sock_uid": self.sock_uid,
            "comm": self.comm,
            "cgroup_id": self.cgroup_id,
            "netns": self.netns,
            "family": self.family,
            "protocol": self.protocol,
            "addr_family": self.addr_family,
            "addr": self.addr,
            "port": self.port,
            "bound_addr": self.bound_addr,
            "bound_port": self.bound_port,
            "options": self.options.names(),
            "bound_dev_if": self.options.bound_dev_if,
            "inode": self.inode,
            "plan": self.plan,
            "addr_unreadable": self.addr_unreadable,
            "get_port": self.get_port,
            "at_failure": self.capture.to_json() if self.capture else None,
        }


_JSON_FIELDS: dict[str, type | tuple[type, ...]] = {
    "time": (int, float), "call": str, "pid": int, "tid": int, "uid": int, "sock_uid": int,
    "comm": str, "cgroup_id": int, "netns": int, "family": str, "protocol": str,
    "addr_family": str, "addr": str, "port": int, "bound_addr": str, "bound_port": int,
    "inode": int, "errno": int, "plan": str,
}


def event_from_json(doc: object) -> CallEvent:
    """The inverse of :meth:`CallEvent.to_json` (one line of ``trace --json``,
    a journal's ``json`` column). ValueError, naming the first bad key, when
    ``doc`` is not such an object: a recording or a journal is input like
    any other, and may be damaged or forged."""
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    for key, kind in _JSON_FIELDS.items():
        value = doc.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"{key!r} is missing or not a {getattr(kind, '__name__', 'number')}")
    options = doc.get("options") or []
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise ValueError("'options' is not a list of names")
    dev = doc.get("bound_dev_if", 0)
    get_port = doc.get("get_port")
    if type(dev) is not int or not (get_port is None or isinstance(get_port, str)):
        raise ValueError("'bound_dev_if' or 'get_port' has the wrong type")
    if not math.isfinite(doc["time"]):
        raise ValueError("'time' is not a finite number")
    capture = capture_from_json(doc.get("at_failure"))
    return CallEvent(
        time=float(doc["time"]), call=doc["call"], pid=doc["pid"], tid=doc["tid"],
        uid=doc["uid"], sock_uid=doc["sock_uid"], comm=doc["comm"],
        cgroup_id=doc["cgroup_id"], netns=doc["netns"], family=doc["family"],
        protocol=doc["protocol"], addr_family=doc["addr_family"], addr=doc["addr"],
        port=doc["port"], bound_addr=doc["bound_addr"], bound_port=doc["bound_port"],
        options=Options(frozenset(options), dev), inode=doc["inode"], errno=doc["errno"],
        plan=doc["plan"], addr_unreadable=bool(doc.get("addr_unreadable")), get_port=get_port,
        capture=capture,
    )


_CAPTURED_FIELDS: dict[str, type] = {
    "protocol": str, "family": str, "state": str, "local": str, "remote": str, "cookie": int,
    "inode": int, "uid": int, "netns": int, "bound_dev_if": int,
}


def capture_from_json(doc: object) -> Capture | None:
    """The ``at_failure`` key read back (None stays None); ValueError when damaged."""
    if doc is None:
        return None
    if not isinstance(doc, dict) or doc.get("when") not in _CAPTURE_NAMES.values():
        raise ValueError("'at_failure' is not a capture")
    seen, sockets = doc.get("seen"), doc.get("sockets")
    if type(seen) is not int or not isinstance(sockets, list):
        raise ValueError("'at_failure' has no 'seen' count or 'sockets' list")
    return Capture(doc["when"], seen, bool(doc.get("complete")),
                   tuple(_captured_from_json(c) for c in sockets))


def _captured_from_json(doc: object) -> Captured:
    if not isinstance(doc, dict):
        raise ValueError("a socket of 'at_failure' is not an object")
    for key, kind in _CAPTURED_FIELDS.items():
        if type(doc.get(key)) is not kind:
            raise ValueError(f"'at_failure' socket key {key!r} is missing or not a {kind.__name__}")
    options = doc.get("options") or []
    binder = doc.get("binder") or {}
    if (not isinstance(options, list) or not all(isinstance(o, str) for o in options)
            or not isinstance(binder, dict) or type(binder.get("pid", 0)) is not int
            or not isinstance(binder.get("comm", ""), str)):
        raise ValueError("an 'at_failure' socket has bad options or binder")
    addr, port = split_endpoint(doc["local"])
    raddr, rport = split_endpoint(doc["remote"])
    return Captured(doc["protocol"], doc["family"], doc["state"], addr, port, raddr, rport,
                    doc["cookie"], doc["inode"], doc["uid"], doc["netns"], frozenset(options),
                    doc["bound_dev_if"], binder.get("pid", 0), binder.get("comm", ""),
                    bool(doc.get("timewait")))


def split_endpoint(text: str) -> tuple[str, int]:
    """'[::1]:80' or '127.0.0.1:80' -> (address, port); ValueError otherwise."""
    addr, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{text!r} is not an address and port")
    if addr.startswith("[") and addr.endswith("]"):
        addr = addr[1:-1]
    return addr, int(port)


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
