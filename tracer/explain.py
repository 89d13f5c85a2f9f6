"""The conflict explainer: would a bind() (or listen()) with these options
succeed now, which sockets block it, under which rule, and what would fix it.

The verdict comes from tracer.bindrules over the live inventory. Fixes are
not guessed: each candidate change (an option, another user, a specific
address, waiting out TIME_WAIT, stopping a holder) is proposed only if the
same rules say the bind would then succeed.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, replace

from . import bindrules
from .bindrules import Blocker, Rule, Sock
from .errors import UsageError
from .inventory import Inventory, Socket, select_namespaces, take
from .netns import port_range

WILDCARDS = {"ipv4": "0.0.0.0", "ipv6": "::"}
# Stand-ins for "some specific address the blockers do not use" (TEST-NET).
SPECIFIC_PROBES = {"ipv4": "192.0.2.1", "ipv6": "2001:db8::1"}


@dataclass(frozen=True)
class Request:
    """The bind the user asks about."""

    port: int
    protocol: str = "tcp"
    addr: str | None = None  # None: the wildcard of the family
    family: str | None = None  # None: from addr, else ipv4
    reuseaddr: bool = False
    reuseport: bool = False
    v6only: bool = False
    bound_dev_if: int = 0
    uid: int = 0
    listen: bool = False  # the question is listen() on a socket already bound there
    self_inode: int = 0  # for listen(): the socket itself, which never blocks itself

    def sock(self) -> Sock:
        family = self.family or _family_of(self.addr)
        addr = self.addr or WILDCARDS[family]
        return Sock(self.protocol, family, addr, self.port, "LISTEN" if self.listen else "CLOSE",
                    self.reuseaddr, self.reuseport, self.v6only, self.bound_dev_if, self.uid)


def _family_of(addr: str | None) -> str:
    if addr is None:
        return "ipv4"
    return "ipv6" if isinstance(ipaddress.ip_address(addr), ipaddress.IPv6Address) else "ipv4"


@dataclass
class Explanation:
    request: Request
    new: Sock
    blockers: list[tuple[Blocker, Socket]]
    fixes: list[str]
    notes: list[str]
    inventory: Inventory
    ephemeral: dict[str, object] | None = None  # port 0: the range and what is free

    @property
    def verdict(self) -> str:
        return "conflict" if self.blockers or (self.ephemeral and not self.ephemeral["free"]) \
            else "free"

    def to_json(self) -> dict[str, object]:
        return {
            "verdict": self.verdict,
            "request": {
                "protocol": self.new.protocol, "family": self.new.family,
                "local": _endpoint(self.new.family, self.new.addr, self.new.port),
                "options": [n for n, on in (("reuseaddr", self.new.reuseaddr),
                                            ("reuseport", self.new.reuseport),
                                            ("v6only", self.new.v6only)) if on],
                "bound_dev_if": self.new.bound_dev_if, "uid": self.new.uid,
                "call": "listen" if self.request.listen else "bind",
            },
            "blockers": [_blocker_json(b, s) for b, s in self.blockers],
            "fixes": self.fixes,
            "notes": self.notes,
            "ephemeral": self.ephemeral,
            "health": self.inventory.health(),
        }


def _endpoint(family: str, addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if family == "ipv6" else f"{addr}:{port}"


def _blocker_json(b: Blocker, s: Socket) -> dict[str, object]:
    d = s.diag
    return {
        "pids": [o.pid for o in s.owners],
        "comm": s.owners[0].comm if s.owners else None,
        "owners": [o.to_json() for o in s.owners],
        "uid": b.sock.uid,
        "state": d.state,
        "local": _endpoint(d.family, d.local_addr, d.local_port),
        "remote": _endpoint(d.family, d.remote_addr, d.remote_port),
        "options": sorted(s.options),
        "bound_dev_if": d.bound_dev_if,
        "inode": d.inode,
        "cookie": d.cookie,
        "netns": d.netns,
        "rule": b.rule.value,
        "overlap": b.overlap.value,
        "why": b.sentence(),
    }


# ---- from inventory sockets to rule sockets ---------------------------------


def as_rule_sock(s: Socket) -> Sock:
    d, f = s.diag, s.flags
    return Sock(
        protocol=d.protocol, family=d.family, addr=d.local_addr, port=d.local_port,
        state=d.state,
        reuseaddr=bool(f and "reuseaddr" in f.options),
        reuseport=bool(f and "reuseport" in f.options),
        v6only=bool(f and "v6only" in f.options),
        bound_dev_if=d.bound_dev_if,
        uid=f.sock_uid if f else d.uid,
        # The cookie names a socket uniquely; one sock_diag never dumped (a
        # bound-only socket on an older kernel) may have none: its inode then.
        key=d.cookie or ("inode", d.inode),
    )


def explain(request: Request, netns: str | None = None,
            inventory: Inventory | None = None) -> Explanation:
    """Explain ``request`` against the sockets of one namespace (default: ours)."""
    netns = netns or str(os.stat("/proc/thread-self/ns/net").st_ino)
    port = request.port or None
    inv = inventory or take(port=port, protocols=(request.protocol,), netns=netns)
    new = request.sock()
    if request.port == 0:
        return _explain_ephemeral(request, new, inv, netns)
    pairs = _rule_pairs(inv, new, request.self_inode)
    found = bindrules.blockers(new, [r for r, _ in pairs])
    by_key = {r.key: s for r, s in pairs}
    blockers = [(b, by_key[b.sock.key]) for b in found]
    fixes, notes = _fixes(new, [r for r, _ in pairs], blockers)
    if blockers:
        notes += _fast_path_notes(new, pairs)
    notes += _inventory_notes(inv)
    return Explanation(request, new, blockers, fixes, notes, inv)


def _rule_pairs(inv: Inventory, new: Sock, self_inode: int = 0) -> list[tuple[Sock, Socket]]:
    """The namespace's sockets on the port, as rule sockets. For a listen()
    question the socket itself is among them: it never blocks itself, and
    the kernel skips it (sk == sk2), so the first socket that looks exactly
    like the request and is not listening is left out."""
    pairs = [(as_rule_sock(s), s) for s in inv.sockets
             if s.diag.protocol == new.protocol and s.diag.local_port == new.port]
    if self_inode:
        return [(r, s) for r, s in pairs if s.diag.inode != self_inode]
    if new.state == "LISTEN":
        for i, (r, _) in enumerate(pairs):
            if r.state != "LISTEN" and r.addr == new.addr and r.family == new.family:
                del pairs[i]
                break
    return pairs


# ---- fixes: candidate changes, kept only when the rules accept them ---------


def _fixes(new: Sock, existing: list[Sock],
           blockers: list[tuple[Blocker, Socket]]) -> tuple[list[str], list[str]]:
    if not blockers:
        return [], []
    fixes: list[str] = []
    notes: list[str] = []
    works = lambda candidate: not bindrules.refused(candidate, existing)  # noqa: E731

    for changes, text in _option_changes(new):
        if works(replace(new, **changes)):
            fixes.append(text)
    rules = {b.rule for b, _ in blockers}
    tw_only = all(b.sock.state == "TIME_WAIT" for b, _ in blockers)
    if Rule.TIME_WAIT in rules and not works(replace(new, reuseaddr=True)):
        notes.append("SO_REUSEADDR on the new socket alone does not help here: the kernel "
                     "also needs it on the socket that left the TIME_WAIT (Linux, unlike BSD)")
    other_uids = sorted({b.sock.uid for b, _ in blockers if b.rule == Rule.REUSEPORT_OTHER_UID})
    if len(other_uids) == 1 and works(replace(new, uid=other_uids[0])):
        fixes.append(f"run the new socket's process as uid {other_uids[0]}, the owner of "
                     "the SO_REUSEPORT group (a group is for one user)")
    if new.addr == WILDCARDS[new.family]:
        specific = replace(new, addr=SPECIFIC_PROBES[new.family])
        if works(specific):
            used = sorted({b.sock.addr for b, _ in blockers})
            fixes.append("bind a specific address instead of the wildcard (not "
                         + ", ".join(used) + ")")
    if all(b.sock.bound_dev_if for b, _ in blockers) and not new.bound_dev_if:
        fixes.append("bind the new socket to another device (SO_BINDTODEVICE): every "
                     "blocker is bound to a device")
    if tw_only:
        wait = max((s.diag.timer_ms for _, s in blockers), default=0)
        fixes.append(f"wait {wait / 1000:.0f} s for the TIME_WAIT sockets to expire")
    fixes.extend(_holder_fixes(blockers))
    return fixes, notes


def _fast_path_notes(new: Sock, pairs: list[tuple[Sock, Socket]]) -> list[str]:
    """The kernel's SO_REUSEPORT fast path may accept what the full check
    refuses (see tracer.bindrules): say so when a live socket could have
    set the port's cache."""
    by_key = {r.key: s for r, s in pairs}
    candidates = bindrules.fast_path_candidates(new, [r for r, _ in pairs])
    if not candidates:
        return []
    where = ", ".join(
        f"{_endpoint(c.family, c.addr, c.port)} (inode {by_key[c.key].diag.inode})"
        for c in candidates)
    return [f"the kernel may still accept this bind: it skips the conflict check for a "
            f"SO_REUSEPORT socket of uid {new.uid} when the last SO_REUSEPORT socket that got "
            f"the port was of that uid and covered this address, as {where} does; which "
            "socket that was depends on the order of earlier binds, which cannot be seen"]


