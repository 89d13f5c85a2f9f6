"""``portscope deliver``: which socket gets a new connection (or datagram)
to ADDR:PORT now, and why that one.

The answer follows the kernel's own order (tracer/lookup.py has the
rules):

1. a TPROXY rule of the namespace (prerouting: traffic from other hosts
   only) hands a matching packet to an IP_TRANSPARENT socket before any
   lookup (tracer/tproxy.py);
2. the address must be one the namespace delivers locally, else the
   packet is routed on, not delivered;
3. TCP: the established table (with ``--from SRC:PORT``);
4. the namespace's ``sk_lookup`` programs, each run on the packet with
   BPF_PROG_TEST_RUN where the kernel allows (tracer/netprogs.py);
5. the sockets bound to the address, then to the wildcard, by score;
6. the winner's reuseport group picks the member: by a hash of the
   source (not computable outside the kernel), or by its BPF program.

What can change the answer is said beside it: a program that could not be
run, a TPROXY rule portscope cannot evaluate, equal scores, cgroup
sock_addr programs that rewrite a local client's connect() or sendmsg(),
and which other socket wins on each device a socket is bound to.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterable

from . import lookup
from .bindcheck import RT_TABLE_LOCAL, NamespaceFacts, ipv4_address_type, local_route
from .colour import PLAIN, Palette, line, palette
from .errors import ExitStatus, UsageError
from .explain import namespace_facts
from .inventory import Inventory, Socket, select_namespaces, take
from .lookup import Endpoint, Judged, Packet
from .netns import open_netns
from .nsnames import NetnsNames
from .ports import state_text, unreadable_line
from .records import format_addr, owner_detail, owner_label
from .text import printable

# What a socket's owners read like when no process holds it.
NOBODY = "no process"


@dataclass
class Answer:
    """What the kernel would do with the packet, and everything that says why."""

    packet: Packet
    netns: int
    outcome: str  # socket | refused | not_local | nobody
    decided_by: str  # tproxy | established | sk_lookup | exact | wildcard | ""
    winner: Socket | None = None
    members: list[Socket] = field(default_factory=list)  # the winner's reuseport group
    selection: str = ""  # "" (no group) | hash | bpf
    judged: list[Judged] = field(default_factory=list)
    programs: list[Any] = field(default_factory=list)  # netprogs.LookupRun
    tproxy: list[dict[str, Any]] = field(default_factory=list)
    changers: list[dict[str, Any]] = field(default_factory=list)
    notes: list[dict[str, Any]] = field(default_factory=list)
    devices: list[dict[str, Any]] = field(default_factory=list)  # who wins per bound device
    by_cookie: dict[int, Socket] = field(default_factory=dict)
    facts: NamespaceFacts | None = None
    inventory: Inventory | None = None


# ---- the question ------------------------------------------------------------------


def endpoint(text: str, what: str, need_port: bool) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int | None]:
    """``ADDR:PORT``, ``[V6]:PORT``, or (without ``need_port``) an address
    alone (``10.0.0.1``, ``fd00::1``, ``[fd00::1]``)."""
    body, port = text, None
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise UsageError(f"invalid {what} {printable(text)!r}: an IPv6 address in "
                             f"brackets needs its ']' ([fd00::1]:443)")
        body, rest = text[1:close], text[close + 1:]
        if rest:
            if not rest.startswith(":"):
                raise UsageError(f"invalid {what} {printable(text)!r}: write [ADDR]:PORT")
            port = _port(rest[1:], what, text)
    elif text.count(":") == 1:
        body, _, raw = text.partition(":")
        port = _port(raw, what, text)
    try:
        addr = lookup.address(body)
    except ValueError:
        raise UsageError(f"invalid {what} {printable(text)!r}: not an IPv4 or IPv6 address"
                         + (" with a port (10.0.0.5:443, [fd00::1]:443)" if need_port else ""))
    if need_port and port is None:
        raise UsageError(f"{what} {printable(text)!r} has no port: write ADDR:PORT "
                         f"(10.0.0.5:443, [fd00::1]:443)")
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped  # an IPv4 packet, whatever socket takes it
    return addr, port


def _port(raw: str, what: str, text: str) -> int:
    if not raw.isdigit() or not 1 <= int(raw) <= 65535:
        raise UsageError(f"invalid {what} {printable(text)!r}: the port must be a number "
                         f"from 1 to 65535")
    return int(raw)


# ---- gathering ---------------------------------------------------------------------


def endpoint_of(s: Socket) -> Endpoint:
    d, f = s.diag, s.flags
    opts = f.options if f else frozenset()
    return Endpoint(
        cookie=d.cookie, family=d.family, state=d.state, laddr=lookup.address(d.local_addr),
        lport=d.local_port, raddr=lookup.address(d.remote_addr), rport=d.remote_port,
        dev=d.bound_dev_if,
        v6only=("v6only" in opts) if f else (None if d.family == "ipv6" else False),
        reuseport="reuseport" in opts, group=f.group if f else 0,
        group_size=f.group_size if f else 0, group_bpf=bool(f and f.group_bpf_prog),
        group_has_conns=bool(f and f.group_has_conns), transparent="transparent" in opts)


def _sysctl(netns_fd: int, name: str) -> bool:
    from .nsenter import in_netns

    def read() -> bool:
        try:
            with open(f"/proc/sys/net/ipv4/{name}") as f:
                return f.read().strip() not in ("", "0")
        except OSError:
            return False
    return in_netns(netns_fd, read)


def _is_local(addr: lookup.IPAddress, facts: NamespaceFacts, table: int) -> bool:
    if isinstance(addr, ipaddress.IPv4Address):
        return ipv4_address_type(str(addr), facts, table) == "local"
    return addr == ipaddress.IPv6Address("::1") or any(
        a.family == "ipv6" and lookup.address(a.address) == addr for a in facts.addresses)


def _device(name: str | None, facts: NamespaceFacts) -> int:
    if not name:
        return 0
    index = facts.device_index(name)
    if index is not None:
        return index
    known = ", ".join(printable(d.name) for d in facts.devices.values()) or "none"
    raise UsageError(f"no network device {printable(name)!r} in that namespace; its devices: {known}")


def _address_device(addr: lookup.IPAddress, facts: NamespaceFacts) -> int:
    """The device a packet from this host to one of its own addresses is
    received as coming from: the device of the address's local route
    (ip_route_output_key_hash_rcu() sets the route's input interface to
    it, though the packet goes through lo), lo for 127/8 and ::1."""
    if isinstance(addr, ipaddress.IPv4Address):
        best = local_route(addr, facts, RT_TABLE_LOCAL)
        if best is not None and best.type == "local":
            return best.device
    else:
        for a in facts.addresses:
            if a.family == "ipv6" and lookup.address(a.address) == addr:
                return a.device
    return next((i for i, dev in facts.devices.items() if dev.name == "lo"), 1)


@dataclass(frozen=True)
class Question:
    protocol: str
    daddr: lookup.IPAddress
    dport: int
    saddr: lookup.IPAddress | None = None
    sport: int | None = None
    dev: str | None = None
    netns: str | None = None


def ask(q: Question) -> Answer:
    """Gather what the kernel has (sockets of the port, programs, rules) in
    the namespace and answer."""
    spec = q.netns or str(os.stat("/proc/thread-self/ns/net").st_ino)
    refs, _ = select_namespaces(spec)
    if len(refs) != 1:
        raise UsageError("deliver answers in one network namespace: give --netns once")
    facts = namespace_facts(spec)
    family = "ipv4" if isinstance(q.daddr, ipaddress.IPv4Address) else "ipv6"
    dif = _device(q.dev, facts)
    sdif = 0
    if dif:
        vrf = facts.devices.get(facts.devices[dif].master)
        if vrf is not None and vrf.kind == "vrf":
            dif, sdif = vrf.index, dif
    table = RT_TABLE_LOCAL
    from_host = q.saddr is not None and _is_local(q.saddr, facts, table)
    if from_host and not q.dev:
        dif = _address_device(q.daddr, facts)
    fd = open_netns(refs[0])
    if fd is None:
        raise UsageError(f"the network namespace {spec!r} is gone")
    try:
        accept = _sysctl(fd, f"{q.protocol}_l3mdev_accept") if sdif else False
    finally:
        os.close(fd)
    packet = Packet(q.protocol, family, q.daddr, q.dport, q.saddr, q.sport, dif, sdif, accept)
    inv = _sockets(q, spec)
    answer = Answer(packet, refs[0].inode, "nobody", "", facts=facts, inventory=inv)
    answer.by_cookie = {s.diag.cookie: s for s in inv.sockets}
    decide(answer, inv.sockets, local=_is_local(q.daddr, facts, table), from_host=from_host,
           known_dev=bool(q.dev) or from_host)
    if q.saddr is None or from_host:
        local_clients(answer)
    _transparent_sockets(answer)
    return answer


def _transparent_sockets(a: Answer) -> None:
    """IP_TRANSPARENT sockets of the port besides the winner: a TPROXY rule
    (added now, or one portscope could not evaluate) hands them traffic
    before any lookup."""
    for s in a.by_cookie.values():
        if s is not a.winner and s.flags and "transparent" in s.flags.options:
            a.changers.append({"kind": "transparent", "cookie": s.diag.cookie})


def _sockets(q: Question, spec: str) -> Inventory:
    """The sockets of the port the lookup can pick: for TCP the listeners,
    and the connections from the client's port when it is given (a busy
    port has 10,000s of connections that take no new one); for UDP every
    socket (a connected one takes its peer's datagrams)."""
    if q.protocol == "udp":
        return take(port=q.dport, protocols=("udp",), netns=spec)
    inv = take(port=q.dport, protocols=("tcp",), states=("LISTEN",), netns=spec)
    if q.sport is not None:
        conns = take(port=q.dport, protocols=("tcp",), states=sorted(lookup.CONNECTION_STATES),
                     remote_port=q.sport, netns=spec)
        inv.sockets += conns.sockets
        inv.unreadable_processes += conns.unreadable_processes
        inv.flags_unknown += conns.flags_unknown
    return inv


def decide(a: Answer, sockets: list[Socket], local: bool, from_host: bool, known_dev: bool) -> None:
    """Fill ``a`` in the kernel's order (the module's text)."""
    p = a.packet
    if not from_host:
        _tproxy(a, local)
        if a.outcome == "socket":
            return
    if not local:
        a.outcome, a.decided_by = "not_local", ""
        return
    eps = [endpoint_of(s) for s in sockets]
    if p.protocol == "tcp":
        est = lookup.established(p, eps)
        if est is not None and est.state != "TIME_WAIT":
            _won(a, est, "established")
            return
        if est is not None:
            a.notes.append({"kind": "time_wait", "cookie": est.cookie})
        elif p.saddr is not None and p.sport is None:
            a.notes.append({"kind": "new_source_port"})
    a.judged = [lookup.judge(ep, p) for ep in eps]
    exact = lookup.pick("exact", a.judged)
    if p.protocol == "udp" and exact.winner is not None and lookup.connected(exact.winner):
        _from_step(a, exact)
        return
    if _sk_lookup(a):
        return
    _from_step(a, lookup.best(a.judged))
    if not known_dev:
        _other_devices(a, eps)


def _from_step(a: Answer, step: lookup.Step) -> None:
    if step.winner is None:
        a.outcome, a.decided_by = "nobody", ""
        return
    _won(a, step.winner, step.name)
    if step.ties:
        a.changers.append({"kind": "equal_scores", "cookies": [t.cookie for t in step.ties]})


def _won(a: Answer, ep: Endpoint, how: str) -> None:
    a.outcome, a.decided_by = "socket", how
    a.winner = a.by_cookie.get(ep.cookie)
    if how == "established" or (a.packet.protocol == "udp" and lookup.connected(ep)):
        return  # a connection, or a connected UDP socket: no group picks
    if ep.group and ep.reuseport:
        a.members = [s for s in a.by_cookie.values()
                     if s.flags and s.flags.group == ep.group]
        a.selection = "bpf" if ep.group_bpf else "hash"
        if ep.group_has_conns:
            a.notes.append({"kind": "group_has_conns"})


def _other_devices(a: Answer, eps: list[Endpoint]) -> None:
    """The packet's device was not given: who wins on each device a socket
    of the port is bound to, where that is another socket."""
    base = a.winner.diag.cookie if a.winner else None
    for dev in sorted({ep.dev for ep in eps if ep.dev}):
        p = Packet(a.packet.protocol, a.packet.family, a.packet.daddr, a.packet.dport,
                   a.packet.saddr, a.packet.sport, dev, 0, a.packet.l3mdev_accept)
        step = lookup.best([lookup.judge(ep, p) for ep in eps])
        if step.winner is not None and step.winner.cookie != base and not (
                a.winner and a.winner.flags and lookup.same_group(step.winner, endpoint_of(a.winner))):
            a.devices.append({"device": dev, "cookie": step.winner.cookie})


# ---- programs and rules --------------------------------------------------------------


def _sk_lookup(a: Answer) -> bool:
    """Run the namespace's sk_lookup programs; True when they decided."""
    from . import netprogs

    scan = netprogs.sk_lookup_programs(a.netns)
    for what, why in scan.problems:
        a.notes.append({"kind": "unreadable", "what": what, "why": why})
    if not scan.supported or not scan.programs:
        return False
    p = a.packet
    source = (str(p.saddr) if p.saddr is not None else str(lookup.wildcard(p.family)), p.sport or 0)
    if p.saddr is None or p.sport is None:
        a.notes.append({"kind": "programs_run_from", "source": list(source)})
    runs = [netprogs.run_sk_lookup(prog, p.protocol, p.family, source, (str(p.daddr), p.dport),
                                   p.sdif or p.dif)
            for prog in sorted(scan.programs, key=lambda prog: prog.order)]
    a.programs = runs
    outcome = netprogs.combine(runs)
    if outcome.verdict == "unknown":
        a.changers.append({"kind": "program_unknown",
                           "programs": [r.program.to_json() for r in runs if r.verdict == "unknown"],
                           "why": next((r.why for r in runs if r.verdict == "unknown"), "")})
        return False
    if outcome.cookie:
        sock = a.by_cookie.get(outcome.cookie) or _socket_by_cookie(a, outcome.cookie)
        if sock is None:
            a.notes.append({"kind": "selected_unseen", "cookie": outcome.cookie})
            a.outcome, a.decided_by = "socket", "sk_lookup"
            return True
        a.by_cookie[outcome.cookie] = sock
        _won(a, endpoint_of(sock), "sk_lookup")
        a.notes.append({"kind": "steered", "program": outcome.decided_by.to_json()
                        if outcome.decided_by else None})
        return True
    if outcome.verdict == "drop":
        a.outcome, a.decided_by = "refused", "sk_lookup"
        return True
    return False


def _socket_by_cookie(a: Answer, cookie: int) -> Socket | None:
    """A program may hand the packet to a socket of any port: look in every
    listener (or UDP socket) of the namespace."""
    states = ("LISTEN",) if a.packet.protocol == "tcp" else None
    inv = take(protocols=(a.packet.protocol,), states=states, netns=str(a.netns))
    return next((s for s in inv.sockets if s.diag.cookie == cookie), None)


def _tproxy(a: Answer, local: bool) -> None:
    """TPROXY rules run in prerouting, before any socket lookup. For an
    address the namespace does not own, the packet is delivered only if a
    fwmark rule routes the rule's mark to a table with a local default
    route; else it is routed on, whatever socket the rule found."""
    from . import tproxy

    routing: Any = None

    scan = tproxy.tproxy_rules(a.netns)
    for what, why in scan.problems:
        a.notes.append({"kind": "tproxy_unreadable", "what": what, "why": why})
    p = a.packet
    iif = a.facts.devices[p.sdif or p.dif].name if a.facts and (p.sdif or p.dif) in a.facts.devices else None
    for rule in scan.rules:
        hit = tproxy.matches(rule, p.protocol, p.family, str(p.daddr), p.dport, iif)
        if hit is False:
            continue
        entry: dict[str, Any] = {"rule": rule.to_json(), "matches": hit}
        target = _tproxy_target(a, rule)
        if target is None:
            entry["result"] = "no_socket"
        elif not target.flags or "transparent" not in target.flags.options:
            entry["result"] = "not_transparent"
            entry["cookie"] = target.diag.cookie
            a.by_cookie[target.diag.cookie] = target
        else:
            entry["result"] = "transparent"
            entry["cookie"] = target.diag.cookie
            a.by_cookie[target.diag.cookie] = target
        if entry["result"] == "transparent" and not local:
            routing = routing or tproxy.policy_routing(a.netns)
            routed = routing.delivers(rule.mark, p.family)
            if routed is False:
                entry["result"] = "not_routed_locally"
            elif routed is None:
                a.changers.append({"kind": "tproxy_routing_unknown", "rule": rule.to_json()})
        a.tproxy.append(entry)
        if hit and entry["result"] == "transparent":
            _won(a, endpoint_of(target), "tproxy")  # type: ignore[arg-type]
            return
        if hit is None:
            a.changers.append({"kind": "tproxy_unknown", "rule": rule.to_json()})


def _tproxy_target(a: Answer, rule: Any) -> Socket | None:
    """nf_tproxy_get_sock_v4/v6(): the listener (or UDP socket) the kernel
    finds on the rule's address (else the packet's) and port."""
    p = a.packet
    port = rule.to_port or p.dport
    addr = lookup.address(rule.to_addr) if rule.to_addr else p.daddr
    inv = take(port=port, protocols=(p.protocol,), netns=str(a.netns))
    q = Packet(p.protocol, p.family, addr, port, p.saddr, p.sport, p.dif, p.sdif, p.l3mdev_accept)
    step = lookup.best([lookup.judge(endpoint_of(s), q) for s in inv.sockets])
    if step.winner is None:
        return None
    return next(s for s in inv.sockets if s.diag.cookie == step.winner.cookie)


def local_clients(a: Answer) -> None:
    """cgroup programs that rewrite where a local process connects or sends."""
    from . import netprogs

    kinds = [k for k in netprogs.SOCK_ADDR_KINDS
             if k.startswith(("connect", "sendmsg")) and k.endswith("4" if a.packet.family == "ipv4" else "6")
             and (a.packet.protocol == "udp" or k.startswith("connect"))]
    scan = netprogs.sock_addr_programs(kinds)
    for prog in scan.programs:
        a.changers.append({"kind": "sock_addr", "program": prog.to_json()})
    for what, why in scan.problems:
        a.notes.append({"kind": "unreadable", "what": what, "why": why})


# ---- output ------------------------------------------------------------------------


def _who(facts: NamespaceFacts | None, s: Socket | None) -> str:
    """``10.0.0.5:443 dev eth1 (LISTEN) of nginx[812]``; not escaped."""
    if s is None:
        return "a socket portscope cannot see"
    owners = ", ".join(owner_label(o.to_json()) for o in s.owners) or NOBODY
    d = s.diag
    name = facts.device_name(d.bound_dev_if) if facts else str(d.bound_dev_if)
    dev = f" dev {name}" if d.bound_dev_if else ""
    return (f"{format_addr(d.family, d.local_addr, d.local_port)}{dev} "
            f"({state_text(d.protocol, d.state)}) of {owners}")


def _sock_json(s: Socket | None) -> dict[str, object] | None:
    return s.to_json() if s is not None else None


# Why a socket that could take the packet loses it, said of the winner.
BEATS = {
    "group": "another member of the winner's reuseport group",
    "step": "loses: the winner is bound to the destination address itself, which the kernel "
            "looks up before the wildcard",
    "connected": "loses: the winner is connected to this source",
    "address": "loses: the winner is bound to the destination address",
    "device": "loses: the winner is bound to the device the packet arrives on, which scores "
              "over an unbound socket",
    "ipv4": "loses: the winner is an IPv4 socket, which scores over an IPv6 dual-stack one "
            "for an IPv4 packet",
    "order": "the same score as the winner: the kernel takes the first in its hash chain",
    "sk_lookup": "passed over: an sk_lookup program chose the winner before any scoring",
    "tproxy": "passed over: a TPROXY rule chose the winner before any lookup",
}


def losers(a: Answer) -> list[tuple[Judged, str]]:
    """Every socket of the port that could have taken the packet, or was
    kept out, with the rule; the port's TCP connections are not listed
    (they take no new connection; the established table is their step)."""
    win_cookie = a.winner.diag.cookie if a.winner else None
    win = next((j for j in a.judged if j.endpoint.cookie == win_cookie), None)
    out = []
    for j in a.judged:
        if j.endpoint.cookie == win_cookie:
            continue
        if j.rule == "not_listening" and j.endpoint.state in lookup.CONNECTION_STATES:
            continue
        if j.score < 0:
            out.append((j, j.rule))
        elif a.decided_by in ("sk_lookup", "tproxy"):
            out.append((j, a.decided_by))
        elif win is not None:
            out.append((j, lookup.beats(win, j)))
    # The ones that could take it first, then the ones kept out.
    return sorted(out, key=lambda pair: pair[0].score < 0)


# How many of the other sockets the text lists (--json has them all).
LISTED = 20


def to_json(a: Answer) -> dict[str, object]:
    p = a.packet
    names = NetnsNames(a.inventory.scan if a.inventory else None)
    return {
        "protocol": p.protocol, "destination": format_addr(p.family, str(p.daddr), p.dport),
        "source": None if p.saddr is None else _source(p),
        "device": p.sdif or p.dif or None, "netns": a.netns, "netns_name": names.label(a.netns),
        "outcome": a.outcome, "decided_by": a.decided_by or None,
        "socket": _sock_json(a.winner),
        "reuseport": {"selection": a.selection, "members": [_sock_json(s) for s in a.members]}
        if a.members else None,
        "others": [{"socket": _sock_json(a.by_cookie.get(j.endpoint.cookie)), "rule": rule,
                    "score": j.score, "step": j.step} for j, rule in losers(a)],
        "sk_lookup": [{"program": r.program.to_json(), "verdict": r.verdict, "cookie": r.cookie,
                       "why": r.why} for r in a.programs],
        "tproxy": a.tproxy, "devices": [
            {**d, "socket": _sock_json(a.by_cookie.get(d["cookie"]))} for d in a.devices],
        "changers": a.changers, "notes": a.notes,
        "health": a.inventory.health() if a.inventory else {},
    }


def render(a: Answer, pal: Palette = PLAIN, verbose: bool = False) -> str:
    p = a.packet
    what = "connection" if p.protocol == "tcp" else "datagram"
    dest = format_addr(p.family, str(p.daddr), p.dport)
    src = "" if p.saddr is None else f" from {_source(p)}"
    dev = a.facts.device_name(p.sdif or p.dif) if a.facts and (p.sdif or p.dif) else ""
    out = [line(pal.head(f"A new {p.protocol.upper()} {what} to {dest}{src}"),
                f" on {dev}" if dev else "", f" (netns {NetnsNames(a.inventory.scan if a.inventory else None).describe(a.netns)}):")]
    if a.outcome == "socket":
        out.append(line("  goes to ", pal.verdict("free", _who(a.facts, a.winner))))
        decided = DECIDED[a.decided_by]
        if p.protocol == "udp":
            decided = decided.replace("the listener lookup", "the socket lookup")
        out.append(f"  decided by: {decided}")
        if verbose and a.winner:
            out += [f"    {printable(owner_detail(o))}" for o in a.winner.owners]
        if len(a.members) > 1:
            out.append(_group_line(a))
    else:
        out.append(line("  ", pal.verdict("conflict", OUTCOMES[a.outcome])))
    for run in a.programs:
        out.append(f"  sk_lookup program {printable(run.program.name) or '?'} (id {run.program.prog_id}): "
                   + printable(_run_text(a, run)))
    for t in a.tproxy:
        out.append(f"  TPROXY rule {printable(t['rule'].get('text', ''))}: {TPROXY[t['result']]}"
                   + ("" if t["matches"] else " (portscope cannot tell whether it matches)"))
    lost = losers(a)
    if lost:
        out.append(pal.head("  other sockets of the port:"))
        lines = [f"    {printable(_who(a.facts, a.by_cookie.get(j.endpoint.cookie)))}: "
                 + (BEATS[rule] if rule in BEATS
                    else f"cannot take it: {lookup.EXCLUSIONS.get(rule, rule)}")
                 for j, rule in lost]
        # Sockets alike (a group's members, one process's) are one line.
        counted = list(dict.fromkeys(lines))
        for text in counted[:LISTED]:
            n = lines.count(text)
            out.append(text + (f" (x{n})" if n > 1 else ""))
        lost = counted
    if len(lost) > LISTED:
        out.append(f"    ... and {len(lost) - LISTED} more (--json lists them all)")
    for d in a.devices:
        name = a.facts.device_name(d["device"]) if a.facts else str(d["device"])
        out.append(f"  arriving on {printable(name)} it goes to "
                   f"{printable(_who(a.facts, a.by_cookie.get(d['cookie'])))} instead (bound to that device)")
    for c in a.changers:
        out.append(line("  ", pal.fix("can change: "), printable(_changer_text(c, a))))
    for n in a.notes:
        out.append(f"  note: {printable(_note_text(n))}")
    out += _health_lines(a)
    return "\n".join(out)


def _health_lines(a: Answer) -> list[str]:
    """What could not be read, which the answer may depend on."""
    health = a.inventory.health() if a.inventory else {}
    out = []
    if health.get("flags_unknown"):
        out.append(f"  note: the flags of {health['flags_unknown']} socket(s) could not be read "
                   f"(IPV6_V6ONLY, reuseport group, IP_TRANSPARENT): an IPv6 one is judged "
                   f"'v6only unknown'")
    # Only when a socket of the answer shows no owner: then it may be one of theirs.
    ownerless = any(not s.owners for s in a.by_cookie.values())
    named = unreadable_line(a.inventory) if a.inventory and ownerless else ""
    if named:
        out.append(f"  note: {named} (a socket it holds shows no owner)")
    return out


def _source(p: Packet) -> str:
    if p.sport is None:
        return str(p.saddr)
    return format_addr(p.family, str(p.saddr), p.sport)


def _group_line(a: Answer) -> str:
    n = len(a.members)
    if a.selection == "bpf":
        return (f"  reuseport group of {n}: its BPF program picks the member "
                f"(portscope cannot run it): any of {_pids(a.members)}")
    return (f"  reuseport group of {n}: the member is picked by a hash of the source address "
            f"and port (keyed by the kernel's secret): any of {_pids(a.members)}")


def _pids(sockets: Iterable[Socket]) -> str:
    names = [owner_label(o.to_json()) for s in sockets for o in s.owners]
    return printable(", ".join(dict.fromkeys(names)) or NOBODY)


def _run_text(a: Answer, run: Any) -> str:
    if run.verdict == "unknown":
        return f"not run: {run.why}"
    if run.verdict == "drop":
        return "drops it"
    if run.cookie:
        return f"selects {_who(a.facts, a.by_cookie.get(run.cookie))}"
    return "selects no socket (the regular lookup goes on)"


def _changer_text(c: dict[str, Any], a: Answer) -> str:
    kind = c["kind"]
    if kind == "equal_scores":
        return "sockets with the winner's score: the kernel's hash chain order decides: " + "; ".join(
            _who(a.facts, a.by_cookie.get(k)) for k in c["cookies"])
    if kind == "program_unknown":
        names = ", ".join(f"{p['name'] or '?'} (id {p['prog_id']})" for p in c["programs"])
        return f"sk_lookup program {names} may select another socket or drop it: {c['why']}"
    if kind == "tproxy_unknown":
        return f"TPROXY rule {c['rule'].get('text', '')} may redirect it (portscope cannot evaluate all its matches)"
    if kind == "transparent":
        return (f"{_who(a.facts, a.by_cookie.get(c['cookie']))} is IP_TRANSPARENT: a TPROXY "
                f"rule would hand it this traffic before any lookup")
    if kind == "tproxy_routing_unknown":
        return (f"TPROXY rule {c['rule'].get('text', '')}: whether a fwmark rule routes its mark "
                f"to a local table could not be read (without one, the packet is routed on)")
    if kind == "sock_addr":
        prog = c["program"]
        return (f"cgroup {prog['kind']} program {prog['name'] or '?'} (id {prog['prog_id']}) on "
                f"{prog['cgroup']} can rewrite where a process of that cgroup connects or sends")
    return kind


def _note_text(n: dict[str, Any]) -> str:
    kind = n["kind"]
    if kind == "time_wait":
        return ("a TIME_WAIT socket holds this 4-tuple: a new SYN usually reopens it "
                "(a higher sequence number or a newer timestamp) and goes to the listener")
    if kind == "new_source_port":
        return ("without the client's port, the established table is not asked: give "
                "--from SRC:PORT to ask about an existing connection")
    if kind == "group_has_conns":
        return "the group has connected members: the kernel may pass over the hashed pick"
    if kind == "programs_run_from":
        return (f"sk_lookup programs were run as from {n['source'][0]}:{n['source'][1]} "
                f"(give --from for a client's)")
    if kind == "steered":
        return ("an sk_lookup program hands the packet to that socket, whatever address and "
                "port it is bound to")
    if kind == "selected_unseen":
        return f"the selected socket (cookie {n['cookie']}) is in no dump portscope could read"
    if kind in ("unreadable", "tproxy_unreadable"):
        return f"could not read {n['what']}: {n['why']}"
    return kind


DECIDED = {
    "tproxy": "a TPROXY rule, before any socket lookup (prerouting)",
    "established": "the established table: a socket of exactly this 4-tuple",
    "sk_lookup": "the namespace's sk_lookup BPF program",
    "exact": "the listener lookup: bound to the destination address itself",
    "wildcard": "the listener lookup: bound to the wildcard address",
    "": "",
}
OUTCOMES = {
    "refused": "refused: an sk_lookup program drops it (TCP answers RST; UDP, port unreachable)",
    "not_local": "not delivered here: the address is not one of this namespace's (no local "
                 "route): the packet is routed on, or dropped",
    "nobody": "no socket takes it (TCP answers RST; UDP, port unreachable)",
}
TPROXY = {
    "transparent": "hands it to that IP_TRANSPARENT socket",
    "not_transparent": "finds a socket that is not IP_TRANSPARENT: the rule does nothing",
    "no_socket": "finds no socket on its target: the rule does nothing",
    "not_routed_locally": "marks it, but no fwmark rule routes that mark to a table with a "
                          "local default route: the packet is routed on, not delivered",
}


# ---- the command ---------------------------------------------------------------------


def run(args: argparse.Namespace) -> ExitStatus:
    daddr, dport = endpoint(args.destination, "destination", need_port=True)
    saddr, sport = endpoint(args.source, "--from", need_port=False) if args.source else (None, None)
    if saddr is not None and saddr.version != daddr.version:
        raise UsageError("--from and the destination must be of one family (an IPv4 client "
                         "reaches an IPv6 socket through its v4-mapped address: give the IPv4 one)")
    q = Question("udp" if args.udp else "tcp", daddr, dport or 0, saddr, sport, args.dev,
                 args.netns)
    a = ask(q)
    if args.json:
        print(json.dumps(to_json(a)))
    else:
        print(render(a, palette(args), args.verbose))
    return ExitStatus.OK if a.outcome == "socket" else ExitStatus.CONFLICT
