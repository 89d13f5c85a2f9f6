"""Reuseport groups as a reading sees them: each :class:`Group` with its
:class:`Member` sockets and their delivery counts, the members that joined
or left (:class:`MemberEvent`), and one read of all of them
(:class:`GroupsReading`), with its JSON codec (``groups --json``, the UI's
recordings). tracer/reuseport.GroupWatcher makes them; the state model, the
exporter and the printers read them."""

from __future__ import annotations

from dataclasses import dataclass

from ..balance import Imbalance, round_or_none
from .sockets import Owner
from .vocabulary import format_addr, split_endpoint


@dataclass(frozen=True)
class Acceptor:
    """A process (a thread of it, when ``tid`` is not 0) that takes
    connections from a member socket, and how it was seen waiting on it:
    ``accept`` (blocked in accept()), ``poll``, ``select``, or ``epoll`` (an
    epoll set of its that waits for the socket to be readable). See
    tracer/acceptors.py."""

    owner: Owner
    tid: int
    how: str

    def label(self) -> str:
        """``nginx[812]``, ``haproxy[900] thread 903``: not escaped."""
        thread = f" thread {self.tid}" if self.tid and self.tid != self.owner.pid else ""
        return f"{self.owner.comm}[{self.owner.pid}]{thread}"

    def to_json(self) -> dict[str, object]:
        return {**self.owner.to_json(), "tid": self.tid or None, "how": self.how}

    @classmethod
    def from_json(cls, d: object) -> "Acceptor":
        if not isinstance(d, dict) or not isinstance(d.get("how"), str):
            raise ValueError("an acceptor is not an object with 'how'")
        tid = d.get("tid")
        return cls(Owner.from_json(d), tid if type(tid) is int else 0, d["how"])


# A member's health, worst first: what an operator must act on.
STATUSES = ("stopped", "dropping", "not_accepting", "ok")


@dataclass
class Member:
    """One socket of a group, with its figures at the time of the read."""

    cookie: int
    inode: int
    state: str
    owners: tuple[Owner, ...]
    delivered: int  # since the watcher started, or since the member joined
    rate: float | None  # per second over the last interval; None on the first read
    window: int  # delivered since the group's membership last changed
    share: float | None  # window / the group's window total
    queue: int  # TCP: accept-queue depth; UDP: bytes waiting in the receive queue
    backlog: int | None  # TCP: the listen() backlog; UDP: None
    # Who takes its connections; ``owners`` are every process holding it.
    acceptors: tuple[Acceptor, ...] = ()
    drops: int | None = None  # the kernel's sk_drops: refused for a full queue (TCP), no room (UDP)
    status: str = "ok"  # one of STATUSES
    problems: tuple[str, ...] = ()  # why the status is not ok, one sentence each

    @property
    def pids(self) -> list[int]:
        return [o.pid for o in self.owners]

    @property
    def served_by(self) -> tuple[Owner, ...]:
        """The processes that take its connections when they are known, else
        every holder."""
        if not self.acceptors:
            return self.owners
        return tuple({a.owner.pid: a.owner for a in self.acceptors}.values())

    def served_text(self) -> str:
        """``nginx[812]``: the processes in :attr:`served_by`. Not escaped."""
        return " ".join(o.label() for o in self.served_by)

    def taker_label(self) -> str:
        """Who takes its connections (threads named); when nobody was seen
        waiting on it, its holders marked ``*``. Not escaped."""
        if self.acceptors:
            return " ".join(dict.fromkeys(a.label() for a in self.acceptors))
        return (" ".join(o.label() for o in self.owners) or "-") + " *"

    def to_json(self) -> dict[str, object]:
        return {
            "cookie": self.cookie, "inode": self.inode, "state": self.state,
            "acceptors": [a.to_json() for a in self.acceptors],
            "pids": self.pids, "owners": [o.to_json() for o in self.owners],
            "delivered": self.delivered, "rate": round_or_none(self.rate, 3),
            "window": self.window, "share": round_or_none(self.share, 6),
            "queue": self.queue, "backlog": self.backlog, "drops": self.drops,
            "status": self.status, "problems": list(self.problems),
        }


