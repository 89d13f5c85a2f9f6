"""A socket and the processes that own it, as the journal keeps them:
:class:`SocketRecord` (one socket state, as a snapshot keeps it) with its
owners as :class:`Owner`, each with its JSON codec and its row codec. The
recorder makes them from the inventory; the writer writes them; the
report's rules and replay read them back."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from ..bindrules import Sock
from .vocabulary import address_of_family, format_addr

# ---- a socket and its owners, as the journal keeps them ----------------------------


OWNER_TEXT = ("comm", "exe", "cmdline", "user", "cgroup", "unit", "container")
# What the journal keeps of an owner, in this order (its JSON there).
JOURNAL_OWNER = ("pid", "comm", "exe", "cmdline", "uid", "user", "cgroup", "unit", "container",
                 "accepts")


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
    # Of a listening socket several processes hold (after fork): True for
    # the ones seen waiting for its connections (tracer/acceptors.py), False
    # for the ones that only hold it; None when not asked or not seen.
    accepts: bool | None = None

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
            "problem": self.problem, "accepts": self.accepts,
        }

    @classmethod
    def from_json(cls, d: object) -> "Owner":
        """The inverse of :meth:`to_json`; ValueError when it is not one."""
        if not isinstance(d, dict) or type(d.get("pid")) is not int:
            raise ValueError("an owner is not an object with a pid")
        texts = ("comm", "exe", "cmdline", "user", "cgroup", "unit", "container", "pod",
                 "problem")
        if any(d.get(k) is not None and not isinstance(d.get(k), str) for k in texts) \
                or d.get("uid") is not None and type(d.get("uid")) is not int:
            raise ValueError("an owner's fields have the wrong type")
        return cls(d["pid"], d.get("comm") or "", d.get("exe"), d.get("cmdline"), d.get("user"),
                   d.get("uid"), d.get("cgroup"), d.get("unit"), d.get("container"),
                   d.get("pod"), bool(d.get("readable", True)), d.get("problem"),
                   _accepts(d.get("accepts")))

    # -- the journal's codec (inside a snapshot socket's ``owners`` column)

    def journal_json(self) -> dict[str, object]:
        return {k: getattr(self, k) for k in JOURNAL_OWNER}

    def kept(self) -> "Owner":
        """What the journal keeps of it (and gives back): no pod, nor how
        it was read, so that a socket state is one row however those change."""
        return Owner(self.pid, self.comm, self.exe, self.cmdline, self.user, self.uid,
                     self.cgroup, self.unit, self.container, accepts=self.accepts)

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
        return cls(d["pid"], d.get("comm") or "", d.get("exe"), d.get("cmdline"), d.get("user"),
                   d.get("uid"), d.get("cgroup"), d.get("unit"), d.get("container"),
                   accepts=_accepts(d.get("accepts")))


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

    # -- the journal's row codec

    def to_row(self, dumps: Callable[[object], str]) -> tuple[Any, ...]:
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


def owner_label(o: Mapping[str, object]) -> str:
    """``comm[pid] (unit)`` from an owner's JSON form (the journal's, the
    collector's); tolerant of a damaged one, whose missing or mistyped
    fields show as ``?``. Not escaped: the surface that shows it escapes."""
    comm = _str(o.get("comm")) or os.path.basename(_str(o.get("exe")) or "") or "?"
    where = _str(o.get("container")) and f"container {o['container']}" or _str(o.get("unit"))
    pid = o.get("pid")
    return f"{comm}[{pid if type(pid) is int else '?'}]" + (f" ({where})" if where else "")


def owner_detail(o: Owner) -> str:
    """``nginx[812]: /usr/sbin/nginx -g daemon off;`` (``-v``): a holder's
    command line, its executable when the command line does not start with
    it, and why it could not be read. Not escaped."""
    command = o.cmdline or "?"
    exe = f"  (exe {o.exe})" if o.exe and not command.startswith(o.exe) else ""
    problem = f"  ({o.problem})" if o.problem else ""
    return f"{o.comm}[{o.pid}]: {command}{exe}{problem}"


def owners_text(owners: Sequence[Owner]) -> str:
    """Who holds a socket, in words: ``nginx[812] (+4 holding)`` when the
    ones that take its connections are known (the others only inherited
    it), else every holder. Not escaped."""
    takers = [o for o in owners if o.accepts]
    if not takers:
        return " ".join(o.label() for o in owners)
    rest = len(owners) - len(takers)
    return " ".join(o.label() for o in takers) + (f" (+{rest} holding)" if rest else "")


def _accepts(value: object) -> bool | None:
    return value if isinstance(value, bool) else None


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


@dataclass
class RecordedSnapshot:
    """One inventory as the journal keeps it: the sockets a snapshot saw,
    when, how long it took, and what could not be read."""

    time: float
    duration: float
    reason: str  # periodic | after a bind, listen or close
    sockets: list[SocketRecord]
    health: dict[str, int]