def _option_changes(new: Sock) -> list[tuple[dict[str, object], str]]:
    out: list[tuple[dict[str, object], str]] = []
    if not new.reuseaddr:
        out.append(({"reuseaddr": True}, "set SO_REUSEADDR on the new socket"))
    if not new.reuseport:
        out.append(({"reuseport": True}, "set SO_REUSEPORT on the new socket"))
    if new.family == "ipv6" and not new.v6only:
        out.append(({"v6only": True}, "set IPV6_V6ONLY on the new socket (leave IPv4 to "
                                       "the IPv4 socket)"))
    return out


def _holder_fixes(blockers: list[tuple[Blocker, Socket]]) -> list[str]:
    """Who to stop, and a word on connections kept by processes that do not
    listen on the port (typically a forked child of an earlier instance)."""
    listeners = {o.pid for b, s in blockers if s.diag.state == "LISTEN" for o in s.owners}
    out = []
    for b, s in blockers:
        if b.sock.state == "TIME_WAIT":
            continue
        if not s.owners:
            held = ("a connection not yet accepted: it goes away when its listener closes"
                    if s.diag.state == "ESTABLISHED" else
                    "held by a process portscope cannot see (another PID namespace, or "
                    "unreadable), or by the kernel itself")
            out.append(f"the {s.diag.state} socket on "
                       f"{_endpoint(s.diag.family, s.diag.local_addr, s.diag.local_port)} "
                       f"(inode {s.diag.inode}) has no visible owner: {held}")
            continue
        names = ", ".join(o.label() for o in s.owners)
        what = f"{s.diag.state} {_endpoint(s.diag.family, s.diag.local_addr, s.diag.local_port)}"
        if s.diag.state == "ESTABLISHED" and not (listeners & {o.pid for o in s.owners}):
            out.append(f"{names} still holds the connection {what} <-> "
                       f"{_endpoint(s.diag.family, s.diag.remote_addr, s.diag.remote_port)} "
                       "without listening (a forked child of an earlier instance?): "
                       "close it or stop that process")
        else:
            out.append(f"stop or reconfigure {names}, which holds {what}")
    return list(dict.fromkeys(out))


