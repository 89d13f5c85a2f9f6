"""``portscope report``: a postmortem of a journal written by ``record``.

The journal holds two kinds of facts: events (a bind/listen/connect failure,
a bind or listen success, a listener closing; each with who called it) and
snapshots (every listener, UDP socket and bound socket with its flags,
reuseport group and owners). The report reconstructs, per port, what held it
when, and applies general rules to find port hijacks:

``reuseport_other_uid``
    an EADDRINUSE whose blocker is a SO_REUSEPORT socket of another uid: a
    process of another user tried to join a reuseport group;
``reuseport_foreign_member``
    a process joined an existing reuseport group although its executable or
    cgroup differs from every member's (same uid, so the kernel let it in
    and it takes a share of the connections or datagrams);
``udp_shared``
    UDP sockets on the same address and port (shared through SO_REUSEADDR or
    SO_REUSEPORT, outside one reuseport group) owned by different
    executables or uids;
``restart_race``
    a port bound by another executable within ``--race-window`` seconds of
    its previous owner's socket closing;
``wildcard_shadowed``
    a socket on a specific address next to a wildcard socket of other
    processes on the same port: the more specific one receives that
    address's traffic;
``reuseport_bpf_attached``
    a reuseport group that had no BPF program got one (it now decides which
    member receives each connection or datagram).

Each finding names the processes that did it (``pids``) and the ones it was
done to (``owners``), with the events and snapshot rows that show it.
"""

from __future__ import annotations

import argparse
import bisect
import errno
import ipaddress
import json
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable

from .bindrules import LISTEN, Rule, Sock, overlap, tcp_rule, udp_rule
from .errors import ExitStatus
from .journal import JournalReader
from .text import clock_text, printable

MAX_PORTS_SHOWN = 200  # human output: timeline sections before "... and N more"
CONTEXT_S = 300.0  # read this far before --since: the rules need what came before
WILDCARDS = ("0.0.0.0", "::")

KINDS = ("reuseport_other_uid", "reuseport_foreign_member", "udp_shared", "restart_race",
         "wildcard_shadowed", "reuseport_bpf_attached")


# ---- the journal's contents, as the rules see them ---------------------------------


@dataclass(frozen=True)
class Snap:
    id: int
    session: int
    time: float  # the inventory started
    end: float  # and ended: what it saw existed somewhere in [time, end]


@dataclass(eq=False)
class Row:
    """A socket state seen by the snapshots first..last (inclusive)."""

    id: int
    session: int
    first: int
    last: int
    netns: int
    protocol: str
    family: str
    state: str
    addr: str
    port: int
    dev: int
    uid: int
    inode: int
    options: frozenset[str] | None
    group: int | None
    group_size: int | None
    bpf: bool
    owners: list[dict[str, Any]]

    @property
    def pids(self) -> list[int]:
        return sorted({o["pid"] for o in self.owners})

    @property
    def exes(self) -> frozenset[str]:
        return frozenset(o["exe"] for o in self.owners if o.get("exe"))

    @property
    def identities(self) -> frozenset[tuple[str, str | None]]:
        return frozenset((o["exe"], o.get("cgroup")) for o in self.owners if o.get("exe"))

    @property
    def local(self) -> str:
        return endpoint(self.family, self.addr, self.port)

    def sock(self) -> Sock:
        opts = self.options or frozenset()
        return Sock(self.protocol, self.family, self.addr, self.port, self.state,
                    "reuseaddr" in opts, "reuseport" in opts, "v6only" in opts, self.dev, self.uid)


@dataclass(eq=False)
class Ev:
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
    exe: str | None
    cgroup: str | None
    owner_uid: int | None
    blockers: Any
    explanation: Any = None  # the on-the-spot explanation (reasons, fixes, notes) or None

    @property
    def ok(self) -> bool:
        return self.errno == 0

    @property
    def local_addr(self) -> str:
        """The address the call concerns: what it got, or what it asked for."""
        return self.bound_addr if self.ok and self.call != "connect" else self.addr

    @property
    def local_port(self) -> int:
        return (self.bound_port or self.port) if self.ok and self.call != "connect" else self.port

    @property
    def local(self) -> str:
        return endpoint(self.family, self.local_addr, self.local_port)

    def sock(self) -> Sock:
        return Sock(self.protocol, self.family, self.local_addr, self.local_port,
                    LISTEN if self.call == "listen" else "CLOSE", "reuseaddr" in self.options,
                    "reuseport" in self.options, "v6only" in self.options, self.dev, self.sock_uid)


