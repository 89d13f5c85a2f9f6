"""``portscope report``: a postmortem of a journal written by ``record``.

It reads the journal's history (tracer/history.py), applies the hijack rules
(tracer/hijack.py, where each is described) and prints the findings and the
timeline (tracer/timeline.py), as text or JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .colour import PLAIN, Palette, line, palette, shown
from .errors import ExitStatus
from .hijack import Finding, find_all
from .history import History, stamp
from .journal import JournalReader
from .timeline import timeline

MAX_PORTS_SHOWN = 200  # human output: timeline sections before "... and N more"


def run(args: argparse.Namespace) -> ExitStatus:
    since = args.since  # seconds since the epoch (tracer.arguments.point_in_time)
    with JournalReader(args.file) as reader:
        h = History(reader, since, args.port, args.netns)
        findings = [f for f in find_all(h, args.race_window) if since is None or f.time >= since]
        entries = [e for e in timeline(h) if since is None or e["time"] >= since]
        summary = journal_summary(reader, args.file, since)
        if h.program_problems:
            first = h.program_problems[0][1][0]
            what = ": ".join(map(str, first)) if isinstance(first, list) else str(first)
            n = len(h.program_problems)
            summary["notes"].append(
                f"{n} snapshot{'s' if n != 1 else ''} could not look for every BPF program "
                f"(first: {what}): no program is named attached next to "
                f"{'them' if n != 1 else 'it'}")
    if args.json:
        json.dump({"journal": summary, "findings": [f.to_json() for f in findings],
                   "timeline": entries}, sys.stdout, separators=(",", ":"))
        sys.stdout.write("\n")
    else:
        print_report(summary, findings, entries, palette(args))
    return ExitStatus.OK


def journal_summary(reader: JournalReader, path: str, since: float | None) -> dict[str, Any]:
    sessions = []
    notes = list(reader.notes)
    rows = reader.sessions()
    for i, s in enumerate(rows):
        sessions.append({"id": s["id"], "started": s["started"], "ended": s["ended"],
                         "last_seen": s["last_seen"], "pid": s["pid"], "host": s["host"],
                         "plan": s["plan"], "lost": s["lost"], "untraced": s["untraced"],
                         "unexplained": s["unexplained"]})
        if s["ended"] is None and i < len(rows) - 1:
            notes.append(f"the recorder stopped uncleanly around {stamp(s['last_seen'])} (session "
                         f"{s['id']}): at most the last second before that is missing")
        if i and rows[i - 1]["last_seen"] < s["started"] - 2 * max(1.0, s["snapshot_interval"]):
            notes.append(f"nothing was recorded from {stamp(rows[i - 1]['last_seen'])} to "
                         f"{stamp(s['started'])}")
        if s["lost"]:
            notes.append(f"session {s['id']}: {s['lost']} events were lost (ring buffer full)")
        if s["untraced"]:
            notes.append(f"session {s['id']}: {s['untraced']} calls were not traced (too many in flight)")
    first, last = reader.time_span()
    damage = reader.damage_note()
    if damage:
        notes.append(damage)
    return {"path": path, "schema": reader.version, "sessions": sessions,
            "events": reader.count("events"), "snapshots": reader.count("snapshots"),
            "first": first, "last": last, "since": since, "notes": notes}


def _out(text: str = "") -> None:
    """One line of the human report, escaped: names, paths and command
    lines in a journal are whatever the recorded processes made them (a
    line made by tracer.colour is escaped already, and perhaps coloured)."""
    print(shown(text))


def print_report(summary: dict[str, Any], findings: list[Finding], entries: list[dict[str, Any]],
                 pal: Palette = PLAIN) -> None:
    n = len(summary["sessions"])
    _out(f"journal {summary['path']}: schema {summary['schema']}, {n} recording session"
          f"{'s' if n != 1 else ''}, {summary['events']} events and {summary['snapshots']} snapshots"
          f" from {stamp(summary['first'])} to {stamp(summary['last'])}")
    if summary["since"] is not None:
        _out(f"showing what happened since {stamp(summary['since'])}")
    for note in summary["notes"]:
        _out(f"note: {note}")
    _out()
    _out(pal.head(f"{len(findings)} finding{'s' if len(findings) != 1 else ''}"
                  + (":" if findings else "")))
    for i, f in enumerate(findings, 1):
        _out(line(f"  [{i}] {stamp(f.time)}  ", pal.paint(f.kind, "bad"), _where(f)))
        _out(f"      {f.summary}")
        for note in f.notes:
            _out(f"      note: {note}")
        _out("      evidence:")
        for e in f.evidence:
            _out("        " + _evidence_line(e))
    _out()
    _out(pal.head("timeline:" if entries else "timeline: nothing recorded"))
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
            _out(line("  ", pal.head(f"{e['protocol']} port {e['port']}  netns {e['netns']}")))
        _out(line("    ", _timeline_line(e, pal)))


def _where(f: Finding) -> str:
    """Where a finding is: a port, or (a program's) a namespace or cgroup."""
    if f.kind == "sock_addr_attached":
        return f"  cgroup {f.evidence[-1].get('cgroup') if f.evidence else '?'}"
    if f.kind == "sk_lookup_attached":
        return f"  every port  netns {f.netns}"
    return f"  {f.protocol} port {f.port}  netns {f.netns}"


def _evidence_line(e: dict[str, Any]) -> str:
    if e["type"] == "event":
        line = (f"{stamp(e['time'])} event     {e['call']} {e['result']} pid {e['pid']} "
                f"{e['comm']} ({e['exe'] or '?'}) uid {e['uid']} {e['protocol']} {e['local']} "
                f"{','.join(e['options']) or '-'}{_dev(e)} inode {e['inode']}")
        blockers = e.get("blockers")
        if isinstance(blockers, list) and blockers:
            line += "  blocked by: " + "; ".join(
                f"{b.get('comm')}[{','.join(map(str, b.get('pids', [])))}] {b.get('state')} "
                f"{b.get('local')} ({b.get('rule')})" for b in blockers)
        elif isinstance(blockers, dict):
            line += f"  blockers unknown: {blockers.get('error')}"
        return line
    if e["type"] == "program":
        return _program_line(e)
    group = _dev(e)
    if e["group"]:
        group += f" group {e['group']:08x}/{e['group_size']}" + ("+bpf" if e["bpf"] else "")
    owners = " ".join(f"{o['comm']}[{o['pid']}] ({o['exe'] or '?'}, uid {o['uid']})" for o in e["owners"]) or "-"
    return (f"{stamp(e['time'])} snapshot  #{e['snapshot']} {e['protocol']} {e['state']} {e['local']} "
            f"{','.join(e['options'] or []) or '-'}{group} uid {e['uid']} inode {e['inode']}  {owners}")


def _dev(e: dict[str, Any]) -> str:
    """`` dev N`` for a socket bound to a device (SO_BINDTODEVICE), else nothing."""
    return f" dev {e['dev']}" if e.get("dev") else ""


def _program_line(e: dict[str, Any]) -> str:
    """A BPF program of a snapshot, as a finding's evidence shows it."""
    where = (f"netns {e['netns']}" if e.get("netns") is not None
             else f"cgroup {e.get('cgroup') or '?'}")
    holders = " ".join(f"{o.get('comm')}[{o.get('pid')}]" for o in e.get("holders") or []) or "-"
    link = f" link {e['link_id']}" if e.get("link_id") is not None else ""
    return (f"{stamp(e.get('time'))} program   #{e.get('snapshot')} {e.get('kind')} prog "
            f"{e.get('prog_id')} {e.get('name') or '?'} tag {e.get('tag')}{link} {where}  {holders}")


def _blocker_text(b: dict[str, Any]) -> str:
    pids = b.get("pids") or []
    who = (f"{b.get('comm')}[{','.join(map(str, pids))}]" if pids else
           f"left by {b['closed_by']}" if b.get("closed_by") else "no process")
    gone = ", closed since" if b.get("held") == "gone" else ""
    return f"{who} ({b.get('rule')}{gone})"


def _timeline_line(e: dict[str, Any], pal: Palette = PLAIN) -> str:
    who = f"pid {','.join(map(str, e['pids']))}" if e["pids"] else "no known process"
    if e.get("comm"):
        who += f" {e['comm']}"
    if e.get("exe"):
        who += f" ({e['exe']})"
    opts = ",".join(e["options"]) or "-"
    what = str(e["what"])
    head = line(f"{stamp(e['time'])}  ", pal.paint(what, "bad" if what == "conflict" else None),
                " " * (10 - len(what)))
    if e["what"] == "conflict":
        text = line(head, f" {e['call']} ", pal.errno(str(e["result"])),
                    f" {e['local']} {who} uid {e['uid']} {opts}")
        if e["count"] > 1:
            text = line(text, f"  x{e['count']} until {stamp(e.get('until'))}")
        blockers = e.get("blockers")
        reason = e.get("reason")
        if blockers:
            text = line(text, "  ", pal.paint("blocked by:", "bad"), " ",
                        "; ".join(_blocker_text(b) for b in blockers))
        elif reason and reason.get("rule") != "conflict":
            text = line(text, "  ", pal.paint("why:", "warn"), f" {reason.get('text')}")
        return text
    if e["call"]:
        return line(head, f" {e['local']} {who} uid {e['uid']} {opts}")
    return line(head, f" {e['local']} {who} uid {e['uid']} {opts}: {e.get('detail', '')}")
