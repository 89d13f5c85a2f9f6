"""The collector's state model: what the terminal UI (and any other viewer)
shows, as plain data.

Writers (the collector's threads, or a replay) call the ``StateModel``
methods; readers call :meth:`StateModel.snapshot`, which returns an
immutable :class:`Snapshot` with a version number that grows with every
change. A reader that polls at its own pace and skips versions it did not
see is how updates coalesce: a slow UI never queues more than the newest
state. Each part of the snapshot (conflicts, ports, groups, TIME_WAIT,
health) also carries the version of its last change, so a viewer redraws
only what changed.

Nothing here imports a UI toolkit, and nothing here talks to the kernel.
Display strings that are costly to build (a socket's owners, a conflict's
"blocked by" summary) are built once, by the writer, not by every redraw.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Mapping, Sequence

from . import text
from .records import CallEvent, EventExplanation, Owner, owner_label

MAX_CONFLICTS = 1000
MAX_GROUP_EVENTS = 50  # join/leave marks kept per group
RATE_HISTORY = 60  # rate samples kept per group, for the sparkline


def clock_text(t: float) -> str:
    """12:34:56.789 in local time."""
    return text.clock_text(t, date=False)


# ---- conflicts ----------------------------------------------------------------


# Shown for failures the explainer does not look into.
ERRNO_HINTS = {
    "EADDRNOTAVAIL": "connect() found no free ephemeral port for this destination, or bind() "
                     "asked for an address this namespace does not have: see the TIME_WAIT "
                     "screen for ephemeral-port pressure",
    "EADDRINUSE": "the 4-tuple (local address and port, destination) is already in use",
    "EACCES": "ports below net.ipv4.ip_unprivileged_port_start need CAP_NET_BIND_SERVICE",
    "EINVAL": "the socket is already bound, or the address is malformed",
}


@dataclass(frozen=True, slots=True)
class Conflict:
    """One failed bind(), listen() or connect(), with its explanation.

    ``explanation`` is None while the explainer has not answered yet (or
    never will: only EADDRINUSE of bind and listen are explained); then
    ``pending`` says whether an answer is coming."""

    seq: int
    event: CallEvent
    explanation: EventExplanation | None = None
    pending: bool = False
    # The caller as the collector read it after the event (exe, command
    # line, unit or container); None until read, or when nothing could be.
    caller: Owner | None = None

    @property
    def who(self) -> str:
        return f"{self.event.comm}[{self.event.pid}]"

    @property
    def proto(self) -> str:
        ev = self.event
        return ev.protocol + ("6" if ev.family == "ipv6" else "4")

    @property
    def result(self) -> str:
        return self.event.errno_name or "ok"

    def blocked_by(self) -> str:
        if self.explanation is not None:
            return self.explanation.summary()
        if self.pending:
            return "…explaining"
        return "-"

    def hint(self) -> str | None:
        ev = self.event
        if ev.errno_name == "EADDRINUSE" and ev.call != "connect":
            return None
        return ERRNO_HINTS.get(ev.errno_name or "")

    def to_json(self) -> dict[str, object]:
        """The event as ``portscope trace --json`` prints it, with the
        explanation's blockers, fixes and notes."""
        doc = self.event.to_json()
        x = self.explanation
        if x is not None:
            doc["blockers"] = x.blockers_json()
            doc["fixes"] = list(x.fix_texts)
            doc["notes"] = list(x.note_texts)
            if not x.error and x.reasons:
                doc["explanation"] = x.to_json()
        if self.caller is not None:
            doc["caller"] = self.caller.to_json()
        return doc