def endpoint(family: str, addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if family == "ipv6" else f"{addr}:{port}"


class History:
    """Events and snapshots loaded from the journal, indexed for the rules.

    Rows come through :meth:`JournalReader.rows` (types checked); what the
    rules further rely on (addresses that parse, owners with a pid) is
    checked here, and a row that fails is left out and counted like the
    reader's own damaged rows."""

    def __init__(self, reader: JournalReader, start: float | None, port: int | None,
                 netns: int | None) -> None:
        where, params = _filters(port, netns)
        # Snapshots and events: from CONTEXT_S before the window on (the rules
        # look back), snapshots from the last one before that.
        first_snap = 0
        if start is not None:
            first_snap = reader.scalar("SELECT max(id) FROM snapshots WHERE time < ?",
                                       (start - CONTEXT_S,), int) or 0
        self.snaps = [Snap(r["id"], r["session"], r["time"], r["time"] + max(r["duration"], 0.0))
                      for r in reader.rows("snapshots", "id >= ?", (first_snap,),
                                           columns=("id", "session", "time", "duration"))]
        self.snap_by_id = {s.id: s for s in self.snaps}
        self._snap_ids = [s.id for s in self.snaps]
        self._snap_ends = [s.end for s in self.snaps]
        self._snap_starts = [s.time for s in self.snaps]
        session_last: dict[int, int] = {}
        for s in self.snaps:
            session_last[s.session] = max(session_last.get(s.session, 0), s.id)
        self.rows: list[Row] = []
        for r in reader.rows("snapshot_sockets", "(last_snapshot IS NULL OR last_snapshot >= ?)"
                             + where, (first_snap, *params)):
            last = r["last_snapshot"] if r["last_snapshot"] is not None else session_last.get(
                r["session"], r["first_snapshot"])
            row = _row(r, last)
            if row is None:
                reader.damaged["snapshot_sockets"] = reader.damaged.get("snapshot_sockets", 0) + 1
                continue
            self.rows.append(row)
        self.rows.sort(key=lambda r: (r.first, r.id))
        self.by_port: dict[tuple[int, str, int], list[Row]] = {}
        self.by_inode: dict[tuple[int, int], list[Row]] = {}
        for row in self.rows:
            self.by_port.setdefault((row.netns, row.protocol, row.port), []).append(row)
            if row.inode:
                self.by_inode.setdefault((row.netns, row.inode), []).append(row)

        ev_where, ev_params = _event_filters(port, netns)
        self.events: list[Ev] = []
        for r in reader.rows(
                "events", "time >= ?"
                # Successful binds to port 0 (ephemeral) hold no port anyone asked for.
                " AND NOT (call = 'bind' AND errno = 0 AND port = 0)" + ev_where,
                ((start - CONTEXT_S) if start is not None else 0, *ev_params), order="time, id"):
            ev = _event(r)
            if ev is None:
                reader.damaged["events"] = reader.damaged.get("events", 0) + 1
                continue
            self.events.append(ev)
        self.events_by_inode: dict[tuple[int, int], list[Ev]] = {}
        self._pid_seen: dict[int, list[tuple[float, str, str | None, int | None]]] = {}
        for ev in self.events:
            if ev.inode:
                self.events_by_inode.setdefault((ev.netns, ev.inode), []).append(ev)
            if ev.exe:
                self._pid_seen.setdefault(ev.pid, []).append((ev.time, ev.exe, ev.cgroup, ev.owner_uid))
        for row in self.rows:
            t = self.snap_by_id[row.first].time if row.first in self.snap_by_id else 0.0
            for o in row.owners:
                if o.get("exe"):
                    self._pid_seen.setdefault(o["pid"], []).append((t, o["exe"], o.get("cgroup"), o.get("uid")))

    # -- snapshots

    def alive(self, snap_id: int, netns: int, protocol: str, port: int) -> list[Row]:
        return [r for r in self.by_port.get((netns, protocol, port), ()) if r.first <= snap_id <= r.last]

    def before(self, t: float) -> Snap | None:
        """The last snapshot that ended before ``t``."""
        i = bisect.bisect_left(self._snap_ends, t) - 1
        # Ends are not strictly sorted if a snapshot took long; walk back to be sure.
        while i >= 0 and self.snaps[i].end >= t:
            i -= 1
        return self.snaps[i] if i >= 0 else None

    def after(self, t: float) -> Snap | None:
        """The first snapshot that started after ``t``."""
        i = bisect.bisect_right(self._snap_starts, t)
        return self.snaps[i] if i < len(self.snaps) else None

    def next_of(self, snap_id: int) -> Snap | None:
        i = bisect.bisect_right(self._snap_ids, snap_id)
        return self.snaps[i] if i < len(self.snaps) else None

    def prev_of(self, snap_id: int) -> Snap | None:
        i = bisect.bisect_left(self._snap_ids, snap_id) - 1
        return self.snaps[i] if i >= 0 else None

    def row_at(self, netns: int, inode: int, snap_id: int) -> Row | None:
        for r in self.by_inode.get((netns, inode), ()):
            if r.first <= snap_id <= r.last:
                return r
        return None

    def first_seen(self, netns: int, inode: int) -> Snap | None:
        rows = self.by_inode.get((netns, inode))
        return self.snap_by_id.get(rows[0].first) if rows else None

    def took_at(self, netns: int, inode: int, calls: tuple[str, ...]) -> Ev | None:
        """The first successful call of ``calls`` on the socket, if recorded."""
        for ev in self.events_by_inode.get((netns, inode), ()):
            if ev.ok and ev.call in calls:
                return ev
        return None

    # -- who a process is

    def identity(self, pid: int, t: float) -> tuple[str | None, str | None, int | None]:
        """(exe, cgroup, uid) of ``pid`` as recorded nearest to ``t``."""
        seen = self._pid_seen.get(pid)
        if not seen:
            return None, None, None
        best = min(seen, key=lambda s: abs(s[0] - t))
        return best[1], best[2], best[3]

    def ev_identity(self, ev: Ev) -> tuple[str | None, str | None]:
        if ev.exe:
            return ev.exe, ev.cgroup
        exe, cgroup, _ = self.identity(ev.pid, ev.time)
        return exe, cgroup


OWNER_TEXT = ("comm", "exe", "cmdline", "user", "cgroup", "unit", "container", "pod")


def _address(family: str, addr: str) -> bool:
    """An address the rules can compare: of its family, as the kernel writes it."""
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    return family == ("ipv6" if ip.version == 6 else "ipv4")


def _port(value: int) -> bool:
    return 0 <= value <= 0xFFFF


def _owner_list(owners: list[Any]) -> list[dict[str, Any]] | None:
    """Owners as recorded (a list of {pid, comm, exe, ...}), or None when
    an entry is not one."""
    out = []
    for o in owners:
        if not isinstance(o, dict) or type(o.get("pid")) is not int:
            return None
        if any(o.get(k) is not None and not isinstance(o.get(k), str) for k in OWNER_TEXT):
            return None
        if o.get("uid") is not None and type(o.get("uid")) is not int:
            return None
        out.append(o)
    return out


def _blockers(value: Any) -> Any:
    """An event's on-the-spot blockers: a list of {pids, comm, state, local,
    rule}, or {"error": sentence}; ValueError when it is neither."""
    if value is None:
        return None
    if isinstance(value, dict):
        if not isinstance(value.get("error"), str):
            raise ValueError("blockers")
        return value
    for b in value:
        if not isinstance(b, dict) or not isinstance(b.get("pids", []), list) \
                or not all(type(p) is int for p in b.get("pids", [])):
            raise ValueError("blockers")
    return value


def _row(r: dict[str, Any], last: int) -> Row | None:
    """A snapshot_sockets row for the rules, or None when it is damaged."""
    if r["protocol"] not in ("tcp", "udp"):
        return None
    owners = _owner_list(r["owners"])
    if owners is None or not _address(r["family"], r["addr"]) or not _port(r["port"]):
        return None
    return Row(
        r["id"], r["session"], r["first_snapshot"], last, r["netns"], r["protocol"],
        r["family"], r["state"], r["addr"], r["port"], r["bound_dev_if"], r["uid"], r["inode"],
        None if r["options"] is None else frozenset(filter(None, r["options"].split(","))),
        r["group_id"], r["group_size"], bool(r["group_bpf"]), owners)


EVENT_CALLS = frozenset({"bind", "listen", "connect", "get_port", "listen_close"})


def _event(r: dict[str, Any]) -> Ev | None:
    """An events row for the rules, or None when it is damaged."""
    if r["call"] not in EVENT_CALLS or r["protocol"] not in ("tcp", "udp"):
        return None
    if not (_address(r["family"], r["bound_addr"]) and _port(r["port"]) and _port(r["bound_port"])):
        return None
    if r["addr_family"] in ("ipv4", "ipv6") and not _address(r["addr_family"], r["addr"]):
        return None
    try:
        blockers = _blockers(r["blockers"])
        explanation = _explanation(r.get("explanation"))
    except ValueError:
        return None
    return Ev(
        r["id"], r["session"], r["time"], r["call"], r["result"], r["errno"], r["pid"],
        r["uid"], r["sock_uid"], r["comm"], r["netns"], r["family"], r["protocol"],
        r["addr"], r["port"], r["bound_addr"], r["bound_port"],
        frozenset(filter(None, r["options"].split(","))), r["bound_dev_if"], r["inode"],
        r["exe"], r["cgroup"], r["owner_uid"], blockers, explanation)


def _explanation(value: Any) -> Any:
    """An event's explanation as the journal keeps it ({errno, reasons,
    fixes, notes}, or {"error": sentence}); ValueError when it is neither."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError("explanation")
    if "error" in value:
        if not isinstance(value["error"], str):
            raise ValueError("explanation")
        return value
    for key in ("reasons", "fixes", "notes"):
        items = value.get(key, [])
        if not isinstance(items, list) or not all(
                isinstance(i, dict) and isinstance(i.get("text", ""), str) for i in items):
            raise ValueError("explanation")
    return value


def first_reason(explanation: Any) -> dict[str, Any] | None:
    """{errno, rule, text} of the explanation's first reason, or None."""
    reasons = explanation.get("reasons") if isinstance(explanation, dict) else None
    if not reasons:
        return None
    r = reasons[0]
    return {"errno": r.get("errno"), "rule": r.get("rule"), "text": r.get("text", "")}


def _filters(port: int | None, netns: int | None) -> tuple[str, list[int]]:
    where, params = "", []
    if netns is not None:
        where += " AND netns = ?"
        params.append(netns)
    if port is not None:
        where += " AND port = ?"
        params.append(port)
    return where, params


def _event_filters(port: int | None, netns: int | None) -> tuple[str, list[int]]:
    where, params = "", []
    if netns is not None:
        where += " AND netns = ?"
        params.append(netns)
    if port is not None:
        where += " AND (port = ? OR bound_port = ?)"
        params += [port, port]
    return where, params


# ---- findings ------------------------------------------------------------------------


@dataclass
class Finding:
    kind: str
    time: float
    netns: int
    protocol: str
    port: int
    pids: list[int]  # who did it
    owners: list[int]  # whom it was done to
    summary: str
    evidence: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "time": self.time, "netns": self.netns,
                "protocol": self.protocol, "port": self.port, "pids": self.pids,
                "owners": self.owners, "summary": self.summary, "evidence": self.evidence,
                "notes": self.notes}


