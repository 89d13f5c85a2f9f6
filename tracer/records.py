"""The records that cross from one part of portscope to another.

An explanation of a failed call is made in one place (tracer/onthespot.py
for bind() and listen(), tracer/connects.py for connect()) and read in
many (trace's lines and JSON, the journal, the UI's state): its shape lives
here, apart from the code that makes it, so that its makers and its
readers need not import each other.

A socket as the journal keeps it (:class:`SocketRecord`, with its owners as
:class:`Owner`) is made from the inventory by the recorder and read
back by the report's rules and by replay: its one row codec is here, so
the writer, the reader and the rules share one field list.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Mapping

from .bindrules import Sock
from .events import format_addr
from .state import HELD_WHO, owner_label
from .text import printable


@dataclass(frozen=True)
class BlockerSummary:
    pids: tuple[int, ...]
    comm: str | None
    state: str
    local: str
    rule: str
    overlap: str = ""  # how the addresses overlap (same_address, wildcard, dual_stack)
    why: str = ""  # the rule as a sentence
    held: str = "owners"  # owners | time_wait | orphan | hidden | unaccepted (explain.holding)
    remote: str = ""
    closed_by: str = ""  # who closed it, when no process holds it and that is known

    def text(self) -> str:
        """One line for a terminal (the process name escaped)."""
        who = (f"{printable(self.comm)}[{','.join(map(str, self.pids))}]" if self.pids
               else HELD_WHO.get(self.held, "no visible process"))
        left = f", left by {printable(self.closed_by)}" if self.closed_by else ""
        gone = ", closed since" if self.held == "gone" else ""
        return f"{who} {self.state} {self.local} ({self.rule}){left}{gone}"

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"pids": list(self.pids), "comm": self.comm,
                                  "state": self.state, "local": self.local,
                                  "remote": self.remote, "rule": self.rule, "held": self.held}
        if self.closed_by:
            out["closed_by"] = self.closed_by
        return out


@dataclass(frozen=True)
class EventExplanation:
    """What the explainer says about one failed call, or why it could not
    say anything. ``reasons``, ``fixes`` and ``notes`` are the explainer's
    structured records (their JSON form: kind, parameters, sentence)."""

    blockers: tuple[BlockerSummary, ...] = ()
    error: str | None = None
    reasons: tuple[dict, ...] = ()
    fixes: tuple[dict, ...] = ()
    notes: tuple[dict, ...] = ()

    @property
    def fix_texts(self) -> tuple[str, ...]:
        return tuple(str(f["text"]) for f in self.fixes)

    @property
    def note_texts(self) -> tuple[str, ...]:
        return tuple(str(n["text"]) for n in self.notes)

    def text(self) -> str:
        """One line: the blockers of a conflict, else the first reason."""
        if self.error:
            return f"unknown ({printable(self.error)})"
        if self.blockers:
            return "; ".join(b.text() for b in self.blockers)
        if self.reasons and self.reasons[0]["rule"] != "conflict":
            return printable(self.reasons[0]["text"])
        gone = [n for n in self.notes if n["kind"] == "blocker_gone"]
        return "nothing left by the time we looked" if gone or not self.notes else \
            printable(self.notes[0]["text"])

    def blockers_json(self) -> object:
        """The ``blockers`` key of trace --json (a list, or {"error": ...})."""
        if self.error:
            return {"error": self.error}
        return [b.to_json() for b in self.blockers]

    def to_json(self) -> dict[str, object]:
        """The ``explanation`` key of trace --json and the journal."""
        if self.error:
            return {"error": self.error}
        return {"errno": self.reasons[0]["errno"] if self.reasons else None,
                "reasons": list(self.reasons), "fixes": list(self.fixes),
                "notes": list(self.notes)}


# ---- a socket and its owners, as the journal keeps them ----------------------------


OWNER_TEXT = ("comm", "exe", "cmdline", "user", "cgroup", "unit", "container")
# What the journal keeps of an owner, in this order (its JSON there).
JOURNAL_OWNER = ("pid", "comm", "exe", "cmdline", "uid", "user", "cgroup", "unit", "container")


@dataclass(frozen=True, slots=True)
class Owner:
    """A process holding a socket: who it is, as tracer/owners.py read it
    from /proc (or as the journal kept it)."""

    pid: int
    comm: str
    exe: str | None = None
    cmdline: str | None = None
    user: str | None = None
    uid: int | None = None
    cgroup: str | None = None
    unit: str | None = None  # systemd unit, when the cgroup path names one
    container: str | None = None  # container id (12 chars), when it does
    pod: str | None = None  # Kubernetes pod uid
    readable: bool = True  # False: the process vanished or could not be read
    problem: str | None = None  # why not: "gone", "permission denied", ...

    def label(self) -> str:
        """``comm[pid] (unit)``, not escaped (the surface showing it escapes)."""
        return owner_label({"pid": self.pid, "comm": self.comm, "exe": self.exe,
                            "unit": self.unit, "container": self.container})

    def to_json(self) -> dict[str, object]:
        """Its JSON form in every command's --json."""
        return {
            "pid": self.pid, "comm": self.comm, "exe": self.exe, "cmdline": self.cmdline,
            "user": self.user, "uid": self.uid, "cgroup": self.cgroup, "unit": self.unit,
            "container": self.container, "pod": self.pod, "readable": self.readable,
            "problem": self.problem,
        }

    # -- the journal's codec (inside a snapshot socket's ``owners`` column)

    def journal_json(self) -> dict[str, object]:
        return {k: getattr(self, k) for k in JOURNAL_OWNER}

    def kept(self) -> "Owner":
        """What the journal keeps of it (and gives back): no pod, nor how
        it was read, so that a socket state is one row however those change."""
        return Owner(**self.journal_json())  # type: ignore[arg-type]

    @classmethod
    def from_journal(cls, d: object) -> "Owner | None":
        """From the journal's JSON form; None when it is not one (a damaged
        journal). A name the journal lacks reads as empty."""
        if not isinstance(d, dict) or type(d.get("pid")) is not int:
            return None
        if any(d.get(k) is not None and not isinstance(d.get(k), str) for k in OWNER_TEXT):
            return None
        if d.get("uid") is not None and type(d.get("uid")) is not int:
            return None
        return cls(**{k: d.get(k) for k in JOURNAL_OWNER if k != "comm"}, comm=d.get("comm") or "")