def _inventory_notes(inv: Inventory) -> list[str]:
    notes = []
    if inv.flags_unknown:
        notes.append(f"{inv.flags_unknown} socket(s) on the port had no readable flags: "
                     "they were treated as having no SO_REUSEADDR/SO_REUSEPORT")
    if inv.unreadable_processes:
        notes.append(f"{inv.unreadable_processes} process(es) could not be read: owners "
                     "may be missing")
    return notes


# ---- port 0: is any ephemeral port left? ------------------------------------


def _explain_ephemeral(request: Request, new: Sock, inv: Inventory, netns: str) -> Explanation:
    """bind(port 0) picks a port in ip_local_port_range that no socket
    overlaps at all: neither SO_REUSEADDR nor SO_REUSEPORT lets the kernel
    share an ephemeral port (relax=false, reuseport_ok=false in
    inet_csk_find_open_port; UDP applies its usual rule)."""
    refs, _ = select_namespaces(netns)
    rng = port_range(refs[0]) if refs else None
    if rng is None:
        raise UsageError(f"the network namespace {netns!r} is gone")
    low, high, reserved = rng.low, rng.high, rng.reserved
    taken: dict[int, list[Sock]] = {}
    for s in inv.sockets:
        r = as_rule_sock(s)
        if r.protocol == new.protocol and low <= r.port <= high:
            taken.setdefault(r.port, []).append(r)
    free = 0
    for port in range(low, high + 1):
        if port in reserved:
            continue
        occupants = taken.get(port, [])
        if not bindrules.refused(replace(new, port=port), occupants, ephemeral=True):
            free += 1
    eph = {"range": [low, high], "reserved": len(reserved), "free": free,
           "in_use": len(taken)}
    notes = [] if free else [f"all {high - low + 1 - len(reserved)} ports of "
                             f"ip_local_port_range {low}-{high} are taken"]
    fixes = [] if free else ["widen net.ipv4.ip_local_port_range, or close sockets that hold "
                             "ports in it (see portscope timewait)"]
    return Explanation(request, new, [], fixes, notes + _inventory_notes(inv), inv, eph)