# ---- ports --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SocketRow:
    """One socket of the inventory, ready to show."""

    netns: int
    proto: str  # tcp4, tcp6, udp4, udp6
    state: str
    local: str
    remote: str  # "*" when not connected
    port: int  # local port
    queue: str  # recv/send, or for a listener accept queue/backlog
    accept_queue: int
    backlog: int
    timer: str  # "-" when none
    uid: int
    inode: int
    cookie: int
    options: tuple[str, ...] | None  # None: no iterator read the flags
    group: int  # reuseport group id, 0: none
    group_size: int
    group_bpf: bool
    owners: str  # "nginx[812] nginx[813]" or "-"
    pids: tuple[int, ...]
    users: str  # owners' user names, comma-separated
    search: str  # lowercase text the filter matches
    netns_text: str = ""  # "4026532248 (blue)": the inode and its label
    # Its ``portscope ports --json`` form, made when asked (the UI saving a
    # screen): a bound method of the inventory's socket, or a recording's dict.
    json: Callable[[], dict[str, object]] | None = field(default=None, compare=False)

    def to_json(self) -> dict[str, object]:
        return self.json() if self.json is not None else {}

    @property
    def flags(self) -> str:
        return _flags_text(self.options, self.group, self.group_size, self.group_bpf)

    @classmethod
    def build(cls, *, netns: int, protocol: str, family: str, state: str, local: str,
              remote: str, port: int, rqueue: int, wqueue: int, timer: str | None,
              timer_ms: int, uid: int, inode: int, cookie: int,
              options: Iterable[str] | None, group: int, group_size: int, group_bpf: bool,
              owners: Sequence[tuple[int, str, str | None]],
              json: Callable[[], dict[str, object]] | None = None,
              netns_name: str | None = None) -> "SocketRow":
        """``owners``: (pid, label, user) of every holder."""
        proto = protocol + ("6" if family == "ipv6" else "4")
        remote_text = "*" if remote.endswith(":0") else remote
        timer_text = f"{timer} {timer_ms / 1000:.0f}s" if timer else "-"
        opts = None if options is None else tuple(sorted(options))
        owner_text = " ".join([label for _, label, _ in owners]) or "-"
        users = ",".join(sorted({u for _, _, u in owners if u}))
        flags = _flags_text(opts, group, group_size, group_bpf)
        search = " ".join((proto, state, local, remote_text, owner_text, users,
                           ",".join(opts or ()), flags, netns_name or "",
                           f"uid={uid} ns={netns} lport={port} "))
        netns_text = f"{netns} ({netns_name})" if netns_name else str(netns)
        listening = state == "LISTEN"
        return cls(netns, proto, state, local, remote_text, port, f"{rqueue}/{wqueue}",
                   rqueue if listening else 0, wqueue if listening else 0,
                   timer_text, uid, inode, cookie, opts, group, group_size, group_bpf,
                   owner_text, tuple([p for p, _, _ in owners]), users, search.lower(),
                   netns_text, json)

    @classmethod
    def from_json(cls, d: dict) -> "SocketRow":
        """From one socket of ``portscope ports --json``."""
        local = d["local"]
        port = int(local.rsplit(":", 1)[1])
        owners = [(o["pid"], owner_label(o), o.get("user")) for o in d.get("owners", [])]
        return cls.build(
            netns=d["netns"], protocol=d["protocol"], family=d["family"], state=d["state"],
            local=local, remote=d["remote"], port=port, rqueue=d["recv_q"], wqueue=d["send_q"],
            timer=d.get("timer"), timer_ms=d.get("timer_ms", 0), uid=d["uid"],
            inode=d["inode"], cookie=d["cookie"], options=d.get("options"),
            group=d.get("reuseport_group") or 0, group_size=d.get("reuseport_group_size") or 0,
            group_bpf=bool(d.get("reuseport_bpf")), owners=owners, json=d.copy,
            netns_name=d.get("netns_name") if isinstance(d.get("netns_name"), str) else None)


_OPTION_SHORT = {"reuseaddr": "ra", "reuseport": "rp", "v6only": "v6", "freebind": "fb",
                 "transparent": "tp", "bind_address_no_port": "nport"}


def _flags_text(options: tuple[str, ...] | None, group: int, size: int, bpf: bool) -> str:
    """'ra,rp g1a2b/4+bpf': short option names and the reuseport group."""
    if options is None:
        return "?"
    text = ",".join([_OPTION_SHORT.get(o, o) for o in options]) or "-"
    if group:
        text += f" g{group & 0xffff:04x}/{size}" + ("+bpf" if bpf else "")
    return text


def matches(search: str, query: str) -> bool:
    """The filter: every word of ``query`` must occur; ``:80`` is local port
    80 exactly (the search text holds ``lport=PORT `` with a trailing space)."""
    for word in query.lower().split():
        if word.startswith(":") and word[1:].isdigit():
            if f"lport={word[1:]} " not in search:
                return False
        elif word not in search:
            return False
    return True


# ---- reuseport groups ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MemberView:
    cookie: int
    inode: int
    owner: str  # "nginx[812]" or "-"
    state: str
    delivered: int  # since the collector started, or since the member joined
    rate: float | None  # per second over the last interval; None on the first read
    share: float | None  # of the group's deliveries since its membership last changed
    queue: int  # TCP: accept-queue depth; UDP: bytes waiting
    backlog: int | None  # TCP: listen() backlog; UDP: None
    holders: str = ""  # every process holding it, when ``owner`` names who takes from it
    drops: int | None = None  # the kernel's sk_drops for it
    status: str = "ok"  # ok, stopped, dropping, not_accepting
    problems: tuple[str, ...] = ()
    served_by: tuple[Owner, ...] = ()  # who takes from it (else its holders), as read


@dataclass(frozen=True, slots=True)
class GroupEvent:
    time: float
    kind: str  # "join" | "leave"
    member: str  # owner and socket inode
    delivered: int


