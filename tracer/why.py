"""``portscope why``: would this bind succeed now, and if not, why not."""

from __future__ import annotations

import argparse
import json
import os
import pwd

from .bindcheck import NamespaceFacts
from .errors import ExitStatus, UsageError
from .explain import LISTED, Explanation, Request, explain, namespace_facts
from .nsnames import netns_named
from .text import printable


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
    for index, dev in facts.devices.items():
        if dev.name == name or (name.isdigit() and index == int(name)):
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
    netns = args.netns or str(os.stat("/proc/thread-self/ns/net").st_ino)
    facts = namespace_facts(netns)
    result = explain(request_from_args(args, facts), netns=netns, facts=facts,
                     listed=None if args.all else LISTED)
    if args.json:
        print(json.dumps(netns_named(result.to_json(), result.inventory.scan)))
    else:
        print(render(result))
    return ExitStatus.OK if result.verdict == "free" else ExitStatus.CONFLICT


HELD = {"time_wait": "no process (TIME_WAIT outlives its socket)",
        "orphan": "no process (closed: the kernel is finishing the close)",
        "hidden": "a process portscope cannot see",
        "unaccepted": "its listener (not accepted yet)"}


def _in_group(b: dict, group: dict) -> bool:
    return all(b[k] == group[k] for k in ("state", "local", "uid", "options", "pids", "held", "rule"))


def _group_lines(group: dict, members: list[dict]) -> list[str]:
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
    return [f"  blocked by {many}{group['state']} {group['local']}{peers}  uid {group['uid']}  "
            f"options [{', '.join(group['options']) or '-'}]  held by {owners}{timer}",
            f"    rule: {group['why']}"]


def _seconds(ms: int) -> str:
    return f"{ms / 1000:.0f} s" if ms >= 1000 else f"{ms} ms"


def render(e: Explanation) -> str:
    """The answer as lines for a terminal: every line escaped (an owner's
    name, a path in a fix), blank lines between the parts."""
    doc: dict = e.to_json()  # read back as plain JSON values
    req = doc["request"]
    opts = ", ".join(req["options"]) or "no options"
    call = "listen() on" if e.request.listen else "bind() to"
    verdict = "would succeed" if e.verdict == "free" else f"would FAIL with {e.errno}"
    lines = [f"{call} {req['protocol']} {req['local']} ({opts}, uid {req['uid']}): {verdict}"]
    for i, r in enumerate(e.reasons):
        lines.append(f"  {'reason' if i == 0 else 'then'}: {r.text}" + (
            f" ({r.errno})" if i else ""))
    if e.ephemeral and e.ephemeral.get("free") is not None:
        lo, hi = e.ephemeral["range"]
        lines.append(f"  port range {lo}-{hi}: {e.ephemeral['free']} port(s) free, "
                     f"{e.ephemeral['in_use']} in use, {e.ephemeral['reserved']} reserved")
    shown = doc["blockers"]
    for group in doc["blocker_groups"]:
        lines += [""] + _group_lines(group, [b for b in shown if _in_group(b, group)])
    if len(shown) < doc["blockers_total"]:
        lines += ["", f"  ({len(shown)} of {doc['blockers_total']} blockers described one by one;"
                      " --all for every one)"]
    for rule in dict.fromkeys(str(f.params.get("for")) for f in e.fixes):
        fixes = [f for f in e.fixes if str(f.params.get("for")) == rule]
        errno = next((r.errno for r in e.reasons if r.rule == rule), "")
        lines += ["", f"  what would work{' against ' + errno if len(e.reasons) > 1 else ''}:"]
        lines += [f"    - {f.text}" for f in fixes]
    for n in e.notes:
        lines += ["", f"  note: {n.text}"]
    return "\n".join(printable(line) for line in lines)
