"""Reuseport groups as portscope sees them: the model (groups, members, join
and leave events) and the watcher that fills it from two sources, live.

Two sources, joined by socket cookie on every read:

* the inventory (``inventory.take``: sock_diag, the socket iterators and the
  owners): which groups exist (the iterators' opaque group id), their
  members, each member's owners and queue;
* the kernel's counters: the ``ps_group_counts`` map, a per-CPU hash keyed by
  socket cookie that the plan's counting program increments on every
  delivery (tracepoint plan: ``tp_btf/sk_data_ready`` on the receiving
  listener or UDP socket; fentry and kprobe plans: the exit of
  ``reuseport_select_sock``). It is read in one batch per refresh; nothing
  per connection crosses into user space.

Successive reads give rates, and membership diffs give join and leave
events (stamped with the time of the read that saw them, so within one
interval). Imbalance is measured over the time since the group's membership
last changed (tracer/balance.py).

Each member is also named by who takes its connections (tracer/acceptors.py:
the thread blocked in accept() on it, or the epoll set that waits for it),
not only by every process that inherited it, and judged between two reads
(:func:`member_status`): its process stopped, connections dropped for a full
queue (the kernel's per-socket ``sk_drops``, from a sock_diag dump), or
connections waiting that nobody took.
"""

from __future__ import annotations

import ctypes
import dataclasses
import struct
import time
from dataclasses import dataclass
from typing import Iterable

from . import libbpf
from .acceptors import TakerFinder, Takers
from .balance import imbalance
from .engine import Engine, EngineConfig, Need
from .errors import Unsupported
from .inventory import Socket, mark_takers, take
from .layout import PsCounter, PsMemberCount
from .loader import open_engine
from .plans import Part, Plan
from .records import Acceptor, Group, GroupsReading, Member, MemberEvent, Owner
from .records.groups import STATUSES
from .sockflags import SharedIterators

# A counter key no inventory has explained for this many reads belongs to a
# socket that came and went between two reads, or that is not shown (another
# namespace): its count moves to "unattributed" and the key is deleted.
UNKNOWN_READS = 2



# ---- the state model ------------------------------------------------------


@dataclass
class _Seen:
    """What the previous read knew of a member."""

    group: Group
    sock: Socket
    delivered: int
    queue: int = 0
    drops: int | None = None


@dataclass
class _Window:
    members: frozenset[int]
    baseline: dict[int, int]
    since: float  # monotonic


# ---- the watcher ----------------------------------------------------------


