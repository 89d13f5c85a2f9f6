"""The hijack rules: pure functions from a journal's history to findings.

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
    member receives each connection or datagram);
``device_shadow``
    a socket bound to a device (SO_BINDTODEVICE) on the same address as a
    socket of another process (another executable or uid) that is bound to
    no device (TCP: both listening; UDP: unconnected), same port and
    protocol: the kernel scores a device-bound socket above an unbound one
    of the same address, so what arrives on that device goes to it;
``transparent_listener``
    an IP_TRANSPARENT listener (TCP LISTEN, or a UDP socket) that was not in
    the previous snapshot (one there when recording began is reported too,
    with a note saying so): with a TPROXY rule it receives traffic for
    addresses that are not the host's;
``sk_lookup_attached``
    an sk_lookup BPF program attached to a network namespace between two
    snapshots, or another program put in place of one (the same bpf_link
    updated to another program, or one detached and another attached): it
    runs before the kernel's socket lookup and can hand the connections and
    datagrams for any address and port of that namespace to any socket;
``sock_addr_attached``
    a cgroup sock_addr program (bind4/6, post_bind4/6, connect4/6,
    sendmsg4/6, recvmsg4/6, getpeername4/6, getsockname4/6) attached to a
    cgroup between two snapshots, or put in place of one: it rewrites where
    the processes of that cgroup (and of the cgroups below it) bind,
    connect or send.

The two program findings compare snapshots that both looked for programs
of that class (``snapshots.programs``, journal schema 3): a journal written
before, the first snapshot that looks, or one whose scan failed names no
program as attached. They name the processes that hold the program's or
its link's file descriptor (``pids``; none when it is pinned or its loader
exited), the holders of the program it replaced (``owners``, for
sk_lookup) or the processes the journal saw in that cgroup (``owners``,
for sock_addr; not for the root cgroup, which is every process), the
namespace or cgroup, and the program's id, name, tag and link. They are
kept by ``--port`` (a program concerns every port) and, for sock_addr, by
``--netns`` (a cgroup is in no namespace).

``wildcard_shadowed`` and ``device_shadow`` never name the same pair: a
specific address beats a wildcard whatever the devices (the kernel looks
the exact address up first), so a specific-address socket over a wildcard
is ``wildcard_shadowed`` even when either is bound to a device, and
``device_shadow`` is only the pair whose addresses are the same (both
wildcards, or one address), where the device binding is what decides.
Such a pair is not ``udp_shared`` either: the datagrams are not shared, the
device-bound socket takes all that arrive on its device.

Each finding names the processes that did it (``pids``) and the ones it was
done to (``owners``), with the events and snapshot rows that show it.
"""

from __future__ import annotations

import errno
from typing import Any, Iterable

from .bindrules import LISTEN, Rule, Sock, overlap, tcp_rule, udp_rule
from .history import WILDCARDS, History, ProgRow, Row, Snap, stamp
from .journal.programs import program_class
from .records import Finding, RecordedCall
from .records.findings import KINDS
from .text import printable


def event_evidence(ev: RecordedCall, h: History) -> dict[str, Any]:
    exe, cgroup = h.ev_identity(ev)
    out: dict[str, Any] = {
        "type": "event", "id": ev.id, "time": ev.time, "call": ev.call, "result": ev.result,
        "pid": ev.pid, "comm": ev.comm, "exe": exe, "cgroup": cgroup, "uid": ev.uid,
        "sock_uid": ev.sock_uid, "protocol": ev.protocol, "local": ev.local,
        "options": sorted(ev.options), "dev": ev.dev, "inode": ev.inode,
    }
    if ev.explanation is not None:
        out["blockers"] = ev.explanation.blockers_json()
    return out


