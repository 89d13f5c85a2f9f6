"""``portscope why``: would this bind succeed now, and if not, why not."""

from __future__ import annotations

import argparse
import json
import os
import pwd

from .bindcheck import NamespaceFacts
from .colour import PLAIN, Palette, line, palette, shown
from .errors import ExitStatus, UsageError
from .explain import LISTED, Explanation, Request, conn_of, explain, namespace_facts
from .filters import Filter
from .nsnames import netns_named
from .records import owner_detail
from .ports import state_text


def request_from_args(args: argparse.Namespace, facts: NamespaceFacts) -> Request:
    """The question the options ask, in the namespace ``facts`` describe
    (a device is looked up there: the same name may be another device, or
    none, in another namespace)."""
    family = None
    if args.addr:
        family = "ipv6" if ":" in args.addr else "ipv4"
        if args.ipv6 and family == "ipv4":
            raise UsageError(f"--ipv6 with the IPv4 address {args.addr}: an IPv6 socket binds "
                             f"it as ::ffff:{args.addr} (v4-mapped)")
    elif args.ipv6:
        family = "ipv6"
    if args.v6only and family != "ipv6":
        raise UsageError("--v6only is an IPv6 socket option: add --ipv6, or an IPv6 --addr")
    return Request(
        port=args.port, protocol="udp" if args.udp else "tcp", addr=args.addr, family=family,
        reuseaddr=args.reuseaddr, reuseport=args.reuseport, v6only=args.v6only,
        bound_dev_if=_device(args.device, facts), uid=_uid(args.user), listen=args.listen,
        freebind=args.freebind, transparent=args.transparent,
        bind_address_no_port=args.bind_address_no_port, port_range=args.port_range,
        cap_net_bind_service=args.cap_net_bind_service, cgroup=args.cgroup,
    )


def _device(name: str | None, facts: NamespaceFacts) -> int:
    """SO_BINDTODEVICE refuses a device the namespace does not have (ENODEV):
    the question has no meaning then."""
    if not name:
        return 0
    index = facts.device_index(name)
    if index is not None:
        return index
    known = ", ".join(d.name for d in facts.devices.values()) or "none"
    raise UsageError(f"no network device {name!r} in that namespace (SO_BINDTODEVICE would "
                     f"fail with ENODEV); its devices: {known}")


def _uid(user: str | None) -> int:
    if user is None:
        import os

        return os.geteuid()
    if user.isdigit():
        return int(user)
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        raise UsageError(f"no user named {user!r}") from None


def run(args: argparse.Namespace) -> ExitStatus:
    if args.listen and args.udp:
        raise UsageError("UDP sockets do not listen(): ask about the bind (without --listen)")
    flt = Filter.from_args(args)
    if len(flt.netns) > 1:
        raise UsageError("why answers in one network namespace: give --netns once")
    if args.port and flt.sports and args.port not in flt.sports:
        raise UsageError(f"--sport {', '.join(map(str, sorted(flt.sports)))} can never match: "
                         f"every blocker of a bind to port {args.port} holds port {args.port}")
    netns = flt.namespace() or str(os.stat("/proc/thread-self/ns/net").st_ino)
    facts = namespace_facts(netns)
    result = explain(request_from_args(args, facts), netns=netns, facts=facts,
                     listed=None if args.all else LISTED)
    left_out = filter_blockers(result, flt)
    if args.json:
        doc = netns_named(result.to_json(), result.inventory.scan)
        doc["blockers_filtered_out"] = left_out
        print(json.dumps(doc))
    else:
        print(render(result, left_out, palette(args), args.verbose))
    return ExitStatus.OK if result.verdict == "free" else ExitStatus.CONFLICT


def filter_blockers(e: Explanation, flt: Filter) -> int:
    """Keep the blockers the filters match (the verdict, reasons and fixes
    stay those of every blocker: the bind fails whichever are listed);
    returns how many were left out. Who closed a blocker no process holds
    is read for every one when a process criterion needs it."""
    if not (flt.sports or flt.srcs or flt.remote or flt.process) or not e.blockers:
        return 0
    from . import closers as closer_map
    from .explain import holding

    def closers_of(pairs: list) -> dict:
        wanted = [conn_of(s) for _, s in pairs
                  if holding(s) in ("time_wait", "orphan") and conn_of(s) not in e.closers]
        return closer_map.lookup(wanted) if wanted else {}

    if flt.process:
        e.closers = {**closers_of(e.blockers), **e.closers}
    kept = [(b, s) for b, s in e.blockers if flt.matches_socket(s, e.closers.get(conn_of(s)))]
    left_out = len(e.blockers) - len(kept)
    e.blockers = kept
    e.closers = {**closers_of(e.shown()), **e.closers}  # the ones now described one by one
    return left_out


HELD = {"time_wait": "no process (TIME_WAIT outlives its socket)",
        "orphan": "no process (closed: the kernel is finishing the close)",
        "hidden": "a process portscope cannot see",
        "unaccepted": "its listener (not accepted yet)"}