def event_evidence(ev: Ev, h: History) -> dict[str, Any]:
    exe, cgroup = h.ev_identity(ev)
    out: dict[str, Any] = {
        "type": "event", "id": ev.id, "time": ev.time, "call": ev.call, "result": ev.result,
        "pid": ev.pid, "comm": ev.comm, "exe": exe, "cgroup": cgroup, "uid": ev.uid,
        "sock_uid": ev.sock_uid, "protocol": ev.protocol, "local": ev.local,
        "options": sorted(ev.options), "inode": ev.inode,
    }
    if ev.blockers is not None:
        out["blockers"] = ev.blockers
    return out


def row_evidence(row: Row, snap: Snap | None) -> dict[str, Any]:
    return {
        "type": "snapshot", "snapshot": snap.id if snap else row.first,
        "time": snap.time if snap else None, "protocol": row.protocol, "state": row.state,
        "local": row.local, "options": sorted(row.options) if row.options is not None else None,
        "group": row.group, "group_size": row.group_size, "bpf": row.bpf, "uid": row.uid,
        "inode": row.inode,
        "owners": [{k: o.get(k) for k in ("pid", "comm", "exe", "uid", "cgroup")} for o in row.owners],
    }


def _who(pids: Iterable[int], h: History, t: float, cgroup: bool = False) -> str:
    """'pid 12 (/usr/sbin/nginx, uid 33)', or several."""
    parts = []
    for pid in sorted(set(pids)):
        exe, group, uid = h.identity(pid, t)
        detail = ", ".join(x for x in (exe, f"cgroup {group}" if cgroup and group else None,
                                       None if uid is None else f"uid {uid}") if x)
        parts.append(f"{pid} ({detail})" if detail else str(pid))
    return ("pid " if len(parts) == 1 else "pids ") + ", ".join(parts) if parts else "no known process"


def _overlaps(a: Sock, b: Sock) -> bool:
    devices = not a.bound_dev_if or not b.bound_dev_if or a.bound_dev_if == b.bound_dev_if
    return devices and overlap(a, b) is not None