@dataclass(frozen=True, slots=True)
class ImbalanceView:
    verdict: str  # even, uneven, insufficient, single, idle
    text: str  # one line, the figures and what they mean
    max_min: float | None
    cv: float | None
    p_value: float | None
    seconds: float


@dataclass(frozen=True, slots=True)
class GroupView:
    key: str  # stable: netns/protocol/group id
    netns: int
    proto: str  # tcp4, udp6, ...
    local: str  # the group's address:port
    port: int
    size: int  # members as the kernel counts them
    bpf: bool  # a reuseport BPF program steers it
    members: tuple[MemberView, ...]
    rate: float | None  # deliveries per second, all members
    history: tuple[float, ...]  # total rate per read, oldest first (sparkline)
    events: tuple[GroupEvent, ...]  # join/leave, oldest first
    imbalance: ImbalanceView | None
    balance: str = ""  # the verdict with who gets most and least, and why
    # Its form in ``portscope groups --json`` (made when the UI saves a screen).
    json: Callable[[], dict[str, object]] | None = field(default=None, compare=False)

    def to_json(self) -> dict[str, object]:
        return self.json() if self.json is not None else {}

    @property
    def flagged(self) -> tuple[MemberView, ...]:
        return tuple(m for m in self.members if m.status != "ok")

    @property
    def owners(self) -> str:
        return " ".join(dict.fromkeys(m.owner for m in self.members))

    @property
    def delivered(self) -> int:
        return sum(m.delivered for m in self.members)


# ---- TIME_WAIT ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TimewaitRow:
    port: str  # the local port, or "ephemeral" for connections we opened
    remote: str  # remote address (with the port when it is the service's)
    closer: str  # the process that closed first, or "unknown"
    count: int
    min_left_ms: int
    max_left_ms: int


@dataclass(frozen=True, slots=True)
class PressureRow:
    netns: int
    source: str
    destination: str
    in_use: int
    capacity: int
    level: str  # ok | warning | full

    @property
    def share(self) -> float:
        return self.in_use / self.capacity if self.capacity else 1.0


@dataclass(frozen=True, slots=True)
class TimewaitView:
    total: int
    attributed: int
    collectors: int
    rows: tuple[TimewaitRow, ...]
    histogram: tuple[tuple[str, int], ...]
    pressure: tuple[PressureRow, ...]
    notes: tuple[str, ...]
    taken_at: float


# ---- health -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Health:
    source: str = "live"  # live | replay
    plan: str | None = None
    plan_notes: tuple[str, ...] = ()  # why better plans were not used
    events: int = 0  # events read since start
    events_per_s: float = 0.0
    lost: int = 0  # ring buffer full
    untraced: int = 0  # calls in flight table full
    unreadable_processes: int = 0
    flags_unknown: int = 0
    namespaces: int = 0
    namespaces_gone: int = 0
    explain_failures: int = 0
    explain_skipped: int = 0  # failures not explained: too many at once
    refresh_ms: tuple[tuple[str, float], ...] = ()  # last refresh cost per part
    errors: tuple[tuple[str, str], ...] = ()  # (kind, sentence), one per kind
    started: float = 0.0


# ---- the model ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Versions:
    conflicts: int = 0
    ports: int = 0
    groups: int = 0
    timewait: int = 0
    health: int = 0
    names: int = 0  # the namespaces' labels (every screen that shows a netns reads them)


@dataclass(frozen=True)
class Snapshot:
    version: int
    versions: Versions
    conflicts: tuple[Conflict, ...]  # oldest first, at most MAX_CONFLICTS
    conflicts_total: int  # ever seen, including those dropped from the window
    ports: tuple[SocketRow, ...]
    ports_taken_at: float
    groups: tuple[GroupView, ...]
    timewait: TimewaitView | None
    health: Health
    # Namespace inode -> its label (host, an ip netns name, container ID),
    # as read with the last inventory (tracer/nsnames.py).
    netns_names: Mapping[int, str] = field(default_factory=dict)

    def netns_text(self, inode: int) -> str:
        """``4026532248 (blue)``, or the inode alone; not escaped."""
        name = self.netns_names.get(inode)
        return f"{inode} ({name})" if name else str(inode)

    @property
    def listeners(self) -> int:
        return sum(1 for r in self.ports if r.state == "LISTEN")

    @property
    def time_wait(self) -> int:
        return self.timewait.total if self.timewait else 0