class GroupWatcher:
    """Counts deliveries to every reuseport group member from the moment it
    is created; :meth:`read` returns the groups as they are now.

    ``port``: only groups on this local port (filtered in the kernel too);
    ``netns``: only this namespace (see ``inventory.select_namespaces``);
    ``plan``: None chooses the best one, as every other command does."""

    def __init__(self, port: int | None = None, netns: str | None = None,
                 protocols: Iterable[str] = ("tcp", "udp"), plan: Plan | None = None,
                 btf_path: str | None = None, engine: Engine | None = None) -> None:
        """Count with ``engine`` (the process's, opened with groups; it stays
        the caller's), or with an engine of its own that loads only the
        counting and the iterators (``portscope groups``)."""
        self.port = port
        self.netns = netns
        self.protocols = tuple(protocols)
        self._owns_engine = engine is None
        if engine is None:
            engine = open_engine(EngineConfig(
                plan=plan, port=port or 0, btf_path=btf_path, events=False,
                groups=Need.REQUIRED, ring_bytes=0))
        if engine.group_plan is None:
            raise Unsupported(engine.groups_problem or "this engine does not count groups")
        self.engine: Engine | None = engine
        self.started = time.time()
        self._started_mono = time.monotonic()
        try:
            self._iterators: SharedIterators | None = SharedIterators(EngineConfig(btf_path=btf_path))
        except BaseException:
            self.close()
            raise
        self._counts = self.engine.map("ps_group_counts")
        self._ncpus = libbpf.possible_cpus()
        self._stride = (ctypes.sizeof(PsMemberCount) + 7) & ~7
        self._offset = PsMemberCount.delivered.offset
        self._members: dict[int, _Seen] | None = None  # None until the first read
        self._windows: dict[int, _Window] = {}
        self._unknown: dict[int, int] = {}  # cookie -> reads it stayed unexplained
        self._unattributed = 0
        self._last_mono: float | None = None
        self._inventory_health: dict[str, int] = {}
        self._takers = TakerFinder()
        self._unseen = 0  # holder processes whose waits could not be read, last read
        self._drops_unread = 0  # members the kernel gave no drop counter, last read

    @property
    def plan(self) -> Plan:
        assert self.engine is not None and self.engine.group_plan, "watcher is closed"
        return self.engine.group_plan

    # -- reading

    def counts(self) -> dict[int, int]:
        """Deliveries per socket cookie, summed over CPUs (one batch read)."""
        out = {}
        unpack = struct.Struct("<Q").unpack_from
        positions = [cpu * self._stride + self._offset for cpu in range(self._ncpus)]
        for key, value in self._counts.lookup_batch(self._stride * self._ncpus):
            out[int.from_bytes(key, "little")] = sum(unpack(value, p)[0] for p in positions)
        return out

    def inventory(self) -> list[Socket]:
        """Every socket that may be in a group: TCP listeners, UDP sockets
        (in any state: a connected one stays in its group), with their drops."""
        inv = take(self.port, self.protocols, {"tcp": ("LISTEN",), "udp": None}, self.netns,
                   self._iterators, takers=False, memory=True)
        self._inventory_health = inv.health()
        return [s for s in inv.sockets if s.flags is not None and s.flags.group]

    def read(self) -> GroupsReading:
        """The groups now, with rates since the previous read and the members
        that joined or left since then."""
        assert self.engine is not None, "watcher is closed"
        now, mono = time.time(), time.monotonic()
        sockets = self.inventory()
        counts = self.counts()  # after the inventory: every member seen has its key
        takers = self._takers.find((s.diag.inode, pid, fd) for s in sockets for pid, fd in s.fds)
        self._unseen = takers.unseen
        # Owners marked as every inventory marks them: who accepts, first.
        sockets = mark_takers(sockets, found=takers, every=True)
        dropped = self._drops(sockets)
        stopped = _stopped({o.pid for s in sockets for o in s.owners})
        interval = None if self._last_mono is None else mono - self._last_mono
        first = self._members is None
        previous = self._members or {}

        by_group: dict[int, list[Socket]] = {}
        for s in sockets:
            by_group.setdefault(s.flags.group, []).append(s)  # type: ignore[union-attr]
        groups: list[Group] = []
        current: dict[int, _Seen] = {}
        for gid, socks in by_group.items():
            group = self._group(gid, socks, counts, previous, interval, mono, first,
                                _Facts(takers, dropped, stopped))
            groups.append(group)
            by_cookie = {s.diag.cookie: s for s in socks}
            for m in group.members:
                current[m.cookie] = _Seen(group, by_cookie[m.cookie], m.delivered, m.queue,
                                          m.drops)
        groups.sort(key=lambda g: (g.netns, g.port, g.protocol, g.family, g.addr, g.id))

        events = [] if first else self._events(now, previous, current, counts)
        self._forget(counts, current)
        self._members = current
        self._windows = {gid: w for gid, w in self._windows.items() if gid in by_group}
        self._last_mono = mono
        return GroupsReading(now, interval, self.plan.value, groups, events, self.health())

    def _drops(self, sockets: list[Socket]) -> dict[int, int]:
        """sk_drops of every member, by cookie (read with the inventory)."""
        self._drops_unread = sum(1 for s in sockets if s.diag.drops is None)
        return {s.diag.cookie: s.diag.drops for s in sockets if s.diag.drops is not None}

    def _group(self, gid: int, socks: list[Socket], counts: dict[int, int],
               previous: dict[int, _Seen], interval: float | None, mono: float,
               first: bool, facts: "_Facts") -> Group:
        socks = _ordered(socks)
        delivered = {s.diag.cookie: counts.get(s.diag.cookie, 0) for s in socks}
        cookies = frozenset(delivered)
        window = self._windows.get(gid)
        if window is None or window.members != cookies:
            # Counts start at zero when the watcher starts: the first window
            # runs from then; a later one from the read that saw the change.
            since = self._started_mono if first else mono
            base = {} if first else dict(delivered)
            window = self._windows[gid] = _Window(cookies, base, since)
        in_window = {c: n - window.baseline.get(c, 0) for c, n in delivered.items()}
        window_total = sum(in_window.values())
        members = []
        for s in socks:
            cookie = s.diag.cookie
            n = delivered[cookie]
            rate = None
            if interval:
                before = previous[cookie].delivered if cookie in previous else 0
                rate = (n - before) / interval
            tcp = s.diag.protocol == "tcp"
            member = Member(
                cookie=cookie, inode=s.diag.inode, state=s.diag.state, owners=s.owners,
                delivered=n, rate=rate, window=in_window[cookie],
                share=in_window[cookie] / window_total if window_total else None,
                queue=s.diag.rqueue, backlog=s.diag.wqueue if tcp else None,
                acceptors=_acceptors(facts.takers, s), drops=facts.drops.get(cookie),
            )
            status, problems = member_status(member, previous.get(cookie), interval,
                                             facts.stopped)
            members.append(dataclasses.replace(member, status=status, problems=problems))
        head = socks[0]
        flags = head.flags
        assert flags is not None
        seconds = mono - window.since
        bpf = any(s.flags.group_bpf_prog for s in socks if s.flags)
        return Group(
            id=gid, netns=head.diag.netns, protocol=head.diag.protocol, family=head.diag.family,
            addr=head.diag.local_addr, port=head.diag.local_port,
            bound_dev_if=head.diag.bound_dev_if, size=flags.group_size,
            bpf=bpf, members=members, window_seconds=seconds,
            imbalance=imbalance([m.window for m in members], seconds),
            causes=_causes(bpf, members),
        )

    def _events(self, now: float, previous: dict[int, _Seen], current: dict[int, _Seen],
                counts: dict[int, int]) -> list[MemberEvent]:
        events = []
        for cookie in sorted(set(current) - set(previous)):
            events.append(_event(now, "join", current[cookie], counts.get(cookie, 0)))
        for cookie in sorted(set(previous) - set(current)):
            seen = previous[cookie]
            events.append(_event(now, "leave", seen, counts.get(cookie, seen.delivered)))
        return events

    def _forget(self, counts: dict[int, int], current: dict[int, _Seen]) -> None:
        """Delete the keys of sockets that are gone; count what no inventory
        could attribute."""
        for cookie in [c for c in self._unknown if c not in counts]:
            del self._unknown[cookie]
        departed = set(self._members or ()) - set(current)
        for cookie, n in counts.items():
            if cookie in current:
                self._unknown.pop(cookie, None)
                continue
            if cookie in departed:
                self._counts.delete(struct.pack("<Q", cookie))
                continue
            reads = self._unknown.get(cookie, 0) + 1
            if reads >= UNKNOWN_READS:
                self._unattributed += n
                self._counts.delete(struct.pack("<Q", cookie))
                self._unknown.pop(cookie, None)
            else:
                self._unknown[cookie] = reads

    def health(self) -> dict[str, int]:
        """What could not be seen or counted, as numbers (0 is good)."""
        assert self.engine is not None, "watcher is closed"
        h = dict(self._inventory_health)
        h["map_full"] = self.engine.counter(PsCounter.GROUP_FULL)
        h["no_cookie"] = self.engine.counter(PsCounter.GROUP_NO_COOKIE)
        h["missed"] = self.engine.recursion_misses(Part.GROUPS)
        h["unattributed"] = self._unattributed
        h["acceptors_unread"] = self._unseen
        h["drops_unread"] = self._drops_unread
        return h

    def close(self) -> None:
        if self._iterators:
            self._iterators.close()
            self._iterators = None
        if self.engine and self._owns_engine:
            self.engine.close()
        self.engine = None

    def __enter__(self) -> "GroupWatcher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class _Facts:
    """What one read learnt beside the inventory and the counters."""

    takers: Takers
    drops: dict[int, int]  # cookie -> sk_drops
    stopped: set[int]  # pids stopped by a signal or a debugger