# The journal's snapshot_sockets columns that hold a SocketRecord, in order.
SOCKET_COLUMNS = (
    "netns", "protocol", "family", "state", "addr", "port", "bound_dev_if", "uid", "inode",
    "cookie", "options", "group_id", "group_size", "group_bpf", "owners",
)


@dataclass(frozen=True)
class SocketRecord:
    """One socket state as a snapshot keeps it. Hashable: equal records are
    one state, which the journal writes once for as long as it lasts."""

    netns: int
    protocol: str  # tcp, udp
    family: str  # ipv4, ipv6
    state: str
    addr: str
    port: int
    dev: int  # bound device index, 0: none
    uid: int
    inode: int
    cookie: int
    options: frozenset[str] | None  # None: no iterator read the socket's flags
    group: int | None  # reuseport group id; None: in no group
    group_size: int | None
    group_bpf: bool | None
    owners: tuple[Owner, ...] = ()

    @classmethod
    def of(cls, sock: Any) -> "SocketRecord":
        """From an inventory.Socket."""
        d, f = sock.diag, sock.flags
        grouped = bool(f and f.group)
        return cls(
            netns=d.netns, protocol=d.protocol, family=d.family, state=d.state,
            addr=d.local_addr, port=d.local_port, dev=d.bound_dev_if, uid=d.uid,
            inode=d.inode, cookie=d.cookie, options=frozenset(f.options) if f else None,
            group=f.group if grouped else None, group_size=f.group_size if grouped else None,
            group_bpf=bool(f.group_bpf_prog) if grouped else None,
            owners=tuple(o.kept() for o in sorted(sock.owners, key=lambda o: o.pid)))

    # -- the journal's row codec

    def to_row(self, dumps: Any) -> tuple[Any, ...]:
        """The values of SOCKET_COLUMNS; ``dumps`` encodes the owners' JSON."""
        return (self.netns, self.protocol, self.family, self.state, self.addr, self.port,
                self.dev, self.uid, self.inode, self.cookie,
                None if self.options is None else ",".join(sorted(self.options)),
                self.group, self.group_size,
                None if self.group_bpf is None else int(self.group_bpf),
                dumps([o.journal_json() for o in self.owners]))

    @classmethod
    def row_fields(cls, r: Mapping[str, Any]) -> dict[str, Any] | None:
        """The fields of a record from a row the journal reader typed (its
        owners already decoded from JSON), or None when the row is damaged
        beyond what the rules and the screens can use: a protocol that is
        neither, an address that does not parse as its family, a port out
        of range, an owner that is not one."""
        if r["protocol"] not in ("tcp", "udp") or not address_of_family(r["family"], r["addr"]) \
                or not 0 <= r["port"] <= 0xFFFF or not isinstance(r["owners"], list):
            return None
        owners = tuple(Owner.from_journal(o) for o in r["owners"])
        if None in owners:
            return None
        grouped = bool(r["group_id"])
        return dict(
            netns=r["netns"], protocol=r["protocol"], family=r["family"], state=r["state"],
            addr=r["addr"], port=r["port"], dev=r["bound_dev_if"], uid=r["uid"],
            inode=r["inode"], cookie=r["cookie"],
            options=None if r["options"] is None
            else frozenset(filter(None, r["options"].split(","))),
            group=r["group_id"] if grouped else None,
            group_size=r["group_size"] if grouped else None,
            group_bpf=bool(r["group_bpf"]) if grouped else None, owners=owners)

    @classmethod
    def from_row(cls, r: Mapping[str, Any]) -> "SocketRecord | None":
        f = cls.row_fields(r)
        return None if f is None else cls(**f)

    # -- what readers ask of it

    @property
    def local(self) -> str:
        return format_addr(self.family, self.addr, self.port)

    @property
    def pids(self) -> list[int]:
        return sorted({o.pid for o in self.owners})

    @property
    def exes(self) -> frozenset[str]:
        return frozenset(o.exe for o in self.owners if o.exe)

    @property
    def identities(self) -> frozenset[tuple[str, str | None]]:
        """(exe, cgroup) of every owner whose executable is known."""
        return frozenset((o.exe, o.cgroup) for o in self.owners if o.exe)

    def sock(self) -> Sock:
        """The socket as the bind rules see it."""
        opts = self.options or frozenset()
        return Sock(self.protocol, self.family, self.addr, self.port, self.state,
                    "reuseaddr" in opts, "reuseport" in opts, "v6only" in opts, self.dev, self.uid)


def address_of_family(family: str, addr: object) -> bool:
    """An address the rules can compare: of its family, as the kernel writes it."""
    if not isinstance(addr, str):
        return False
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    return family == ("ipv6" if ip.version == 6 else "ipv4")