class StateModel:
    """Thread-safe: any thread may write, any thread may snapshot."""

    def __init__(self, max_conflicts: int = MAX_CONFLICTS) -> None:
        self._lock = threading.Lock()
        self._version = 0
        self._versions = Versions()
        self._conflicts: deque[Conflict] = deque(maxlen=max_conflicts)
        self._conflicts_total = 0
        self._ports: tuple[SocketRow, ...] = ()
        self._ports_taken_at = 0.0
        self._netns_names: dict[int, str] = {}
        self._groups: tuple[GroupView, ...] = ()
        self._timewait: TimewaitView | None = None
        self._health = Health(started=time.time())
        self._errors: dict[str, str] = {}
        self._snapshot: Snapshot | None = None

    # -- writers

    def _bump(self, section: str) -> None:
        self._version += 1
        self._versions = replace(self._versions, **{section: self._version})
        self._snapshot = None

    def add_conflict(self, event: CallEvent, explanation: EventExplanation | None = None,
                     pending: bool = False, caller: Owner | None = None) -> int:
        """Record a failed call; returns its sequence number (for
        :meth:`explain`)."""
        with self._lock:
            seq = self._conflicts_total
            self._conflicts_total += 1
            self._conflicts.append(Conflict(seq, event, explanation, pending, caller))
            self._bump("conflicts")
            return seq

    def add_conflicts(self, items: Iterable[tuple[CallEvent, EventExplanation | None, bool]]) -> list[int]:
        """Several at once, one version (a burst read from the ring buffer)."""
        with self._lock:
            seqs = []
            for event, explanation, pending in items:
                seq = self._conflicts_total
                self._conflicts_total += 1
                self._conflicts.append(Conflict(seq, event, explanation, pending))
                seqs.append(seq)
            if seqs:
                self._bump("conflicts")
            return seqs

    def explain(self, seq: int, explanation: EventExplanation | None) -> bool:
        """Attach the explainer's answer (None: it will not come); False if
        the conflict already left the window."""
        with self._lock:
            if not self._conflicts:
                return False
            index = seq - self._conflicts[0].seq
            if not 0 <= index < len(self._conflicts):
                return False
            old = self._conflicts[index]
            self._conflicts[index] = replace(old, explanation=explanation, pending=False)
            self._bump("conflicts")
            return True

    def identify(self, callers: Iterable[tuple[int, Owner]]) -> None:
        """Attach who made each call (``(seq, owner)``); one version for
        the batch. Conflicts that already left the window are passed over."""
        with self._lock:
            changed = False
            for seq, owner in callers:
                index = seq - self._conflicts[0].seq if self._conflicts else -1
                if 0 <= index < len(self._conflicts):
                    self._conflicts[index] = replace(self._conflicts[index], caller=owner)
                    changed = True
            if changed:
                self._bump("conflicts")

    def set_conflicts(self, conflicts: Sequence[Conflict], total: int) -> None:
        """Replace the window of conflicts (a replay moving back in time):
        ``conflicts`` oldest first, ``total`` the number ever seen up to them."""
        with self._lock:
            self._conflicts.clear()
            self._conflicts.extend(conflicts)
            self._conflicts_total = total
            self._bump("conflicts")

    def set_ports(self, rows: Sequence[SocketRow], taken_at: float | None = None,
                  netns_names: Mapping[int, str] | None = None) -> None:
        """``netns_names``: the namespaces' labels read with these rows."""
        with self._lock:
            self._ports = tuple(rows)
            if netns_names is not None and dict(netns_names) != self._netns_names:
                self._netns_names = dict(netns_names)
                self._bump("names")
            self._ports_taken_at = time.time() if taken_at is None else taken_at
            self._bump("ports")

    def set_groups(self, groups: Sequence[GroupView]) -> None:
        with self._lock:
            self._groups = tuple(groups)
            self._bump("groups")

    def set_timewait(self, view: TimewaitView) -> None:
        with self._lock:
            self._timewait = view
            self._bump("timewait")

    def update_health(self, **changes: object) -> None:
        with self._lock:
            new = replace(self._health, **changes)
            if new != self._health:
                self._health = new
                self._bump("health")

    def set_error(self, kind: str, sentence: str | None) -> None:
        """One standing error per kind (None clears it)."""
        with self._lock:
            if sentence is None:
                if self._errors.pop(kind, None) is None:
                    return
            elif self._errors.get(kind) == sentence:
                return
            else:
                self._errors[kind] = sentence
            self._health = replace(self._health, errors=tuple(sorted(self._errors.items())))
            self._bump("health")

    # -- readers

    @property
    def version(self) -> int:
        return self._version

    def snapshot(self) -> Snapshot:
        with self._lock:
            if self._snapshot is None:
                self._snapshot = Snapshot(
                    version=self._version, versions=self._versions,
                    conflicts=tuple(self._conflicts), conflicts_total=self._conflicts_total,
                    ports=self._ports, ports_taken_at=self._ports_taken_at,
                    groups=self._groups, timewait=self._timewait, health=self._health,
                    netns_names=self._netns_names,
                )
            return self._snapshot