def find_reuseport_other_uid(h: History) -> list[Finding]:
    """EADDRINUSE with SO_REUSEPORT, blocked by a SO_REUSEPORT socket of another uid."""
    found: dict[tuple[int, str, int, int], Finding] = {}
    attempts: dict[tuple[int, str, int, int], int] = {}
    for ev in h.events:
        if ev.errno != errno.EADDRINUSE or ev.call not in ("bind", "listen") or "reuseport" not in ev.options:
            continue
        owners: list[int] = []
        evidence: list[dict[str, Any]] = []
        hits = []
        if isinstance(ev.blockers, list):
            hits = [b for b in ev.blockers if b.get("rule") == Rule.REUSEPORT_OTHER_UID.value]
            if not hits and ev.blockers:
                continue  # explained, and not by the uid check
            for b in hits:
                owners += b.get("pids", [])
        if not hits:  # not explained on the spot: the snapshots around it
            new = ev.sock()
            for snap in filter(None, (h.before(ev.time), h.after(ev.time))):
                rows = [r for r in h.alive(snap.id, ev.netns, ev.protocol, ev.port)
                        if r.inode != ev.inode and r.state not in ("TIME_WAIT", "SYN_RECV")
                        and _overlaps(new, r.sock())
                        and (tcp_rule if ev.protocol == "tcp" else udp_rule)(new, r.sock())
                        is Rule.REUSEPORT_OTHER_UID]
                if rows:
                    owners = sorted({p for r in rows for p in r.pids})
                    evidence += [row_evidence(r, snap) for r in rows]
                    break
            if not owners and not evidence:
                continue
        key = (ev.netns, ev.protocol, ev.port, ev.pid)
        f = found.get(key)
        if f is None:
            f = found[key] = Finding(
                "reuseport_other_uid", ev.time, ev.netns, ev.protocol, ev.port, [ev.pid], [], "",
                [event_evidence(ev, h)])
            before = h.before(ev.time)
            if before:
                f.evidence += [row_evidence(r, before) for r in h.alive(before.id, ev.netns, ev.protocol, ev.port)
                               if set(r.pids) & set(owners) and r.inode != ev.inode]
            f.evidence += [e for e in evidence if e not in f.evidence]
        elif len(f.evidence) < 12:  # a storm of attempts: the first few
            f.evidence.append(event_evidence(ev, h))
        attempts[key] = attempts.get(key, 0) + 1
        f.owners = sorted(set(f.owners) | set(owners))
    for key, f in found.items():
        n = attempts[key]
        f.summary = (f"{_who(f.pids, h, f.time)} tried to join the SO_REUSEPORT group of "
                     f"{_who(f.owners, h, f.time)} on {f.protocol} {f.evidence[0]['local']}: "
                     f"refused with EADDRINUSE by the kernel's uid check ({n} attempt"
                     f"{'s' if n != 1 else ''})")
    return list(found.values())


def find_foreign_members(h: History) -> list[Finding]:
    """A socket joined a reuseport group whose members are another executable or cgroup."""
    out: list[Finding] = []
    judged: set[tuple[int, int]] = set()
    for ev in h.events:
        if not ev.ok or "reuseport" not in ev.options or not ev.inode:
            continue
        # A TCP socket enters its group when it listens, a UDP socket when it binds.
        if (ev.protocol, ev.call) not in (("tcp", "listen"), ("udp", "bind")):
            continue
        key = (ev.netns, ev.inode)
        if key in judged:
            continue
        judged.add(key)
        port = ev.local_port
        after = h.after(ev.time)
        mine = None
        while after is not None and after.time - ev.time < 30:
            mine = h.row_at(ev.netns, ev.inode, after.id)
            if mine is not None:
                break
            after = h.next_of(after.id)
        members: list[tuple[Row, Snap]] = []
        if mine is not None and mine.group and after is not None:
            for r in h.alive(after.id, ev.netns, ev.protocol, port):
                if r.group == mine.group and r.inode != ev.inode and _existed_before(h, r, ev.time):
                    members.append((r, after))
        elif mine is None:
            before = h.before(ev.time)
            if before is not None:
                for r in h.alive(before.id, ev.netns, ev.protocol, port):
                    if (r.group and r.inode != ev.inode and r.uid == ev.sock_uid
                            and r.options is not None and "reuseport" in r.options
                            and r.addr == ev.local_addr and r.dev == ev.dev
                            and (r.state == LISTEN or ev.protocol == "udp")):
                        members.append((r, before))
        if not members:
            continue  # it founded the group
        exe, cgroup = h.ev_identity(ev)
        if exe is None and mine is not None:
            mine_ids = [(o["exe"], o.get("cgroup")) for o in mine.owners if o["pid"] == ev.pid and o.get("exe")]
            exe, cgroup = mine_ids[0] if mine_ids else (None, None)
        known = frozenset().union(*(r.identities for r, _ in members))
        if exe is None or not known or (exe, cgroup) in known:
            continue
        pids = sorted({ev.pid, *(mine.pids if mine else ())})
        owners = sorted({p for r, _ in members for p in r.pids})
        f = Finding(
            "reuseport_foreign_member", ev.time, ev.netns, ev.protocol, port, pids, owners,
            f"{_who(pids, h, ev.time, cgroup=True)} joined the SO_REUSEPORT group of "
            f"{_who(owners, h, ev.time, cgroup=True)} on {ev.protocol} {ev.local} with another "
            f"{'executable' if exe not in {e for e, _ in known} else 'cgroup'}: "
            "same uid, so the kernel let it in and it now receives a share of the "
            + ("connections" if ev.protocol == "tcp" else "datagrams"),
            [event_evidence(ev, h)])
        f.evidence += [row_evidence(r, s) for r, s in members]
        if mine is not None and after is not None:
            f.evidence.append(row_evidence(mine, after))
        out.append(f)
    out += _foreign_members_from_snapshots(h, judged)
    return out


def _existed_before(h: History, row: Row, t: float) -> bool:
    seen = h.first_seen(row.netns, row.inode)
    if seen is not None and seen.end < t:
        return True
    took = h.took_at(row.netns, row.inode, ("listen",) if row.protocol == "tcp" else ("bind",))
    return took is not None and took.time < t