def _acceptors(takers: Takers, s: Socket) -> tuple[Acceptor, ...]:
    owners = {o.pid: o for o in s.owners}
    return tuple(Acceptor(owners.get(t.pid) or Owner(t.pid, "?", readable=False), t.tid, t.how)
                 for t in takers.of(s.diag.inode))


def _stopped(pids: set[int]) -> set[int]:
    """The pids in state T (stopped) or t (stopped by a debugger)."""
    out = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                state = f.read().rpartition(b")")[2].split()[0]
        except (OSError, IndexError):
            continue
        if state in (b"T", b"t"):
            out.add(pid)
    return out


def member_status(m: Member, before: _Seen | None, interval: float | None,
                  stopped: set[int]) -> tuple[str, tuple[str, ...]]:
    """Is the member served? The worst of: its processes stopped; connections
    (datagrams) dropped since the last read; connections that waited in its
    accept queue through the whole interval while none left it."""
    problems: list[tuple[str, str]] = []
    served = m.served_by
    tcp = m.backlog is not None
    waiting = (f"{m.queue} connection(s) wait in its accept queue" if tcp
               else f"{m.queue} bytes wait in its receive queue")
    if served and all(o.pid in stopped for o in served):
        who = m.served_text()
        problems.append(("stopped", f"{who} is stopped (SIGSTOP or a debugger); {waiting}"))
    seconds = f"{interval:.1f} s" if interval else "the last interval"
    if before is not None and m.drops is not None and before.drops is not None             and m.drops > before.drops:
        n = m.drops - before.drops
        text = (f"refused {n} connection(s) in the last {seconds}: its accept queue is full "
                f"({m.queue}/{m.backlog})" if tcp else
                f"dropped {n} datagram(s) in the last {seconds}: its receive buffer is full")
        problems.append(("dropping", text))
    elif tcp and m.backlog and m.queue >= m.backlog:
        text = f"its accept queue is full ({m.queue}/{m.backlog}): the next connections are refused"
        problems.append(("dropping", text))
    if tcp and before is not None and interval and before.queue > 0 and m.queue > 0:
        arrived = m.delivered - before.delivered - max((m.drops or 0) - (before.drops or 0), 0)
        if before.queue + arrived - m.queue <= 0:
            text = f"accepted nothing in the last {seconds} while {waiting}"
            problems.append(("not_accepting", text))
    if not problems:
        return "ok", ()
    problems.sort(key=lambda p: STATUSES.index(p[0]))
    return problems[0][0], tuple(text for _, text in problems)


