"""The timeline of a journal: per port, what held it when (binds, listens,
closes and the snapshot rows that changed), pruned and collapsed for reading."""

from __future__ import annotations

from typing import Any

from .history import History, Row, Snap, first_reason

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
        x = ev.explanation
        if not ev.ok and ev.blockers is not None:
            entry["blockers"] = [b.to_json() for b in ev.blockers]
        if not ev.ok and x is not None and (x.reasons or x.error):
            entry["reason"] = first_reason(x)
            entry["explanation"] = x.to_json()
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
        owner = row.owners[0] if row.owners else None
        return {"time": snap.time if snap else 0.0, "netns": row.netns, "protocol": row.protocol,
                "port": row.port, "what": what, "call": None, "result": None, "local": row.local,
                "pids": row.pids, "comm": owner and owner.comm, "exe": owner and owner.exe,
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
        if b.group_bpf and not a.group_bpf:
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