def _foreign_members_from_snapshots(h: History, judged: set[tuple[int, int]]) -> list[Finding]:
    """Members whose joining was not recorded (it happened before the
    journal began, or its event was lost): judged by the first snapshot
    that shows them in the group, against the members seen before them."""
    out = []
    for row in h.rows:
        key = (row.netns, row.inode)
        if not row.group or not row.inode or key in judged:
            continue
        judged.add(key)
        first = h.by_inode[key][0]
        if h.took_at(row.netns, row.inode, ("listen", "bind")) is not None:
            continue
        snap = h.snap_by_id.get(first.first)
        if snap is None or not first.group:
            continue
        mine_first = first.first
        earlier = []
        for r in h.alive(snap.id, row.netns, row.protocol, row.port):
            if r.group != first.group or r.inode == row.inode:
                continue
            seen = h.by_inode[(r.netns, r.inode)][0].first
            if seen < mine_first or (seen == mine_first and r.inode < row.inode):
                earlier.append(r)
        known = frozenset().union(*(r.identities for r in earlier)) if earlier else frozenset()
        if not known or not first.identities or first.identities & known:
            continue
        pids, owners = first.pids, sorted({p for r in earlier for p in r.pids})
        f = Finding(
            "reuseport_foreign_member", snap.time, row.netns, row.protocol, row.port, pids, owners,
            f"{_who(pids, h, snap.time, cgroup=True)} is in the SO_REUSEPORT group of "
            f"{_who(owners, h, snap.time, cgroup=True)} on {row.protocol} {row.local} with another "
            "executable or cgroup",
            [row_evidence(first, snap)] + [row_evidence(r, snap) for r in earlier],
            ["its joining was not recorded (before the journal began, or the event was lost): "
             "judged from the first snapshot that shows it"])
        out.append(f)
    return out


def find_udp_shared(h: History) -> list[Finding]:
    """UDP sockets on one address and port, outside one reuseport group, of
    different executables or uids."""
    out: dict[tuple[int, int, int], Finding] = {}
    for row in h.rows:
        if row.protocol != "udp":
            continue
        snap = h.snap_by_id.get(row.first)
        if snap is None:
            continue
        for other in h.alive(row.first, row.netns, "udp", row.port):
            if other.inode == row.inode or (row.group and other.group == row.group):
                continue
            if (row.addr in WILDCARDS) != (other.addr in WILDCARDS):
                continue  # a specific address under a wildcard: wildcard_shadowed
            if not _overlaps(row.sock(), other.sock()):
                continue
            differs = row.uid != other.uid or bool(row.exes and other.exes and not row.exes & other.exes)
            if not differs or set(row.pids) & set(other.pids):
                continue
            early, late = sorted((row, other), key=lambda r: _start(h, r))
            key = (late.netns, late.port, late.inode)
            f = out.get(key)
            if f is None:
                took = h.took_at(late.netns, late.inode, ("bind",))
                f = out[key] = Finding(
                    "udp_shared", took.time if took else snap.time, late.netns, "udp", late.port,
                    late.pids, [], "", [event_evidence(took, h)] if took else [])
                f.evidence.append(row_evidence(late, snap))
            if not set(early.pids) <= set(f.owners):
                f.owners = sorted(set(f.owners) | set(early.pids))
                f.evidence.append(row_evidence(early, snap))
    for f in out.values():
        local = next(e["local"] for e in f.evidence if e["type"] == "snapshot")
        f.summary = (f"udp {local} is shared by {_who(f.pids, h, f.time)} and "
                     f"{_who(f.owners, h, f.time)}, of different executables or users "
                     "(SO_REUSEADDR or SO_REUSEPORT on both): each gets part of the datagrams "
                     "sent to the port")
    return list(out.values())


def _start(h: History, row: Row) -> tuple[float, int]:
    """When a socket started to hold its port: its bind/listen, or its first sighting."""
    took = h.took_at(row.netns, row.inode, ("listen", "bind"))
    first = h.first_seen(row.netns, row.inode)
    return (took.time if took else (first.time if first else 0.0), row.inode)


def find_restart_races(h: History, window: float) -> list[Finding]:
    """A port bound by another executable within ``window`` seconds of its
    previous owner's socket closing."""
    releases: list[dict[str, Any]] = []
    for ev in h.events:
        if ev.call == "listen_close":
            releases.append(_release_from_close(h, ev))
    for rows in h.by_inode.values():
        last = rows[-1]
        if last.protocol != "udp":
            continue  # TCP listeners report their close as an event
        nxt = h.next_of(last.last)
        if nxt is None or nxt.session != last.session:
            continue  # the recording ended, not the socket
        snap = h.snap_by_id.get(last.last)
        releases.append({"time": snap.end if snap else 0.0, "until": nxt.time, "netns": last.netns,
                         "protocol": "udp", "sock": last.sock(), "pids": last.pids,
                         "exes": last.exes, "evidence": [row_evidence(last, snap)],
                         "inode": last.inode})
    by_port: dict[tuple[int, str, int], list[dict[str, Any]]] = {}
    for rel in releases:
        by_port.setdefault((rel["netns"], rel["protocol"], rel["sock"].port), []).append(rel)
    out = []
    for ev in h.events:
        if ev.call != "bind" or not ev.ok or not ev.port:
            continue
        candidates = []
        for rel in by_port.get((ev.netns, ev.protocol, ev.local_port), ()):
            start, until = rel["time"], rel.get("until", rel["time"])
            if not start <= ev.time <= until + window or rel["inode"] == ev.inode:
                continue
            if not _overlaps(ev.sock(), rel["sock"]):
                continue
            candidates.append(rel)
        if not candidates:
            continue
        rel = max(candidates, key=lambda r: r["time"])
        exe, _ = h.ev_identity(ev)
        if exe is None or not rel["exes"] or exe in rel["exes"] or ev.pid in rel["pids"]:
            continue
        gap = max(0.0, ev.time - rel["time"])
        took = f"{gap:.1f}s after" if "until" not in rel else \
            f"at most {max(0.0, ev.time - rel['time']):.1f}s after"
        f = Finding(
            "restart_race", ev.time, ev.netns, ev.protocol, ev.local_port, [ev.pid], rel["pids"],
            f"{_who([ev.pid], h, ev.time)} took {ev.protocol} {ev.local} {took} "
            f"{_who(rel['pids'], h, rel['time'])} ({', '.join(sorted(rel['exes']))}) closed its "
            "socket there: another executable won the restart race for the port",
            rel["evidence"] + [event_evidence(ev, h)])
        after = h.after(ev.time)
        mine = h.row_at(ev.netns, ev.inode, after.id) if after else None
        if mine is not None:
            f.evidence.append(row_evidence(mine, after))
        out.append(f)
    return out