@dataclass
class Group:
    id: int  # opaque, stable while the kernel keeps the group
    netns: int
    protocol: str
    family: str
    addr: str
    port: int
    bound_dev_if: int
    size: int  # sockets in the group, as the kernel counts them
    bpf: bool  # a reuseport BPF program steers it
    members: list[Member]
    window_seconds: float
    imbalance: Imbalance | None  # None: read from a recording that had none
    # What in the group's make-up can make its split uneven whatever the
    # traffic (a BPF selector, members not served); empty: only the hash.
    causes: tuple[str, ...] = ()

    @property
    def local(self) -> str:
        return format_addr(self.family, self.addr, self.port)

    @property
    def delivered(self) -> int:
        return sum(m.delivered for m in self.members)

    @property
    def rate(self) -> float | None:
        rates = [m.rate for m in self.members if m.rate is not None]
        return sum(rates) if rates else None

    def to_json(self) -> dict[str, object]:
        return {
            "id": f"{self.id:08x}", "netns": self.netns, "protocol": self.protocol,
            "family": self.family, "local": self.local, "addr": self.addr, "port": self.port,
            "bound_dev_if": self.bound_dev_if, "size": self.size, "bpf": self.bpf,
            "delivered": self.delivered, "rate": round_or_none(self.rate, 3),
            "members": [m.to_json() for m in self.members],
            "imbalance": self.imbalance.to_json() if self.imbalance else None,
            "balance": self.balance(),
        }

    @property
    def flagged(self) -> list[Member]:
        """Members whose status is not ok, worst first."""
        return sorted((m for m in self.members if m.status != "ok"),
                      key=lambda m: STATUSES.index(m.status))

    def balance(self) -> dict[str, object]:
        """What the split means: who gets too much and too little, and
        whether that is chance or the group's make-up (``groups --json``)."""
        imb = self.imbalance
        out: dict[str, object] = {"verdict": imb.verdict if imb else None,
                                  "cause": None, "causes": list(self.causes),
                                  "most": None, "least": None}
        if imb is None or imb.verdict in ("single", "idle"):
            return out
        out["cause"] = ("structure" if self.causes else
                        "chance" if imb.verdict in ("even", "insufficient") else "unexplained")
        for key, index in (("most", imb.most), ("least", imb.least)):
            if index is not None and index < len(self.members):
                m = self.members[index]
                out[key] = {"inode": m.inode, "window": m.window,
                            "share": round_or_none(m.share, 6),
                            "of_even": round_or_none(_of_even(m, len(self.members)), 4),
                            "served_by": [o.pid for o in m.served_by]}
        return out

    def balance_text(self) -> str:
        """The verdict, then for an uneven split which member gets too much
        and too little, by how much, and why (or that nothing explains it)."""
        imb = self.imbalance
        if imb is None:
            return "not measured"
        text = imb.text()
        if imb.verdict != "uneven":
            if self.causes:
                text += "; but " + "; ".join(self.causes)
            return text
        k = len(self.members)
        for word, index in (("most", imb.most), ("least", imb.least)):
            if index is None or index >= k:
                continue
            m = self.members[index]
            who = m.served_text() or "-"
            ratio = _of_even(m, k)
            text += f"; {word}: {who} (inode {m.inode}) got {m.window}"
            text += f", {ratio:.2f}x its even share" if ratio is not None else ""
        if self.causes:
            return text + "; structure: " + "; ".join(self.causes)
        return (text + "; no structural cause seen (the kernel's hash, no BPF program, every "
                "member served): few distinct clients or source ports hash unevenly")


def _of_even(m: Member, members: int) -> float | None:
    """A member's share over the share an even split would give it."""
    return None if m.share is None else m.share * members


@dataclass
class MemberEvent:
    """A socket joined or left a group (seen between two reads)."""

    time: float  # wall clock of the read that saw it
    kind: str  # join or leave
    group: int
    netns: int
    protocol: str
    family: str
    addr: str
    port: int
    cookie: int
    inode: int
    owners: tuple[Owner, ...]  # for a leave: the owners last seen
    delivered: int  # for a leave: everything it received; for a join: so far

    @property
    def pids(self) -> list[int]:
        return [o.pid for o in self.owners]

    @property
    def local(self) -> str:
        return format_addr(self.family, self.addr, self.port)

    def to_json(self) -> dict[str, object]:
        return {
            "time": round(self.time, 6), "event": self.kind, "group": f"{self.group:08x}",
            "netns": self.netns, "protocol": self.protocol, "family": self.family,
            "local": self.local, "cookie": self.cookie, "inode": self.inode,
            "pids": self.pids, "owners": [o.to_json() for o in self.owners],
            "delivered": self.delivered,
        }