def row_evidence(row: Row, snap: Snap | None) -> dict[str, Any]:
    return {
        "type": "snapshot", "snapshot": snap.id if snap else row.first,
        "time": snap.time if snap else None, "protocol": row.protocol, "state": row.state,
        "local": row.local, "options": sorted(row.options) if row.options is not None else None,
        "dev": row.dev, "group": row.group, "group_size": row.group_size, "bpf": bool(row.group_bpf), "uid": row.uid,
        "inode": row.inode,
        "owners": [{"pid": o.pid, "comm": o.comm, "exe": o.exe, "uid": o.uid, "cgroup": o.cgroup}
                   for o in row.owners],
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
        if ev.blockers is not None:
            hits = [b for b in ev.blockers if b.rule == Rule.REUSEPORT_OTHER_UID.value]
            if not hits and ev.blockers:
                continue  # explained, and not by the uid check
            for b in hits:
                owners += b.pids
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
            mine_ids = [(o.exe, o.cgroup) for o in mine.owners if o.pid == ev.pid and o.exe]
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
            if bool(row.dev) != bool(other.dev):
                continue  # one bound to a device takes all it receives: device_shadow
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


def _release_from_close(h: History, ev: RecordedCall) -> dict[str, Any]:
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
        if not row.group or not row.group_bpf:
            continue
        snap = h.snap_by_id.get(row.first)
        prev = h.prev_of(row.first)
        if snap is None or prev is None:
            continue
        members = [r for r in h.alive(snap.id, row.netns, row.protocol, row.port) if r.group == row.group]
        before = [r for m in members for r in [h.row_at(m.netns, m.inode, prev.id)] if r is not None]
        if not before or any(r.group_bpf for r in before) or not any(r.group for r in before):
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
            f"{stamp(prev.time)} and {stamp(snap.end)}; it had none before: the program now "
            "chooses which member receives each " + ("connection" if row.protocol == "tcp" else "datagram")
            + " (one of the members' processes attached it)",
            [row_evidence(r, prev) for r in before] + [row_evidence(m, snap) for m in members])
    return list(out.values())


def _receives(row: Row) -> bool:
    """A socket that receives: a TCP listener, or a UDP socket (the snapshots
    keep unconnected ones only)."""
    return row.state == LISTEN if row.protocol == "tcp" else row.protocol == "udp"


def _another(a: Row, b: Row) -> bool:
    """Two sockets of other processes, as udp_shared judges it: no process in
    common, and another uid or another executable."""
    if not a.pids or not b.pids or set(a.pids) & set(b.pids):
        return False
    return a.uid != b.uid or bool(a.exes and b.exes and not a.exes & b.exes)


def _score(row: Row) -> int:
    """The kernel's score of a socket for a packet of its port that it may
    receive (compute_score, net/ipv4/inet_hashtables.c and udp.c): a bound
    device adds 1 (TCP) or 4 (UDP), an IPv4 socket outscores an IPv6 one."""
    v4 = row.family == "ipv4"
    if row.protocol == "tcp":
        return (2 if row.dev else 1) + v4
    return (2 if v4 else 1) + (4 if row.dev else 0)


def find_device_shadows(h: History) -> list[Finding]:
    """A device-bound socket on the same address as an unbound one of another
    process (TCP: both listening): on that device it receives the traffic."""
    out: dict[tuple[int, str, int], Finding] = {}
    ties: set[tuple[int, str, int]] = set()
    for row in h.rows:
        if not _receives(row):
            continue
        snap = h.snap_by_id.get(row.first)
        if snap is None:
            continue
        for other in h.alive(row.first, row.netns, row.protocol, row.port):
            if other.inode == row.inode or not _receives(other) or bool(row.dev) == bool(other.dev):
                continue
            bound, plain = (row, other) if row.dev else (other, row)
            # The same address: both wildcards, or one address (a specific one
            # over a wildcard wins whatever the devices: wildcard_shadowed).
            if not (bound.addr == plain.addr or (bound.addr in WILDCARDS and plain.addr in WILDCARDS)):
                continue
            if overlap(bound.sock(), plain.sock()) is None or not _another(bound, plain):
                continue
            if _score(bound) < _score(plain):
                continue
            key = (bound.netns, bound.protocol, bound.inode)
            f = out.get(key)
            if f is None:
                calls = ("listen",) if bound.protocol == "tcp" else ("bind",)
                took = h.took_at(bound.netns, bound.inode, calls)
                plain_took = h.took_at(plain.netns, plain.inode, calls)
                when = max([t.time for t in (took, plain_took) if t] or [snap.time])
                f = out[key] = Finding(
                    "device_shadow", when, bound.netns, bound.protocol, bound.port, bound.pids, [], "",
                    [event_evidence(t, h) for t in (took, plain_took) if t])
                f.evidence.append(row_evidence(bound, snap))
            if _score(bound) == _score(plain):
                ties.add(key)
            if not set(plain.pids) <= set(f.owners):
                f.owners = sorted(set(f.owners) | set(plain.pids))
                f.evidence.append(row_evidence(plain, snap))
    for key, f in out.items():
        snaps = [e for e in f.evidence if e["type"] == "snapshot"]
        bound_e, plain_locals = snaps[0], sorted({e["local"] for e in snaps[1:]})
        what = "connections" if f.protocol == "tcp" else "datagrams"
        f.summary = (f"{_who(f.pids, h, f.time)} holds {f.protocol} {bound_e['local']} bound to "
                     f"device {bound_e['dev']} (SO_BINDTODEVICE) beside {', '.join(plain_locals)} of "
                     f"{_who(f.owners, h, f.time)}, bound to no device: the {what} for port "
                     f"{f.port} that arrive on device {bound_e['dev']} go to it, not to the "
                     "unbound socket's owner (the kernel scores a device-bound socket above an "
                     "unbound one of the same address)")
        if key in ties:
            f.notes.append("an IPv6 socket bound to a device and an IPv4 one bound to none score "
                           "the same for IPv4 traffic: which receives it depends on the order of "
                           "the kernel's hash chain")
    return list(out.values())


