"""Decoded events: what a bind(), listen() or connect() asked for and got.

``decode()`` turns one raw ps_event record into a :class:`CallEvent`;
``CallEvent.to_json()`` is the stable JSON form documented in the README.
"""

from __future__ import annotations

import errno as errno_mod
import functools
import math
import socket
import time
from dataclasses import dataclass

from .layout import PsEvent, PsKind, PsOpt, PsPlan, PsQuality
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
    return CallEvent(
        time=float(doc["time"]), call=doc["call"], pid=doc["pid"], tid=doc["tid"],
        uid=doc["uid"], sock_uid=doc["sock_uid"], comm=doc["comm"],
        cgroup_id=doc["cgroup_id"], netns=doc["netns"], family=doc["family"],
        protocol=doc["protocol"], addr_family=doc["addr_family"], addr=doc["addr"],
        port=doc["port"], bound_addr=doc["bound_addr"], bound_port=doc["bound_port"],
        options=Options(frozenset(options), dev), inode=doc["inode"], errno=doc["errno"],
        plan=doc["plan"], addr_unreadable=bool(doc.get("addr_unreadable")), get_port=get_port,
    )


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


def decode(raw: bytes, clock: Clock) -> CallEvent:
    ev = PsEvent.from_buffer_copy(raw)
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
    )