@dataclass
class GroupsReading:
    time: float  # wall clock of the read
    interval: float | None  # seconds since the previous read
    plan: str
    groups: list[Group]
    events: list[MemberEvent]
    health: dict[str, int]

    def to_json(self) -> dict[str, object]:
        return {
            "time": round(self.time, 6),
            "interval": None if self.interval is None else round(self.interval, 3),
            "plan": self.plan,
            "groups": [g.to_json() for g in self.groups],
            "events": [e.to_json() for e in self.events],
            "health": self.health,
        }


# ---- reading back --------------------------------------------------------------


def _owners(value: object) -> tuple[Owner, ...]:
    if not isinstance(value, list):
        raise ValueError("'owners' is not a list")
    return tuple(Owner.from_json(o) for o in value)


def _int(d: dict, key: str) -> int:
    value = d.get(key)
    if type(value) is not int:
        raise ValueError(f"{key!r} is missing or not a whole number")
    return value


def _number(d: dict, key: str) -> float | None:
    value = d.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ValueError(f"{key!r} is not a number")
    return None if value is None else float(value)


def _text(d: dict, key: str) -> str:
    value = d.get(key)
    if not isinstance(value, str):
        raise ValueError(f"{key!r} is missing or not a string")
    return value


def _hex(d: dict, key: str) -> int:
    try:
        return int(_text(d, key), 16)
    except ValueError:
        raise ValueError(f"{key!r} is not a group id") from None


def member_from_json(d: object) -> Member:
    if not isinstance(d, dict):
        raise ValueError("a member is not an object")
    backlog, drops, acceptors = d.get("backlog"), d.get("drops"), d.get("acceptors", [])
    problems = d.get("problems", [])
    if not isinstance(acceptors, list) or not isinstance(problems, list) \
            or not all(isinstance(p, str) for p in problems):
        raise ValueError("a member's acceptors or problems are not lists")
    status = d.get("status", "ok")
    return Member(_int(d, "cookie"), _int(d, "inode"), _text(d, "state"),
                  _owners(d.get("owners", [])), _int(d, "delivered"), _number(d, "rate"),
                  d.get("window", 0) if type(d.get("window", 0)) is int else 0,
                  _number(d, "share"), _int(d, "queue"),
                  backlog if type(backlog) is int else None,
                  tuple(Acceptor.from_json(a) for a in acceptors),
                  drops if type(drops) is int else None,
                  status if status in STATUSES else "ok", tuple(problems))


def group_from_json(d: object) -> Group:
    if not isinstance(d, dict) or not isinstance(d.get("members"), list):
        raise ValueError("a group is not an object with members")
    imbalance = Imbalance.from_json(d.get("imbalance"))
    balance = d.get("balance")
    causes = balance.get("causes", []) if isinstance(balance, dict) else []
    if not isinstance(causes, list) or not all(isinstance(c, str) for c in causes):
        raise ValueError("a group's balance causes are not a list of strings")
    return Group(_hex(d, "id"), _int(d, "netns"), _text(d, "protocol"), _text(d, "family"),
                 _text(d, "addr"), _int(d, "port"), d.get("bound_dev_if", 0) or 0,
                 _int(d, "size"), bool(d.get("bpf")),
                 [member_from_json(m) for m in d["members"]],
                 imbalance.seconds if imbalance else 0.0, imbalance, tuple(causes))


def member_event_from_json(d: object) -> MemberEvent:
    if not isinstance(d, dict) or d.get("event") not in ("join", "leave"):
        raise ValueError("a group event is neither a join nor a leave")
    addr, port = split_endpoint(_text(d, "local"))
    return MemberEvent(float(_number(d, "time") or 0.0), d["event"], _hex(d, "group"),
                       _int(d, "netns"), _text(d, "protocol"), _text(d, "family"), addr, port,
                       _int(d, "cookie"), _int(d, "inode"), _owners(d.get("owners", [])),
                       d.get("delivered", 0) if type(d.get("delivered", 0)) is int else 0)


def reading_from_json(d: object) -> GroupsReading:
    """The inverse of :meth:`GroupsReading.to_json` (a ``groups`` line of a
    recording); ValueError when it is not one."""
    if not isinstance(d, dict):
        raise ValueError("a groups reading is not an object")
    groups, events = d.get("groups", []), d.get("events", [])
    health = d.get("health") or {}
    if not isinstance(groups, list) or not isinstance(events, list) \
            or not isinstance(health, dict):
        raise ValueError("a groups reading has no list of groups and events")
    return GroupsReading(float(_number(d, "time") or 0.0), _number(d, "interval"),
                         str(d.get("plan") or ""), [group_from_json(g) for g in groups],
                         [member_event_from_json(e) for e in events],
                         {k: v for k, v in health.items() if type(v) is int})