def _causes(bpf: bool, members: list[Member]) -> tuple[str, ...]:
    """What in a group's make-up, not its traffic, decides its split."""
    out = []
    if bpf:
        out.append("a reuseport BPF program chooses the member, not the kernel's hash")
    for m in members:
        if m.status != "ok":
            who = m.served_text() or f"inode {m.inode}"
            out.append(f"{who} (inode {m.inode}) is {m.status.replace('_', ' ')}: its share is "
                       "delivered but not served")
    backlogs = {m.backlog for m in members if m.backlog is not None}
    if len(backlogs) > 1 and any(m.status == "dropping" for m in members):
        out.append(f"members have different backlogs ({min(backlogs)} to {max(backlogs)}): the "
                   "smaller queues fill and refuse first")
    return tuple(out)


def _ordered(socks: list[Socket]) -> list[Socket]:
    """Members in a stable order: by first owner pid, then inode."""
    return sorted(socks, key=lambda s: (s.owners[0].pid if s.owners else 0, s.diag.inode,
                                        s.diag.cookie))


def _event(now: float, kind: str, seen: _Seen, delivered: int) -> MemberEvent:
    g, s = seen.group, seen.sock
    return MemberEvent(
        time=now, kind=kind, group=g.id, netns=g.netns, protocol=g.protocol, family=g.family,
        addr=g.addr, port=g.port, cookie=s.diag.cookie, inode=s.diag.inode, owners=s.owners,
        delivered=delivered,
    )
