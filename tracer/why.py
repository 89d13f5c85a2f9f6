"""``portscope why``: would this bind succeed now, and if not, why not."""

from __future__ import annotations

import argparse
import json
import pwd
import socket

from .errors import ExitStatus, UsageError
from .explain import Explanation, Request, explain
from .text import printable


def request_from_args(args: argparse.Namespace) -> Request:
    family = None
    if args.addr:
        try:
            family = "ipv6" if ":" in socket.inet_ntop(*_parse_addr(args.addr)) else "ipv4"
        except ValueError:
            raise UsageError(f"invalid address {args.addr!r}: give an IPv4 or IPv6 address") from None
    elif args.ipv6:
        family = "ipv6"
    return Request(
        port=args.port, protocol="udp" if args.udp else "tcp", addr=args.addr, family=family,
        reuseaddr=args.reuseaddr, reuseport=args.reuseport, v6only=args.v6only,
        bound_dev_if=_device(args.device), uid=_uid(args.user), listen=args.listen,
    )


def _parse_addr(text: str) -> tuple[int, bytes]:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            return family, socket.inet_pton(family, text)
        except OSError:
            continue
    raise ValueError(text)


def _device(name: str | None) -> int:
    if not name:
        return 0
    if name.isdigit():
        return int(name)
    try:
        return socket.if_nametoindex(name)
    except OSError:
        raise UsageError(f"no network device named {name!r} in this namespace") from None


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
    result = explain(request_from_args(args), netns=args.netns)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(render(result))
    return ExitStatus.OK if result.verdict == "free" else ExitStatus.CONFLICT


def _grouped(blockers: list[dict]) -> list[list[dict]]:
    """Blockers that differ only by their peer (thousands of TIME_WAIT
    sockets on one port) are shown as one line with a count."""
    groups: dict[tuple, list[dict]] = {}
    for b in blockers:
        key = (b["state"], b["local"], b["uid"], tuple(b["options"]), tuple(b["pids"]), b["why"])
        groups.setdefault(key, []).append(b)
    return list(groups.values())


def render(e: Explanation) -> str:
    """The answer as lines for a terminal: every line escaped (an owner's
    name, a path in a fix), blank lines between the parts."""
    req = e.to_json()["request"]
    opts = ", ".join(req["options"]) or "no options"
    call = "listen() on" if e.request.listen else "bind() to"
    lines = [f"{call} {req['protocol']} {req['local']} ({opts}, uid {req['uid']}): "
             + ("would succeed" if e.verdict == "free" else "would FAIL with EADDRINUSE")]
    if e.ephemeral:
        lo, hi = e.ephemeral["range"]
        lines.append(f"  ephemeral range {lo}-{hi}: {e.ephemeral['free']} port(s) free, "
                     f"{e.ephemeral['in_use']} in use, {e.ephemeral['reserved']} reserved")
    for group in _grouped(e.to_json()["blockers"]):
        b, count = group[0], len(group)
        owners = ", ".join(f"{o['comm']}[{o['pid']}]" for o in b["owners"]) or (
            "no process (TIME_WAIT outlives its socket)" if b["state"] == "TIME_WAIT"
            else "no visible process")
        many = f"{count} x " if count > 1 else ""
        peers = ""
        if b["state"] not in ("LISTEN", "CLOSE"):
            remotes = [g["remote"] for g in group]
            peers = " <-> " + ", ".join(remotes[:3]) + (f" and {count - 3} more" if count > 3 else "")
        lines += ["", f"  blocked by {many}{b['state']} {b['local']}{peers}  uid {b['uid']}  "
                      f"options [{', '.join(b['options']) or '-'}]  held by {owners}",
                  f"    rule: {b['why']}"]
    if e.fixes:
        lines += ["", "  what would work:"] + [f"    - {f}" for f in e.fixes]
    for n in e.notes:
        lines += ["", f"  note: {n}"]
    return "\n".join(printable(line) for line in lines)