def find_transparent_listeners(h: History) -> list[Finding]:
    """An IP_TRANSPARENT listener or UDP socket that the previous snapshot did
    not have (or had without the option); one already there in the first
    snapshot is reported as present when recording began."""
    out = []
    judged: set[tuple[int, int]] = set()
    for row in h.rows:
        if not _receives(row) or row.options is None or "transparent" not in row.options:
            continue
        key = (row.netns, row.inode)
        snap = h.snap_by_id.get(row.first)
        if key in judged or snap is None:
            continue
        prev = h.prev_of(row.first)
        if prev is not None:
            before = h.row_at(row.netns, row.inode, prev.id)
            if before is not None and _receives(before) and (before.options is None
                                                              or "transparent" in before.options):
                continue  # there already (or its flags unread then): not appearing now
        judged.add(key)
        took = h.took_at(row.netns, row.inode, ("listen",) if row.protocol == "tcp" else ("bind",))
        pids = row.pids or ([took.pid] if took else [])
        what = "listener" if row.protocol == "tcp" else "UDP socket"
        evidence = ([event_evidence(took, h)] if took else []) + [row_evidence(row, snap)]
        tail = (": with a TPROXY rule (iptables/nftables) it receives traffic for addresses "
                "that are not this host's")
        if prev is None:
            f = Finding("transparent_listener", snap.time, row.netns, row.protocol, row.port, pids, [],
                        f"{_who(pids, h, snap.time)} holds an IP_TRANSPARENT {what} on "
                        f"{row.protocol} {row.local}, present when recording began" + tail,
                        evidence, ["present in the first snapshot: when it appeared is not known"])
        else:
            f = Finding("transparent_listener", took.time if took and took.time > prev.time
                        else snap.time, row.netns, row.protocol, row.port, pids, [],
                        f"{_who(pids, h, snap.time)} opened an IP_TRANSPARENT {what} on "
                        f"{row.protocol} {row.local} between {stamp(prev.time)} and "
                        f"{stamp(snap.end)}" + tail, evidence)
        out.append(f)
    return out


def program_evidence(row: ProgRow, snap: Snap | None) -> dict[str, Any]:
    return {"type": "program", "snapshot": snap.id if snap else row.first,
            "time": snap.time if snap else None, **row.seen.program.to_json(),
            "holders": [x.to_json() for x in row.seen.holders]}


# What a cgroup program rewrites, by the start of its kind.
_REWRITES = {"bind": "the address and port they bind", "post_bind": "whether their bind stands",
             "connect": "the address and port they connect to",
             "sendmsg": "the address and port they send datagrams to",
             "recvmsg": "the address they see datagrams come from",
             "getpeername": "the peer address they are told",
             "getsockname": "the local address they are told"}


def _program_text(row: ProgRow) -> str:
    p = row.seen.program
    link = f", link {p.link_id}" if p.link_id is not None else ""
    return f"{printable(p.name) or '(no name)'} (id {p.prog_id}, tag {p.tag}{link})"


