"""A traced call: what a bind(), listen() or connect() asked for and got
(:class:`CallEvent`, as the probes report it, with its JSON codec: the
stable form of ``trace --json``), and the same call as the journal keeps it
(:class:`RecordedCall`, with its row codec both ways)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ..bindrules import LISTEN, Sock
from ..text import sql_text
from .explanations import BlockerSummary, EventExplanation
from .sockets import Owner
from .vocabulary import (
    OPTION_NAMES,
    address_of_family,
    errno_name,
    format_addr,
    split_endpoint,
)

CAPTURE_WHEN = ("refusal", "exit")  # at the allocator's verdict | at the end of the call


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

    @classmethod
    def from_json(cls, doc: object) -> "Captured":
        if not isinstance(doc, dict):
            raise ValueError("a socket of 'at_failure' is not an object")
        for key, kind in _CAPTURED_FIELDS.items():
            if type(doc.get(key)) is not kind:
                raise ValueError(f"'at_failure' socket key {key!r} is missing or not a "
                                 f"{kind.__name__}")
        options = doc.get("options") or []
        binder = doc.get("binder") or {}
        if (not isinstance(options, list) or not all(isinstance(o, str) for o in options)
                or not isinstance(binder, dict) or type(binder.get("pid", 0)) is not int
                or not isinstance(binder.get("comm", ""), str)):
            raise ValueError("an 'at_failure' socket has bad options or binder")
        addr, port = split_endpoint(doc["local"])
        raddr, rport = split_endpoint(doc["remote"])
        return cls(doc["protocol"], doc["family"], doc["state"], addr, port, raddr, rport,
                   doc["cookie"], doc["inode"], doc["uid"], doc["netns"], frozenset(options),
                   doc["bound_dev_if"], binder.get("pid", 0), binder.get("comm", ""),
                   bool(doc.get("timewait")))


_CAPTURED_FIELDS: dict[str, type] = {
    "protocol": str, "family": str, "state": str, "local": str, "remote": str, "cookie": int,
    "inode": int, "uid": int, "netns": int, "bound_dev_if": int,
}


@dataclass(frozen=True, slots=True)
class Capture:
    """What held the port at a refused bind() or listen()."""

    when: str  # one of CAPTURE_WHEN
    seen: int  # sockets of the namespace found on the port
    complete: bool  # False: the walk stopped at its bound; seen is a lower bound
    sockets: tuple[Captured, ...]  # at most PS_MAX_BLOCKERS of them

    def to_json(self) -> dict[str, object]:
        return {"when": self.when, "seen": self.seen, "complete": self.complete,
                "sockets": [c.to_json() for c in self.sockets]}

    @classmethod
    def from_json(cls, doc: object) -> "Capture | None":
        """The ``at_failure`` key read back (None stays None); ValueError when damaged."""
        if doc is None:
            return None
        if not isinstance(doc, dict) or doc.get("when") not in CAPTURE_WHEN:
            raise ValueError("'at_failure' is not a capture")
        seen, sockets = doc.get("seen"), doc.get("sockets")
        if type(seen) is not int or not isinstance(sockets, list):
            raise ValueError("'at_failure' has no 'seen' count or 'sockets' list")
        return cls(doc["when"], seen, bool(doc.get("complete")),
                   tuple(Captured.from_json(c) for c in sockets))


@dataclass(frozen=True, slots=True)
class CallEvent:
    time: float  # wall clock, seconds since the epoch
    call: str  # bind | listen | connect | get_port | listen_close
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

    # -- the JSON codec (trace --json, record --jsonl, the journal's json column)

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

    @classmethod
    def from_json(cls, doc: object) -> "CallEvent":
        """The inverse of :meth:`to_json`. ValueError, naming the first bad
        key, when ``doc`` is not such an object: a recording or a journal is
        input like any other, and may be damaged or forged."""
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        for key, kind in _JSON_FIELDS.items():
            value = doc.get(key)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ValueError(f"{key!r} is missing or not a "
                                 f"{getattr(kind, '__name__', 'number')}")
        options = doc.get("options") or []
        if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
            raise ValueError("'options' is not a list of names")
        dev = doc.get("bound_dev_if", 0)
        get_port = doc.get("get_port")
        if type(dev) is not int or not (get_port is None or isinstance(get_port, str)):
            raise ValueError("'bound_dev_if' or 'get_port' has the wrong type")
        if not math.isfinite(doc["time"]):
            raise ValueError("'time' is not a finite number")
        return cls(
            time=float(doc["time"]), call=doc["call"], pid=doc["pid"], tid=doc["tid"],
            uid=doc["uid"], sock_uid=doc["sock_uid"], comm=doc["comm"],
            cgroup_id=doc["cgroup_id"], netns=doc["netns"], family=doc["family"],
            protocol=doc["protocol"], addr_family=doc["addr_family"], addr=doc["addr"],
            port=doc["port"], bound_addr=doc["bound_addr"], bound_port=doc["bound_port"],
            options=Options(frozenset(options), dev), inode=doc["inode"], errno=doc["errno"],
            plan=doc["plan"], addr_unreadable=bool(doc.get("addr_unreadable")),
            get_port=get_port, capture=Capture.from_json(doc.get("at_failure")),
        )

    # -- the journal's row codec (its events table; read back as a RecordedCall)

    def to_row(self, session: int, caller: Owner | None, explained: EventExplanation | None,
               dumps: Callable[[object], str]) -> tuple[Any, ...]:
        """The values of EVENT_COLUMNS: the call, who made it (the caller as
        read when it was recorded, or None) and what was said of it."""
        doc = self.to_json()
        known = caller if caller is not None and caller.readable else None
        return (
            session, self.time, self.call, doc["result"], self.errno, self.pid, self.tid,
            self.uid, self.sock_uid, sql_text(self.comm), self.cgroup_id, self.netns,
            self.family, self.protocol, self.addr_family, self.addr, self.port,
            self.bound_addr, self.bound_port, ",".join(self.options.names()),
            self.options.bound_dev_if, self.inode, self.plan, int(self.addr_unreadable),
            self.get_port,
            sql_text(known.exe) if known else None, sql_text(known.cgroup) if known else None,
            sql_text(known.cmdline) if known else None, known.uid if known else None,
            None if explained is None else dumps(explained.blockers_json()),
            None if explained is None else dumps(explained.to_json()),
            dumps(doc),
        )


_JSON_FIELDS: dict[str, type | tuple[type, ...]] = {
    "time": (int, float), "call": str, "pid": int, "tid": int, "uid": int, "sock_uid": int,
    "comm": str, "cgroup_id": int, "netns": int, "family": str, "protocol": str,
    "addr_family": str, "addr": str, "port": int, "bound_addr": str, "bound_port": int,
    "inode": int, "errno": int, "plan": str,
}

# The journal's events columns, in the order of CallEvent.to_row.
EVENT_COLUMNS = (
    "session", "time", "call", "result", "errno", "pid", "tid", "uid", "sock_uid", "comm",
    "cgroup_id", "netns", "family", "protocol", "addr_family", "addr", "port", "bound_addr",
    "bound_port", "options", "bound_dev_if", "inode", "plan", "addr_unreadable", "get_port",
    "exe", "cgroup", "cmdline", "owner_uid", "blockers", "explanation", "json",
)
RECORDED_CALLS = frozenset({"bind", "listen", "connect", "get_port", "listen_close"})


@dataclass(eq=False)
class RecordedCall:
    """A call as the journal keeps it (a row of its events table, read
    back): what the report's rules and the timeline read."""

    id: int
    session: int
    time: float
    call: str
    result: str
    errno: int
    pid: int
    uid: int
    sock_uid: int
    comm: str
    netns: int
    family: str
    protocol: str
    addr: str
    port: int
    bound_addr: str
    bound_port: int
    options: frozenset[str]
    dev: int
    inode: int
    exe: str | None  # the caller, as read when the call was recorded
    cgroup: str | None
    owner_uid: int | None
    explanation: EventExplanation | None = None  # what was said of it on the spot

    @property
    def ok(self) -> bool:
        return self.errno == 0

    @property
    def blockers(self) -> tuple[BlockerSummary, ...] | None:
        """The blockers named on the spot; None when none were looked for
        or they could not be named."""
        x = self.explanation
        return None if x is None or x.error else x.blockers

    @property
    def local_addr(self) -> str:
        """The address the call concerns: what it got, or what it asked for."""
        return self.bound_addr if self.ok and self.call != "connect" else self.addr

    @property
    def local_port(self) -> int:
        return (self.bound_port or self.port) if self.ok and self.call != "connect" else self.port

    @property
    def local(self) -> str:
        return format_addr(self.family, self.local_addr, self.local_port)

    def sock(self) -> Sock:
        """The socket as the bind rules see it."""
        return Sock(self.protocol, self.family, self.local_addr, self.local_port,
                    LISTEN if self.call == "listen" else "CLOSE", "reuseaddr" in self.options,
                    "reuseport" in self.options, "v6only" in self.options, self.dev,
                    self.sock_uid)

    @classmethod
    def from_row(cls, r: Mapping[str, Any]) -> "RecordedCall | None":
        """From a row the journal reader typed (its JSON columns decoded), or
        None when it is damaged beyond what the rules can use."""
        if r["call"] not in RECORDED_CALLS or r["protocol"] not in ("tcp", "udp"):
            return None
        if not (address_of_family(r["family"], r["bound_addr"]) and _port(r["port"])
                and _port(r["bound_port"])):
            return None
        if r["addr_family"] in ("ipv4", "ipv6") and not address_of_family(r["addr_family"],
                                                                          r["addr"]):
            return None
        try:
            explanation = EventExplanation.from_json(r["blockers"], r.get("explanation"))
        except ValueError:
            return None
        return cls(
            r["id"], r["session"], r["time"], r["call"], r["result"], r["errno"], r["pid"],
            r["uid"], r["sock_uid"], r["comm"], r["netns"], r["family"], r["protocol"],
            r["addr"], r["port"], r["bound_addr"], r["bound_port"],
            frozenset(filter(None, r["options"].split(","))), r["bound_dev_if"], r["inode"],
            r["exe"], r["cgroup"], r["owner_uid"], explanation)


def _port(value: int) -> bool:
    return 0 <= value <= 0xFFFF