def _release_from_close(h: History, ev: Ev) -> dict[str, Any]:
    """A listener's close, with whose socket it was: the owners the snapshots
    saw, or the process that listened on it, or (last) the closing task."""
    evidence: list[dict[str, Any]] = []
    pids: list[int] = []
    exes: frozenset[str] = frozenset()
    rows = h.by_inode.get((ev.netns, ev.inode), [])
    if rows:
        last = rows[-1]
        pids, exes = last.pids, last.exes
        evidence.append(row_evidence(last, h.snap_by_id.get(last.last)))
    listened = h.took_at(ev.netns, ev.inode, ("listen",))
    if listened is not None:
        exe, _ = h.ev_identity(listened)
        if not exes and exe:
            pids, exes = [listened.pid], frozenset({exe})
        evidence.insert(0, event_evidence(listened, h))
    if not exes:
        exe, _ = h.ev_identity(ev)
        pids, exes = [ev.pid], frozenset({exe} if exe else ())
    evidence.append(event_evidence(ev, h))
    return {"time": ev.time, "netns": ev.netns, "protocol": ev.protocol, "sock": ev.sock(),
            "pids": pids, "exes": exes, "evidence": evidence, "inode": ev.inode}


def find_shadowed_wildcards(h: History) -> list[Finding]:
    """A specific-address socket next to a wildcard one of other processes
    on the same port (TCP: both listening)."""
    out: dict[tuple[int, str, int], Finding] = {}
    for row in h.rows:
        if row.protocol == "tcp" and row.state != LISTEN:
            continue
        snap = h.snap_by_id.get(row.first)
        if snap is None:
            continue
        for other in h.alive(row.first, row.netns, row.protocol, row.port):
            if other.inode == row.inode or (row.protocol == "tcp" and other.state != LISTEN):
                continue
            pair = (row, other) if other.addr in WILDCARDS else (other, row)
            specific, wild = pair
            if specific.addr in WILDCARDS or wild.addr not in WILDCARDS:
                continue
            if not _overlaps(specific.sock(), wild.sock()):
                continue
            if not specific.pids or not wild.pids or set(specific.pids) & set(wild.pids):
                continue
            key = (specific.netns, specific.protocol, specific.inode)
            f = out.get(key)
            if f is None:
                took = h.took_at(specific.netns, specific.inode,
                                 ("listen",) if specific.protocol == "tcp" else ("bind",))
                wild_took = h.took_at(wild.netns, wild.inode,
                                      ("listen",) if wild.protocol == "tcp" else ("bind",))
                when = max([t.time for t in (took, wild_took) if t] or [snap.time])
                f = out[key] = Finding(
                    "wildcard_shadowed", when, specific.netns, specific.protocol, specific.port,
                    specific.pids, [], "", [event_evidence(t, h) for t in (took, wild_took) if t])
                f.evidence.append(row_evidence(specific, snap))
            if not set(wild.pids) <= set(f.owners):
                f.owners = sorted(set(f.owners) | set(wild.pids))
                f.evidence.append(row_evidence(wild, snap))
    for f in out.values():
        snaps = [e for e in f.evidence if e["type"] == "snapshot"]
        specific_local = snaps[0]["local"]
        wild_locals = sorted({e["local"] for e in snaps[1:]})
        addr = specific_local.rsplit(":", 1)[0]
        f.summary = (f"{_who(f.pids, h, f.time)} holds {f.protocol} {specific_local}, a specific "
                     f"address under the wildcard {', '.join(wild_locals)} of "
                     f"{_who(f.owners, h, f.time)}: what is sent to {addr} port {f.port} goes "
                     "to it, not to the wildcard's owner")
    return list(out.values())


def find_bpf_attached(h: History) -> list[Finding]:
    """A reuseport group that had no BPF program in one snapshot and has one in the next."""
    out: dict[tuple[int, str, int, int], Finding] = {}
    for row in h.rows:
        if not row.group or not row.bpf:
            continue
        snap = h.snap_by_id.get(row.first)
        prev = h.prev_of(row.first)
        if snap is None or prev is None:
            continue
        members = [r for r in h.alive(snap.id, row.netns, row.protocol, row.port) if r.group == row.group]
        before = [r for m in members for r in [h.row_at(m.netns, m.inode, prev.id)] if r is not None]
        if not before or any(r.bpf for r in before) or not any(r.group for r in before):
            continue
        key = (row.netns, row.protocol, row.port, row.group)
        if key in out:
            continue
        pids = sorted({p for m in members for p in m.pids})
        out[key] = Finding(
            "reuseport_bpf_attached", snap.time, row.netns, row.protocol, row.port, pids,
            sorted({p for r in before for p in r.pids}),
            f"a reuseport BPF program was attached to the SO_REUSEPORT group on {row.protocol} "
            f"{row.local} (members: {_who(pids, h, snap.time)}) between "
            f"{_stamp(prev.time)} and {_stamp(snap.end)}; it had none before: the program now "
            "chooses which member receives each " + ("connection" if row.protocol == "tcp" else "datagram")
            + " (one of the members' processes attached it)",
            [row_evidence(r, prev) for r in before] + [row_evidence(m, snap) for m in members])
    return list(out.values())


def find_all(h: History, race_window: float) -> list[Finding]:
    findings = (find_reuseport_other_uid(h) + find_foreign_members(h) + find_udp_shared(h)
                + find_restart_races(h, race_window) + find_shadowed_wildcards(h)
                + find_bpf_attached(h))
    findings.sort(key=lambda f: (f.time, KINDS.index(f.kind), f.port))
    return findings


# ---- the timeline -------------------------------------------------------------------