def _holders(rows: Iterable[ProgRow]) -> list[int]:
    return sorted({x.pid for r in rows for x in r.seen.holders})


def find_programs_attached(h: History) -> list[Finding]:
    """A program (sk_lookup, or cgroup sock_addr) in a snapshot that the
    snapshot before it, which looked for that class too, did not have at
    that place (the same program id and link)."""
    out = []
    for row in h.programs:
        p = row.seen.program
        snap, prev = h.snap_by_id.get(row.first), h.prev_of(row.first)
        cls = program_class(p.kind)
        if snap is None or prev is None or cls not in (snap.scanned or ()) \
                or cls not in (prev.scanned or ()):
            continue

        def place(rows: list[ProgRow]) -> list[ProgRow]:
            return [r for r in rows if (r.seen.program.kind, r.seen.program.netns,
                                        r.seen.program.cgroup) == (p.kind, p.netns, p.cgroup)]

        key = (p.prog_id, p.link_id)
        before = place(h.programs_at(prev.id))
        if any((r.seen.program.prog_id, r.seen.program.link_id) == key for r in before):
            continue  # there already
        now = {(r.seen.program.prog_id, r.seen.program.link_id) for r in place(h.programs_at(snap.id))}
        gone = [r for r in before if (r.seen.program.prog_id, r.seen.program.link_id) not in now]
        same_link = [r for r in gone if p.link_id is not None and r.seen.program.link_id == p.link_id]
        replaced = same_link or gone
        pids = _holders([row])
        when = f"between {stamp(prev.time)} and {stamp(snap.end)}"
        by = f" (held by {_who(pids, h, snap.time)})" if pids else ""
        if same_link:
            how = (f", replacing {', '.join(_program_text(r) for r in same_link)} on the same "
                   "link (BPF_LINK_UPDATE)")
        elif replaced:
            how = f", in place of {', '.join(_program_text(r) for r in replaced)}"
        else:
            how = ""
        notes = [] if pids else ["no process holds its file descriptor or its link's (pinned in "
                                 "bpffs, or its loader exited): who attached it is not known"]
        if cls == "sk_lookup":
            owners = _holders(replaced)
            summary = (f"an sk_lookup BPF program {_program_text(row)}{by} was attached to network "
                       f"namespace {p.netns} {when}{how}: it runs before the kernel's socket lookup "
                       "for every new TCP connection and UDP datagram there, and can hand those for "
                       "any address and port to any socket")
            netns = p.netns or 0
        else:
            owners = _cgroup_pids(h, p.cgroup or "/")
            rewrites = next(v for k, v in _REWRITES.items() if p.kind.rstrip("46") == k)
            summary = (f"a cgroup {p.kind} BPF program {_program_text(row)}{by} was attached to "
                       f"cgroup {printable(p.cgroup)} {when}{how}: it can change {rewrites}, for "
                       "every process of that cgroup and of the cgroups below it"
                       + (f" (recorded here: {_who(owners, h, snap.time)})" if owners else ""))
            netns = 0
        out.append(Finding(
            f"{cls}_attached", snap.time, netns, "any", 0, pids, owners, summary,
            [program_evidence(r, prev) for r in replaced] + [program_evidence(row, snap)], notes))
    return out


def _cgroup_pids(h: History, cgroup: str) -> list[int]:
    """The processes the journal saw in ``cgroup`` or below it; none for the
    root cgroup (that is every process)."""
    if cgroup == "/":
        return []
    below = cgroup.rstrip("/") + "/"
    return sorted(pid for pid, seen in h.pid_cgroups().items()
                  if any(c == cgroup or c.startswith(below) for c in seen))


def find_all(h: History, race_window: float) -> list[Finding]:
    findings = (find_reuseport_other_uid(h) + find_foreign_members(h) + find_udp_shared(h)
                + find_restart_races(h, race_window) + find_shadowed_wildcards(h)
                + find_bpf_attached(h) + find_device_shadows(h) + find_transparent_listeners(h)
                + find_programs_attached(h))
    findings.sort(key=lambda f: (f.time, KINDS.index(f.kind), f.port))
    return findings