def _in_group(b: dict, group: dict) -> bool:
    return all(b[k] == group[k] for k in ("state", "local", "uid", "options", "pids", "held", "rule"))


def _group_lines(group: dict, members: list[dict], protocol: str = "tcp",
                 pal: Palette = PLAIN) -> list[str]:
    """One group of blockers: what they are, who holds them, the rule; the
    peers and closers of the members described one by one."""
    count = group["count"]
    owners = ", ".join(group["owners"]) or HELD[group["held"]]
    accepting = set(group.get("accepting") or ())
    if accepting:  # a listener inherited by several processes: who serves it first
        takers = [label for pid, label in zip(group["pids"], group["owners"]) if pid in accepting]
        rest = len(group["owners"]) - len(takers)
        owners = ", ".join(takers) + " accepting" + (f" (+{rest} holding)" if rest else "")
    closers = sorted({b["closed_by"]["label"] for b in members if b.get("closed_by")})
    if closers:
        owners += ", left by " + ", ".join(closers[:3]) + (
            f" and {len(closers) - 3} more" if len(closers) > 3 else "")
    many = f"{count} x " if count > 1 else ""
    peers = ""
    if group["state"] not in ("LISTEN", "CLOSE") and members:
        remotes = [b["remote"] for b in members]
        peers = " <-> " + ", ".join(remotes[:3]) + (f" and {count - 3} more" if count > 3 else "")
    low, high = group["timer_ms"]
    timer = ""
    if group["held"] in ("time_wait", "orphan") and high:
        timer = f"  frees in {_seconds(high)}" if count == 1 else \
            f"  free in {_seconds(low)} to {_seconds(high)}"
    return [line("  ", pal.paint("blocked by", "bad"),
                 f" {many}{state_text(protocol, group['state'])} {group['local']}{peers}  uid {group['uid']}  "
                 f"options [{', '.join(group['options']) or '-'}]  held by {owners}{timer}"),
            f"    rule: {group['why']}"]


def _seconds(ms: int) -> str:
    return f"{ms / 1000:.0f} s" if ms >= 1000 else f"{ms} ms"


def render(e: Explanation, filtered_out: int = 0, pal: Palette = PLAIN,
           verbose: bool = False) -> str:
    """The answer as lines for a terminal: every line escaped (an owner's
    name, a path in a fix), blank lines between the parts, the verdict,
    errnos and fixes coloured by ``pal``; ``filtered_out`` blockers the
    filters left out are counted."""
    doc: dict = e.to_json()  # read back as plain JSON values
    req = doc["request"]
    opts = ", ".join(req["options"]) or "no options"
    call = "listen() on" if e.request.listen else "bind() to"
    verdict = pal.verdict("free", "would succeed") if e.verdict == "free" else \
        line(pal.verdict(e.verdict, "would FAIL with"), " ", pal.errno(e.errno))
    lines: list[str] = [line(f"{call} {req['protocol']} {req['local']} ({opts}, uid {req['uid']}): ",
                             verdict)]
    for i, r in enumerate(e.reasons):
        lines.append(line(f"  {'reason' if i == 0 else 'then'}: {r.text}",
                          *((" (", pal.errno(r.errno), ")") if i else ())))
    if e.ephemeral and e.ephemeral.get("free") is not None:
        lo, hi = e.ephemeral["range"]
        lines.append(f"  port range {lo}-{hi}: {e.ephemeral['free']} port(s) free, "
                     f"{e.ephemeral['in_use']} in use, {e.ephemeral['reserved']} reserved")
    listed = doc["blockers"]
    holders = {o.pid: o for _, s in e.blockers for o in s.owners}
    for group in doc["blocker_groups"]:
        lines += [""] + _group_lines(group, [b for b in listed if _in_group(b, group)],
                                     req["protocol"], pal)
        if verbose:  # -v: who each holder is, beyond comm[pid] (unit)
            lines += [f"    {owner_detail(holders[pid])}" for pid in group["pids"]
                      if pid in holders]
    if filtered_out:
        lines += ["", f"  ({filtered_out} other blocker(s) do not match the filters)"]
    if len(listed) < doc["blockers_total"]:
        lines += ["", f"  ({len(listed)} of {doc['blockers_total']} blockers described one by one;"
                      " --all for every one)"]
    for rule in dict.fromkeys(str(f.params.get("for")) for f in e.fixes):
        fixes = [f for f in e.fixes if str(f.params.get("for")) == rule]
        errno = next((r.errno for r in e.reasons if r.rule == rule), "")
        lines += ["", line("  ", pal.head(
            f"what would work{' against ' + errno if len(e.reasons) > 1 else ''}:"))]
        lines += [line("    - ", pal.fix(f.text)) for f in fixes]
    for n in e.notes:
        lines += ["", f"  note: {n.text}"]
    return "\n".join(shown(text) for text in lines)