WHAT = {"bind": "bound", "listen": "listening", "listen_close": "closed", "connect": "connected"}


def timeline(h: History) -> list[dict[str, Any]]:
    """Conflicts and ownership changes, per port, in time order."""
    entries: list[dict[str, Any]] = []
    for ev in h.events:
        exe, _ = h.ev_identity(ev)
        entry = {
            "time": ev.time, "netns": ev.netns, "protocol": ev.protocol, "port": ev.local_port,
            "what": WHAT.get(ev.call, ev.call) if ev.ok else "conflict", "call": ev.call,
            "result": ev.result, "local": ev.local, "pids": [ev.pid], "comm": ev.comm, "exe": exe,
            "uid": ev.uid, "options": sorted(ev.options), "inode": ev.inode, "count": 1,
        }
        if not ev.ok and isinstance(ev.blockers, list):
            entry["blockers"] = ev.blockers
        if not ev.ok and ev.explanation is not None:
            entry["reason"] = first_reason(ev.explanation)
            entry["explanation"] = ev.explanation
        entries.append(entry)
    for key, rows in h.by_inode.items():
        entries += _row_changes(h, rows)
    entries.sort(key=lambda e: (e["netns"], e["protocol"], e["port"], e["time"]))
    return _collapse(_prune(entries))


def _prune(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Leave out TCP ports that were only bound (a client's bind before
    connect, a bind storm): nobody listened there, nothing conflicted."""
    busy = {(e["netns"], e["protocol"], e["port"]) for e in entries
            if e["protocol"] != "tcp" or e["what"] != "bound"}
    return [e for e in entries if (e["netns"], e["protocol"], e["port"]) in busy]


def _row_changes(h: History, rows: list[Row]) -> list[dict[str, Any]]:
    out = []
    netns, inode = rows[0].netns, rows[0].inode
    events = h.events_by_inode.get((netns, inode), [])
    calls = {e.call for e in events if e.ok}

    def entry(row: Row, snap: Snap | None, what: str, detail: str) -> dict[str, Any]:
        owner = row.owners[0] if row.owners else {}
        return {"time": snap.time if snap else 0.0, "netns": row.netns, "protocol": row.protocol,
                "port": row.port, "what": what, "call": None, "result": None, "local": row.local,
                "pids": row.pids, "comm": owner.get("comm"), "exe": owner.get("exe"),
                "uid": row.uid, "options": sorted(row.options or ()), "inode": row.inode,
                "count": 1, "detail": detail, "state": row.state}

    first = rows[0]
    if not calls & {"bind", "listen"}:
        snap = h.snap_by_id.get(first.first)
        prev = h.prev_of(first.first)
        detail = ("held when the recording began" if prev is None or prev.session != first.session
                  else "appeared between two snapshots (its bind was not recorded)")
        out.append(entry(first, snap, "seen", f"{first.state}: {detail}"))
    for a, b in zip(rows, rows[1:]):
        snap = h.snap_by_id.get(b.first)
        if a.pids != b.pids:
            out.append(entry(b, snap, "owners", f"held by {b.pids} instead of {a.pids}"))
        if b.bpf and not a.bpf:
            out.append(entry(b, snap, "bpf", "a reuseport BPF program now steers its group"))
        if a.group_size != b.group_size and b.group:
            out.append(entry(b, snap, "group", f"its reuseport group has {b.group_size} member(s) "
                                               f"(was {a.group_size or 0})"))
    last = rows[-1]
    nxt = h.next_of(last.last)
    if nxt is not None and nxt.session == last.session and "listen_close" not in calls:
        out.append(entry(last, nxt, "gone", f"{last.state}: gone by this snapshot"))
    return out


def _collapse(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A storm of the same failure is one line with a count; a change seen
    on every member of a reuseport group at once is one line."""
    out: list[dict[str, Any]] = []
    for e in entries:
        prev = out[-1] if out else None
        if (prev is not None and e["what"] in ("group", "bpf") and prev["what"] == e["what"]
                and (prev["netns"], prev["protocol"], prev["port"], prev["time"], prev["local"],
                     prev["detail"])
                == (e["netns"], e["protocol"], e["port"], e["time"], e["local"], e["detail"])):
            prev["pids"] = sorted(set(prev["pids"]) | set(e["pids"]))
            continue
        if (prev is not None and e["what"] == "conflict" and prev["what"] == "conflict"
                and (prev["netns"], prev["protocol"], prev["port"], prev["pids"], prev["call"],
                     prev["result"], prev["local"])
                == (e["netns"], e["protocol"], e["port"], e["pids"], e["call"], e["result"], e["local"])):
            prev["count"] += 1
            prev["until"] = e["time"]
            continue
        out.append(e)
    return out


# ---- the command --------------------------------------------------------------------


def run(args: argparse.Namespace) -> ExitStatus:
    since = args.since  # seconds since the epoch (tracer.arguments.point_in_time)
    with JournalReader(args.file) as reader:
        h = History(reader, since, args.port, args.netns)
        findings = [f for f in find_all(h, args.race_window) if since is None or f.time >= since]
        entries = [e for e in timeline(h) if since is None or e["time"] >= since]
        summary = journal_summary(reader, args.file, since)
    if args.json:
        json.dump({"journal": summary, "findings": [f.to_json() for f in findings],
                   "timeline": entries}, sys.stdout, separators=(",", ":"))
        sys.stdout.write("\n")
    else:
        print_report(summary, findings, entries)
    return ExitStatus.OK


def journal_summary(reader: JournalReader, path: str, since: float | None) -> dict[str, Any]:
    sessions = []
    notes = list(reader.notes)
    rows = reader.rows("sessions")
    for i, s in enumerate(rows):
        sessions.append({"id": s["id"], "started": s["started"], "ended": s["ended"],
                         "last_seen": s["last_seen"], "pid": s["pid"], "host": s["host"],
                         "plan": s["plan"], "lost": s["lost"], "untraced": s["untraced"],
                         "unexplained": s["unexplained"]})
        if s["ended"] is None and i < len(rows) - 1:
            notes.append(f"the recorder stopped uncleanly around {_stamp(s['last_seen'])} (session "
                         f"{s['id']}): at most the last second before that is missing")
        if i and rows[i - 1]["last_seen"] < s["started"] - 2 * max(1.0, s["snapshot_interval"]):
            notes.append(f"nothing was recorded from {_stamp(rows[i - 1]['last_seen'])} to "
                         f"{_stamp(s['started'])}")
        if s["lost"]:
            notes.append(f"session {s['id']}: {s['lost']} events were lost (ring buffer full)")
        if s["untraced"]:
            notes.append(f"session {s['id']}: {s['untraced']} calls were not traced (too many in flight)")
    times = [t for t in (reader.scalar(f"SELECT {f}(time) FROM {table}")
                         for f in ("min", "max") for table in ("events", "snapshots"))
             if t is not None]
    damage = reader.damage_note()
    if damage:
        notes.append(damage)
    return {"path": path, "schema": reader.version, "sessions": sessions,
            "events": reader.scalar("SELECT count(*) FROM events", kind=int) or 0,
            "snapshots": reader.scalar("SELECT count(*) FROM snapshots", kind=int) or 0,
            "first": min(times) if times else None,
            "last": max(times) if times else None, "since": since, "notes": notes}


def _stamp(t: float | None) -> str:
    return "-" if t is None else clock_text(t)


def _out(line: str = "") -> None:
    """One line of the human report, escaped: names, paths and command
    lines in a journal are whatever the recorded processes made them."""
    print(printable(line))


def print_report(summary: dict[str, Any], findings: list[Finding], entries: list[dict[str, Any]]) -> None:
    n = len(summary["sessions"])
    _out(f"journal {summary['path']}: schema {summary['schema']}, {n} recording session"
          f"{'s' if n != 1 else ''}, {summary['events']} events and {summary['snapshots']} snapshots"
          f" from {_stamp(summary['first'])} to {_stamp(summary['last'])}")
    if summary["since"] is not None:
        _out(f"showing what happened since {_stamp(summary['since'])}")
    for note in summary["notes"]:
        _out(f"note: {note}")
    _out()
    _out(f"{len(findings)} finding{'s' if len(findings) != 1 else ''}" + (":" if findings else ""))
    for i, f in enumerate(findings, 1):
        _out(f"  [{i}] {_stamp(f.time)}  {f.kind}  {f.protocol} port {f.port}  netns {f.netns}")
        _out(f"      {f.summary}")
        for note in f.notes:
            _out(f"      note: {note}")
        _out("      evidence:")
        for e in f.evidence:
            _out("        " + _evidence_line(e))
    _out()
    _out("timeline:" if entries else "timeline: nothing recorded")
    current = None
    ports = 0
    for i, e in enumerate(entries):
        key = (e["netns"], e["protocol"], e["port"])
        if key != current:
            current = key
            ports += 1
            if ports > MAX_PORTS_SHOWN:
                rest = len({(x["netns"], x["protocol"], x["port"]) for x in entries[i:]})
                _out(f"  ... and {rest} more ports: narrow it with --port, --netns or --since, "
                      "or read everything with --json")
                break
            _out(f"  {e['protocol']} port {e['port']}  netns {e['netns']}")
        _out("    " + _timeline_line(e))


def _evidence_line(e: dict[str, Any]) -> str:
    if e["type"] == "event":
        line = (f"{_stamp(e['time'])} event     {e['call']} {e['result']} pid {e['pid']} "
                f"{e['comm']} ({e['exe'] or '?'}) uid {e['uid']} {e['protocol']} {e['local']} "
                f"{','.join(e['options']) or '-'} inode {e['inode']}")
        blockers = e.get("blockers")
        if isinstance(blockers, list) and blockers:
            line += "  blocked by: " + "; ".join(
                f"{b.get('comm')}[{','.join(map(str, b.get('pids', [])))}] {b.get('state')} "
                f"{b.get('local')} ({b.get('rule')})" for b in blockers)
        elif isinstance(blockers, dict):
            line += f"  blockers unknown: {blockers.get('error')}"
        return line
    group = ""
    if e["group"]:
        group = f" group {e['group']:08x}/{e['group_size']}" + ("+bpf" if e["bpf"] else "")
    owners = " ".join(f"{o['comm']}[{o['pid']}] ({o['exe'] or '?'}, uid {o['uid']})" for o in e["owners"]) or "-"
    return (f"{_stamp(e['time'])} snapshot  #{e['snapshot']} {e['protocol']} {e['state']} {e['local']} "
            f"{','.join(e['options'] or []) or '-'}{group} uid {e['uid']} inode {e['inode']}  {owners}")


def _blocker_text(b: dict[str, Any]) -> str:
    pids = b.get("pids") or []
    who = (f"{b.get('comm')}[{','.join(map(str, pids))}]" if pids else
           f"left by {b['closed_by']}" if b.get("closed_by") else "no process")
    gone = ", closed since" if b.get("held") == "gone" else ""
    return f"{who} ({b.get('rule')}{gone})"


def _timeline_line(e: dict[str, Any]) -> str:
    who = f"pid {','.join(map(str, e['pids']))}" if e["pids"] else "no known process"
    if e.get("comm"):
        who += f" {e['comm']}"
    if e.get("exe"):
        who += f" ({e['exe']})"
    opts = ",".join(e["options"]) or "-"
    head = f"{_stamp(e['time'])}  {e['what']:<10}"
    if e["what"] == "conflict":
        line = f"{head} {e['call']} {e['result']} {e['local']} {who} uid {e['uid']} {opts}"
        if e["count"] > 1:
            line += f"  x{e['count']} until {_stamp(e.get('until'))}"
        blockers = e.get("blockers")
        reason = e.get("reason")
        if blockers:
            line += "  blocked by: " + "; ".join(_blocker_text(b) for b in blockers)
        elif reason and reason.get("rule") != "conflict":
            line += f"  why: {reason.get('text')}"
        return line
    if e["call"]:
        return f"{head} {e['local']} {who} uid {e['uid']} {opts}"
    return f"{head} {e['local']} {who} uid {e['uid']} {opts}: {e.get('detail', '')}"
