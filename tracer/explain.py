"""The conflict explainer: would a bind() (or listen()) with these options
succeed now, and if not, why (an errno and the kernel rule that gives it),
which sockets block it, and what would fix it.

The answer follows the kernel's own order. First what it checks before it
looks at the port (tracer.bindcheck: the address must be the namespace's,
a port below ip_unprivileged_port_start needs CAP_NET_BIND_SERVICE, ...),
then the port itself (tracer.bindrules over the live inventory: EADDRINUSE;
for port 0, whether any port of the range is left). Every refusal the
kernel would meet is a :class:`Reason`; the first one is the errno it
returns.

Fixes are data (:class:`Fix`: kind, target, parameters, and a sentence
beside them) and are not guessed: each candidate change (an option, another
user, a specific address, a capability, a sysctl, waiting out TIME_WAIT,
stopping a holder) is proposed only if the same rules say it removes the
reason it is listed for. Notes (:class:`Note`) say what the rules cannot
decide or what was not seen. Tests check the data, never the sentences.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field, replace

from . import bindcheck, bindrules, sockdestroy
from .bindcheck import NamespaceFacts, Question, Refusal
from .bindrules import Blocker, Rule, Sock
from .errors import UsageError
from .inventory import Inventory, Socket, select_namespaces, take
from .netns import PortRange, open_netns
from .records import Fix, Note, Reason, format_addr
from .sockflags import LoadingIterators

WILDCARDS = {"ipv4": "0.0.0.0", "ipv6": "::"}
# Stand-ins for "some specific address the blockers do not use" (TEST-NET).
SPECIFIC_PROBES = {"ipv4": "192.0.2.1", "ipv6": "2001:db8::1"}
# States in which no process can hold a socket: the kernel finishes the close.
ORPHAN_STATES = ("FIN_WAIT1", "FIN_WAIT2", "CLOSING", "LAST_ACK")


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
    freebind: bool = False  # IP_FREEBIND (IPV6_FREEBIND)
    transparent: bool = False  # IP_TRANSPARENT (needs CAP_NET_ADMIN to set)
    bind_address_no_port: bool = False  # IP_BIND_ADDRESS_NO_PORT
    port_range: tuple[int, int] | None = None  # IP_LOCAL_PORT_RANGE (kernel 6.3+)
    cap_net_bind_service: bool | None = None  # None: what the uid has (root: yes)
    cgroup: str | None = None  # the process's cgroup2 path, for bind programs (None: ours)

    def sock(self) -> Sock:
        family = self.family or _family_of(self.addr)
        addr = self.addr or WILDCARDS[family]
        return Sock(self.protocol, family, addr, self.port, "LISTEN" if self.listen else "CLOSE",
                    self.reuseaddr, self.reuseport, self.v6only, self.bound_dev_if, self.uid)

    @property
    def has_cap_net_bind_service(self) -> bool:
        return self.cap_net_bind_service if self.cap_net_bind_service is not None else self.uid == 0

    def question(self) -> Question:
        s = self.sock()
        return Question(s.family, s.protocol, s.addr, s.port, s.bound_dev_if, s.v6only,
                        self.freebind, self.transparent, self.has_cap_net_bind_service)

    def options(self) -> list[str]:
        return [n for n, on in (("reuseaddr", self.reuseaddr), ("reuseport", self.reuseport),
                                ("v6only", self.v6only), ("freebind", self.freebind),
                                ("transparent", self.transparent),
                                ("bind_address_no_port", self.bind_address_no_port)) if on]


def _family_of(addr: str | None) -> str:
    if addr is None:
        return "ipv4"
    return "ipv6" if isinstance(ipaddress.ip_address(addr), ipaddress.IPv6Address) else "ipv4"


# ---- the answer, as data (its parts, Reason, Fix and Note, are records) ----------------


# Blockers described one by one by default (``why --all``: every one); the
# rest are counted in groups. A busy port has 10,000s of TIME_WAIT sockets,
# and describing each (its closer, its JSON) is what made ``why`` slow there.
LISTED = 100


@dataclass
class Explanation:
    request: Request
    new: Sock
    reasons: list[Reason]
    blockers: list[tuple[Blocker, Socket]]
    fixes: list[Fix]
    notes: list[Note]
    inventory: Inventory
    ephemeral: dict[str, object] | None = None  # port 0: the range and what is free
    facts: NamespaceFacts | None = None
    closers: dict = field(default_factory=dict)  # who closed the listed blockers no process holds
    listed: int | None = LISTED  # how many blockers are described one by one (None: all)

    def shown(self) -> list[tuple[Blocker, Socket]]:
        """The blockers described one by one: the first ``listed`` in the
        order of :func:`_by_importance`; :meth:`groups` counts them all."""
        return self.blockers if self.listed is None else self.blockers[:self.listed]

    def groups(self) -> list[dict[str, object]]:
        """Every blocker, counted by what tells them apart for a person (state,
        address, owners, options, rule): a port's 24,500 TIME_WAIT sockets
        are one line with a count and the range of their timers."""
        out: dict[tuple, dict[str, object]] = {}
        for b, s in self.blockers:
            d = s.diag
            key = (d.state, d.family, d.local_addr, d.local_port, s.options, s.owners, s.gone,
                   d.timer, bool(d.inode), b.sock.uid, b.rule, b.overlap)
            group = out.get(key)
            if group is None:
                out[key] = {"count": 1, "state": d.state,
                            "local": format_addr(d.family, d.local_addr, d.local_port),
                            "uid": b.sock.uid, "options": sorted(s.options),
                            "pids": [o.pid for o in s.owners],
                            "owners": [o.label() for o in s.owners], "held": holding(s),
                            "accepting": [o.pid for o in s.owners if o.accepts],
                            "rule": b.rule.value, "overlap": b.overlap.value, "why": b.sentence(),
                            "timer_ms": [d.timer_ms, d.timer_ms]}
            else:
                group["count"] += 1  # type: ignore[operator]
                span = group["timer_ms"]
                span[0], span[1] = min(span[0], d.timer_ms), max(span[1], d.timer_ms)  # type: ignore[index]
        return list(out.values())

    @property
    def verdict(self) -> str:
        """free; conflict (EADDRINUSE); refused (another errno)."""
        if not self.reasons:
            return "free"
        return "conflict" if self.reasons[0].errno == "EADDRINUSE" else "refused"

    @property
    def errno(self) -> str | None:
        return self.reasons[0].errno if self.reasons else None

    def to_json(self) -> dict[str, object]:
        return {
            "verdict": self.verdict,
            "errno": self.errno,
            "reasons": [r.to_json() for r in self.reasons],
            "request": {
                "protocol": self.new.protocol, "family": self.new.family,
                "local": format_addr(self.new.family, self.new.addr, self.new.port),
                "options": self.request.options(),
                "bound_dev_if": self.new.bound_dev_if, "uid": self.new.uid,
                "cap_net_bind_service": self.request.has_cap_net_bind_service,
                "port_range": list(self.request.port_range) if self.request.port_range else None,
                "call": "listen" if self.request.listen else "bind",
            },
            "blockers": [blocker_json(b, s, self.closers.get(conn_of(s))) for b, s in self.shown()],
            "blockers_total": len(self.blockers),
            "blocker_groups": self.groups(),
            "fixes": [f.to_json() for f in self.fixes],
            "notes": [n.to_json() for n in self.notes],
            "ephemeral": self.ephemeral,
            "health": self.inventory.health(),
        }


def conn_of(s: Socket) -> tuple[int, str, str, int, str, int]:
    """The connection a socket is, as the closers map keys it."""
    d = s.diag
    return (d.netns, d.family, d.local_addr, d.local_port, d.remote_addr, d.remote_port)


def blocker_json(b: Blocker, s: Socket, closer: object = None) -> dict[str, object]:
    d = s.diag
    return {
        "pids": [o.pid for o in s.owners],
        "comm": s.owners[0].comm if s.owners else None,
        "owners": [o.to_json() for o in s.owners],
        "uid": b.sock.uid,
        "state": d.state,
        "local": format_addr(d.family, d.local_addr, d.local_port),
        "remote": format_addr(d.family, d.remote_addr, d.remote_port),
        "options": sorted(s.options),
        "bound_dev_if": d.bound_dev_if,
        "inode": d.inode,
        "cookie": d.cookie,
        "netns": d.netns,
        "timer_ms": d.timer_ms,
        "held": holding(s),
        "gone": s.gone,
        "closed_by": closer.to_json() | {"label": closer.label()} if closer else None,  # type: ignore[attr-defined]
        "rule": b.rule.value,
        "overlap": b.overlap.value,
        "why": b.sentence(),
    }


def holding(s: Socket) -> str:
    """Who can hold this socket: processes (``owners``), one portscope cannot
    see (``hidden``: it has a file, no readable process holds it), nobody
    because the kernel finishes its close (``time_wait``, ``orphan``), its
    listener until accept() (``unaccepted``), or no one any more (``gone``:
    the probe saw it at the refusal; it closed before anyone looked)."""
    d = s.diag
    if s.gone:
        return "gone"
    if s.owners:
        return "owners"
    if d.state == "TIME_WAIT" or (d.state == "FIN_WAIT2" and d.timer == "timewait"):
        return "time_wait"
    if d.inode:
        return "hidden"
    if d.state in ORPHAN_STATES:
        return "orphan"
    return "unaccepted"


# ---- from inventory sockets to rule sockets ---------------------------------


def as_rule_sock(s: Socket) -> Sock:
    d, f = s.diag, s.flags
    # A FIN_WAIT2 socket on the timewait timer is a TIME_WAIT minisocket
    # inside the kernel (sk_state TCP_TIME_WAIT), and the rules treat it so.
    minisocket = d.state == "TIME_WAIT" or (d.state == "FIN_WAIT2" and d.timer == "timewait")
    state = "TIME_WAIT" if minisocket else d.state
    return Sock(
        protocol=d.protocol, family=d.family, addr=d.local_addr, port=d.local_port,
        state=state,
        reuseaddr=bool(f and "reuseaddr" in f.options),
        reuseport=bool(f and "reuseport" in f.options),
        v6only=bool(f and "v6only" in f.options),
        bound_dev_if=d.bound_dev_if,
        uid=f.sock_uid if f else d.uid,
        # The cookie names a socket uniquely; one sock_diag never dumped (a
        # bound-only socket on an older kernel) may have none: its inode then.
        key=d.cookie or ("inode", d.inode),
    )


# ---- the explainer ---------------------------------------------------------------------


def explain(request: Request, netns: str | None = None, inventory: Inventory | None = None,
            facts: NamespaceFacts | None = None, listed: int | None = LISTED) -> Explanation:
    """Explain ``request`` in one namespace (default: ours), describing the
    first ``listed`` blockers one by one (None: all)."""
    if request.listen and request.protocol == "udp":
        raise UsageError("UDP sockets do not listen(): ask about the bind (without --listen)")
    netns = netns or str(os.stat("/proc/thread-self/ns/net").st_ino)
    facts = facts or namespace_facts(netns)
    if request.port_range and not facts.socket_port_range:
        raise UsageError("this kernel has no IP_LOCAL_PORT_RANGE (it came with Linux 6.3): a "
                         "socket here picks its port from the namespace's range")
    new = request.sock()
    reasons: list[Reason] = []
    fixes: list[Fix] = []
    # Every check the kernel would refuse at, in its order: each one's cause
    # lifted in turn, to find what the next one says (a fix for the first
    # reason meets the second).
    asked = request
    while (refusal := bindcheck.admission(asked.question(), facts)) is not None:
        reasons.append(Reason(refusal.errno, refusal.rule, refusal.facts))
        fixes += admission_fixes(asked, facts, refusal)
        lifted = _lift(asked, refusal)
        if lifted is None or len(reasons) > 4:
            return Explanation(request, new, reasons, [], fixes, [], Inventory([]), facts=facts)
        asked = lifted
    # One handle on the process's iterators for the port's sockets and, later,
    # the blockers' local peers: they are loaded once.
    with LoadingIterators() as its:
        inv = inventory or take(port=request.port or None, protocols=(request.protocol,),
                                netns=netns, iterators=its)
        if request.port == 0:
            port_stage = _explain_ephemeral(request, new, inv, facts)
        else:
            port_stage = _explain_port(request, new, inv, listed)
    e = port_stage
    e.reasons = reasons + e.reasons
    e.fixes = fixes + e.fixes
    e.facts = facts
    e.notes += _inventory_notes(inv, e.blockers) + hook_notes(request)
    return e


def explain_captured(request: Request, inventory: Inventory) -> Explanation:
    """The port stage alone, on the sockets the probe read at a refusal, for
    a namespace gone by the time anyone looks (its last process exited). The
    kernel had passed every check before the port, or it would not have
    looked at the port."""
    e = _explain_port(request, request.sock(), inventory)
    e.notes.append(Note("namespace_gone", {}))
    return e


def hook_notes(request: Request) -> list[Note]:
    """BPF programs on the process's cgroup path that act on its bind()."""
    from . import hooks

    found = hooks.on_path(request.cgroup, hooks.FAMILY_HOOKS[request.sock().family])
    return [Note("bind_hook", {"hooks": [h.to_json() for h in found]})] if found else []


def namespace_facts(netns: str) -> NamespaceFacts:
    refs, _ = select_namespaces(netns)
    fd = open_netns(refs[0]) if refs else None
    if fd is None:
        raise UsageError(f"the network namespace {netns!r} is gone")
    try:
        return bindcheck.read_facts(fd)
    finally:
        os.close(fd)


def _explain_port(request: Request, new: Sock, inv: Inventory,
                  listed: int | None = LISTED) -> Explanation:
    pairs = _rule_pairs(inv, new, request.self_inode)
    found = bindrules.blockers(new, [r for r, _ in pairs])
    by_key = {r.key: s for r, s in pairs}
    blockers = _by_importance([(b, by_key[b.sock.key]) for b in found])
    reasons = [Reason("EADDRINUSE", "conflict", {"blockers": len(blockers)})] if blockers else []
    fixes, notes = _fixes(new, bindrules.distinct(r for r, _ in pairs), blockers)
    e = Explanation(request, new, reasons, blockers, fixes, notes, inv, listed=listed)
    if blockers:
        e.notes += _fast_path_notes(new, pairs)
        e.notes += _holder_notes(blockers, inv)
        # Who left a blocker is read for the ones described one by one.
        e.closers, closer_notes = _closers_of(e.shown())
        e.notes += closer_notes
    return e


# Which blockers to describe first: the ones a process holds (stop it, or
# ask it), then those no process can be asked about; among equals, the one
# that holds the port longest.
_HELD_ORDER = {"owners": 0, "hidden": 1, "unaccepted": 2, "gone": 3, "orphan": 4, "time_wait": 5}


def _by_importance(blockers: list[tuple[Blocker, Socket]]) -> list[tuple[Blocker, Socket]]:
    return sorted(blockers, key=lambda p: (_HELD_ORDER[holding(p[1])], -p[1].diag.timer_ms))


def _closers_of(blockers: list[tuple[Blocker, Socket]]) -> tuple[dict, list[Note]]:
    """Who left the blockers no process holds (TIME_WAIT, orphans): recorded
    in the kernel at the close by any portscope collector running then."""
    from . import closers

    ownerless = [s for _, s in blockers if holding(s) in ("time_wait", "orphan")]
    if not ownerless:
        return {}, []
    found = closers.lookup(conn_of(s) for s in ownerless)
    missing = [s for s in ownerless if conn_of(s) not in found]
    notes = [Note("closer_unknown", {"sockets": len(missing),
                                     "collectors": closers.running_collectors()})] if missing else []
    return found, notes


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


# ---- fixes before the port: capability, address, options ------------------------------


def admission_fixes(request: Request, facts: NamespaceFacts, refusal: Refusal) -> list[Fix]:
    """Candidate changes for a refusal before the port, each kept only when
    the same checks no longer refuse for that reason."""
    rule = refusal.rule
    q = request.sock()
    candidates: list[tuple[Fix, Request, NamespaceFacts]] = []
    if rule == "privileged_port":
        start = facts.unprivileged_port_start
        candidates += [
            (Fix("capability", "process", {"capability": "CAP_NET_BIND_SERVICE"}),
             replace(request, cap_net_bind_service=True), facts),
            (Fix("sysctl", "namespace", {"name": "net.ipv4.ip_unprivileged_port_start",
                                         "value": request.port}),
             request, replace(facts, unprivileged_port_start=request.port)),
            (Fix("port", "new_socket", {"at_least": start}),
             replace(request, port=start), facts),
        ]
    elif rule in ("address_not_local", "address_tentative"):
        family = "ipv4" if ipaddress.ip_address(q.addr).version == 4 or \
            ipaddress.ip_address(q.addr).ipv4_mapped else "ipv6"
        candidates += [
            (Fix("option", "new_socket", {"option": "IP_FREEBIND" if family == "ipv4"
                                          else "IPV6_FREEBIND"}),
             replace(request, freebind=True), facts),
            (Fix("sysctl", "namespace", {"name": f"net.{family}.ip_nonlocal_bind", "value": 1}),
             request, replace(facts, nonlocal_bind={**facts.nonlocal_bind, family: True})),
        ]
        if rule == "address_tentative":
            candidates.append((Fix("wait_dad", "namespace", {"address": q.addr}), request,
                               _dad_done(facts, q.addr)))
        else:
            candidates.append((Fix("add_address", "namespace", {"address": q.addr}), request,
                               _with_address(facts, q.addr)))
    elif rule == "mapped_on_v6only":
        candidates.append((Fix("option", "new_socket", {"option": "IPV6_V6ONLY", "value": 0}),
                           replace(request, v6only=False), facts))
    elif rule == "link_local_needs_device":
        for a in facts.addresses:
            if a.family == "ipv6" and ipaddress.ip_address(a.address) == ipaddress.ip_address(q.addr):
                candidates.append((Fix("device", "new_socket",
                                       {"device": facts.device_name(a.device)}),
                                   replace(request, bound_dev_if=a.device), facts))
    elif rule == "multicast_stream":
        candidates.append((Fix("protocol", "new_socket", {"protocol": "udp"}),
                           replace(request, protocol="udp"), facts))
    kept = []
    for fix, changed, changed_facts in candidates:
        after = bindcheck.admission(changed.question(), changed_facts)
        if after is None or after.rule != rule:
            kept.append(Fix(fix.kind, fix.target, {**fix.params, "for": rule}))
    return kept


def _lift(request: Request, refusal: Refusal) -> Request | None:
    """The request with the cause of ``refusal`` taken away, to see what the
    kernel checks next; None when nothing after it can be known."""
    if refusal.rule == "privileged_port":
        return replace(request, cap_net_bind_service=True)
    if refusal.errno == "EADDRNOTAVAIL":
        return replace(request, freebind=True)
    return None


def _dad_done(facts: NamespaceFacts, addr: str) -> NamespaceFacts:
    from .rtnetlink import IFA_F_DADFAILED, IFA_F_TENTATIVE

    return replace(facts, addresses=tuple(
        replace(a, flags=a.flags & ~(IFA_F_TENTATIVE | IFA_F_DADFAILED))
        if a.address == addr else a for a in facts.addresses))


def _with_address(facts: NamespaceFacts, addr: str) -> NamespaceFacts:
    import ipaddress as ipa

    from .rtnetlink import RT_TABLE_LOCAL, Address, Route

    ip = ipa.ip_address(addr)
    v4 = ip.ipv4_mapped if ip.version == 6 and ip.ipv4_mapped else (ip if ip.version == 4 else None)
    if v4 is not None:
        return replace(facts, local_routes=facts.local_routes + (
            Route(RT_TABLE_LOCAL, "local", ipa.IPv4Network(f"{v4}/32"), 1),))
    return replace(facts, addresses=facts.addresses + (Address("ipv6", addr, 128, 1, 0, 0),))


# ---- fixes at the port: candidate changes, kept only when the rules accept them ---------


def _fixes(new: Sock, existing: list[Sock],
           blockers: list[tuple[Blocker, Socket]]) -> tuple[list[Fix], list[Note]]:
    if not blockers:
        return [], []
    fixes: list[Fix] = []
    notes: list[Note] = []
    works = lambda candidate: not bindrules.refused(candidate, existing)  # noqa: E731
    tag = {"for": "conflict"}

    for changes, option in _option_changes(new):
        if works(replace(new, **changes)):
            fixes.append(Fix("option", "new_socket", {"option": option, **tag}))
    rules = {b.rule for b, _ in blockers}
    if Rule.TIME_WAIT in rules and not works(replace(new, reuseaddr=True)):
        notes.append(Note("reuseaddr_alone_vs_time_wait"))
    other_uids = sorted({b.sock.uid for b, _ in blockers if b.rule == Rule.REUSEPORT_OTHER_UID})
    if len(other_uids) == 1 and works(replace(new, uid=other_uids[0])):
        fixes.append(Fix("uid", "process", {"uid": other_uids[0], **tag}))
    if new.addr == WILDCARDS[new.family]:
        specific = replace(new, addr=SPECIFIC_PROBES[new.family])
        if works(specific):
            used = sorted({b.sock.addr for b, _ in blockers})
            fixes.append(Fix("specific_address", "new_socket", {"instead_of": used, **tag}))
    if all(b.sock.bound_dev_if for b, _ in blockers) and not new.bound_dev_if:
        fixes.append(Fix("other_device", "new_socket", {"used": sorted(
            {b.sock.bound_dev_if for b, _ in blockers}), **tag}))
    waits, wait_notes = _wait_fixes(blockers)
    fixes.extend(waits)
    notes.extend(wait_notes)
    fixes.extend(_holder_fixes(blockers))
    return fixes, notes


def _option_changes(new: Sock) -> list[tuple[dict[str, object], str]]:
    out: list[tuple[dict[str, object], str]] = []
    if not new.reuseaddr:
        out.append(({"reuseaddr": True}, "SO_REUSEADDR"))
    if not new.reuseport:
        out.append(({"reuseport": True}, "SO_REUSEPORT"))
    if new.family == "ipv6" and not new.v6only:
        out.append(({"v6only": True}, "IPV6_V6ONLY"))
    return out


def _wait_fixes(blockers: list[tuple[Blocker, Socket]]) -> tuple[list[Fix], list[Note]]:
    """When every blocker is one no process holds (TIME_WAIT, an orphan
    finishing its close), waiting frees the port: for as long as the
    longest timer. SOCK_DESTROY (``ss -K``) frees it at once, on a kernel
    that can destroy those sockets (``sockdestroy`` asks it; when it cannot
    be asked, the fix is offered with its condition)."""
    held = {holding(s) for _, s in blockers}
    if not held <= {"time_wait", "orphan"}:
        return [], []
    wait = max((s.diag.timer_ms for _, s in blockers), default=0)
    states = sorted({s.diag.state for _, s in blockers})
    out = [Fix("wait", "kernel", {"seconds": round(wait / 1000), "states": states,
                                  "for": "conflict"})]
    able = sockdestroy.destroyable()
    if able is not None and not all(able.frees(h) for h in held):
        kept = sorted({s.diag.state for _, s in blockers if not able.frees(holding(s))})
        return out, [Note("destroy_keeps", {"states": kept})]
    out += [Fix("destroy_socket", "kernel", {
        "local": format_addr(s.diag.family, s.diag.local_addr, s.diag.local_port),
        "remote": format_addr(s.diag.family, s.diag.remote_addr, s.diag.remote_port),
        "state": s.diag.state, "for": "conflict"}) for _, s in blockers[:3]]
    return out, []


def _holder_fixes(blockers: list[tuple[Blocker, Socket]]) -> list[Fix]:
    """Who to stop, and the connections kept by processes that do not listen
    on the port (typically a forked child of an earlier instance)."""
    listeners = {o.pid for b, s in blockers if s.diag.state == "LISTEN" for o in s.owners}
    out: list[Fix] = []
    for b, s in blockers:
        if not s.owners or s.gone:
            continue
        d = s.diag
        params: dict[str, object] = {
            "pids": [o.pid for o in s.owners], "owners": [o.label() for o in s.owners],
            "state": d.state, "local": format_addr(d.family, d.local_addr, d.local_port),
            "inode": d.inode, "for": "conflict"}
        if d.state == "ESTABLISHED" and not (listeners & {o.pid for o in s.owners}):
            params["remote"] = format_addr(d.family, d.remote_addr, d.remote_port)
            out.append(Fix("close_connection", "holder", params))
        else:
            out.append(Fix("stop_holder", "holder", params))
    unique: dict[tuple, Fix] = {}
    for f in out:
        unique.setdefault((f.kind, tuple(f.params["pids"]), f.params["state"],  # type: ignore[arg-type]
                           f.params["local"], f.params.get("remote")), f)
    return list(unique.values())


# ---- notes: what the rules cannot decide, who holds what ---------------------------------


def _fast_path_notes(new: Sock, pairs: list[tuple[Sock, Socket]]) -> list[Note]:
    """The kernel's SO_REUSEPORT fast path may accept what the full check
    refuses (see tracer.bindrules): say so when a live socket could have
    set the port's cache."""
    by_key = {r.key: s for r, s in pairs}
    candidates = bindrules.fast_path_candidates(new, [r for r, _ in pairs])
    if not candidates:
        return []
    return [Note("reuseport_fast_path", {
        "uid": new.uid,
        "sockets": [{"local": format_addr(c.family, c.addr, c.port),
                     "inode": by_key[c.key].diag.inode} for c in candidates]})]


# Where the other end of a TIME_WAIT or orphaned socket can be when it is on
# this host: it has not closed (CLOSE_WAIT), or is closing too. TIME_WAIT is
# left out: a busy host has 100,000s of them, and both ends in TIME_WAIT
# (a simultaneous close) say nothing more about who holds the port.
PEER_STATES = ("ESTABLISHED", "CLOSE_WAIT", "LAST_ACK", "FIN_WAIT1", "FIN_WAIT2", "CLOSING")


def _holder_notes(blockers: list[tuple[Blocker, Socket]], inv: Inventory) -> list[Note]:
    """Blockers no process holds, or none that portscope can read."""
    out = []
    held = [(holding(s), s) for _, s in blockers]
    peers = _local_peers([s for how, s in held if how in ("orphan", "time_wait")])
    for how, s in held:
        if how == "owners" or (how == "time_wait" and not peers):
            continue
        d = s.diag
        peer = peers.get((d.netns, d.remote_addr, d.remote_port, d.local_addr, d.local_port))
        if how == "time_wait" and peer is None:
            continue  # TIME_WAIT alone needs no note: the reason says it
        where = {"state": d.state, "local": format_addr(d.family, d.local_addr, d.local_port),
                 "remote": format_addr(d.family, d.remote_addr, d.remote_port),
                 "inode": d.inode, "timer_ms": d.timer_ms, "timer": d.timer}
        if how == "gone":
            out.append(Note("closed_since", where | {"owners": [o.label() for o in s.owners]}))
        elif how == "hidden":
            out.append(Note("hidden_owner", where))
        elif how == "unaccepted":
            out.append(Note("unaccepted", where))
        else:
            if peer is not None:
                where["peer"] = peer
            out.append(Note("orphan" if how == "orphan" else "closed_on_this_side", where))
    return _unique_notes(out)


def _local_peers(closing: list[Socket]) -> dict[tuple[int, str, int, str, int], dict[str, object]]:
    """The other ends of these connections that are in their namespace too (a
    client on the same host), keyed by (netns, local address and port, remote
    address and port): state (CLOSE_WAIT: it has not closed) and who holds
    it. One read per namespace and port of the sockets in the states a peer
    can be in, whatever the number of blockers (a busy port has 10,000s of
    TIME_WAIT sockets)."""
    from .inventory import take

    found: dict[tuple[int, str, int, str, int], dict[str, object]] = {}
    for netns, port in sorted({(s.diag.netns, s.diag.local_port) for s in closing if s.diag.remote_port}):
        try:
            # A peer's remote port is the blocker's port: sock_diag keeps only
            # those, and peers need owners, not flags (no table walk).
            others = take(protocols=("tcp",), states=PEER_STATES, netns=str(netns),
                          remote_port=port, flags=False).sockets
        except Exception:  # noqa: BLE001 - the peer is extra information, never a failure
            continue
        for o in others:
            od = o.diag
            found[(netns, od.local_addr, od.local_port, od.remote_addr, od.remote_port)] = {
                "state": od.state, "local": format_addr(od.family, od.local_addr, od.local_port),
                "pids": [x.pid for x in o.owners], "owners": [x.label() for x in o.owners]}
    return found


def _unique_notes(notes: list[Note]) -> list[Note]:
    seen: dict[tuple, Note] = {}
    for n in notes:
        seen.setdefault((n.kind, n.params.get("state"), n.params.get("local")), n)
    return list(seen.values())


def _inventory_notes(inv: Inventory, blockers: list[tuple[Blocker, Socket]]) -> list[Note]:
    """Gaps of the inventory that can change this answer: sockets on the port
    with no readable flags, and holders of a blocker that could not be read
    (a process that vanished meanwhile is not worth a word)."""
    notes = []
    if inv.flags_unknown:
        notes.append(Note("flags_unknown", {"sockets": inv.flags_unknown}))
    unreadable = sorted({(o.pid, o.comm, o.problem or "unreadable") for _, s in blockers
                         for o in s.owners if not o.readable and o.problem != "gone"})
    for pid, comm, problem in unreadable:
        notes.append(Note("unreadable_owner", {"pid": pid, "comm": comm, "problem": problem}))
    return notes


# ---- port 0: is any port of the range left? -------------------------------------------------


def socket_port_range(netns_range: PortRange, own: tuple[int, int] | None) -> tuple[int, int]:
    """inet_sk_get_local_port_range(): IP_LOCAL_PORT_RANGE narrows the
    namespace's range, each bound taken only when it lies inside it."""
    low, high = netns_range.low, netns_range.high
    if own:
        sk_lo, sk_hi = own
        if netns_range.low <= sk_lo <= netns_range.high:
            low = sk_lo
        if netns_range.low <= sk_hi <= netns_range.high:
            high = sk_hi
    return low, high


def _explain_ephemeral(request: Request, new: Sock, inv: Inventory,
                       facts: NamespaceFacts) -> Explanation:
    """bind(port 0) picks a port of the range that no socket overlaps at all
    (relax=false, reuseport_ok=false in inet_csk_find_open_port; UDP applies
    its usual rule). Only when none is left, and net.ipv4.ip_autobind_reuse
    is set, does TCP look again sharing ports by SO_REUSEADDR. With
    IP_BIND_ADDRESS_NO_PORT the bind takes no port at all."""
    rng = facts.port_range
    low, high = socket_port_range(rng, request.port_range)
    eph: dict[str, object] = {"range": [low, high], "namespace_range": [rng.low, rng.high],
                              "reserved": len([p for p in rng.reserved if low <= p <= high]),
                              "free": 0, "in_use": 0, "autobind_reuse": facts.autobind_reuse}
    if request.bind_address_no_port:
        eph["free"] = None
        return Explanation(request, new, [], [], [],
                           [Note("no_port_at_bind", {})], inv, eph)
    taken: dict[int, list[Sock]] = {}
    for s in inv.sockets:
        r = as_rule_sock(s)
        if r.protocol == new.protocol:
            taken.setdefault(r.port, []).append(r)
    eph["in_use"] = len([p for p in taken if low <= p <= high])
    free = _free_ports(new, low, high, rng.reserved, taken, True)
    fixes: list[Fix] = []
    notes: list[Note] = []
    if not free and new.protocol == "tcp" and facts.autobind_reuse:
        free = _free_ports(new, low, high, rng.reserved, taken, "autobind_reuse")
        if free:
            notes.append(Note("autobind_reuse_shares", {"ports": free}))
    eph["free"] = free
    reasons = []
    if not free:
        reasons.append(Reason("EADDRINUSE", "ports_exhausted",
                              {"range": [low, high], "usable": high - low + 1 - eph["reserved"]}))
        fixes += _ephemeral_fixes(request, new, facts, taken)
    return Explanation(request, new, reasons, [], fixes, notes, inv, eph)


def _ephemeral_fixes(request: Request, new: Sock, facts: NamespaceFacts,
                     taken: dict[int, list[Sock]]) -> list[Fix]:
    """For an exhausted range: each change kept only if the count of free
    ports, redone with it, is no longer zero."""
    rng = facts.port_range
    tag = {"for": "ports_exhausted"}

    def free_with(request_: Request, rng_: PortRange, mode: bool | str = True) -> int:
        low, high = socket_port_range(rng_, request_.port_range)
        return _free_ports(new, low, high, rng_.reserved, taken, mode)

    out = []
    wider = PortRange(rng.low, min(rng.high + 2, 65535), rng.reserved)
    if free_with(request, wider):
        out.append(Fix("sysctl", "namespace", {"name": "net.ipv4.ip_local_port_range",
                                               "value": "wider", **tag}))
    if request.port_range:
        low, high = socket_port_range(rng, request.port_range)
        own = (low, min(high + 2, rng.high))
        if free_with(replace(request, port_range=own), rng):
            out.append(Fix("socket_port_range", "new_socket", {"range": list(own), **tag}))
    if new.protocol == "tcp" and not facts.autobind_reuse and new.reuseaddr and \
            free_with(request, rng, "autobind_reuse"):
        out.append(Fix("sysctl", "namespace", {"name": "net.ipv4.ip_autobind_reuse",
                                               "value": 1, **tag}))
    if new.protocol == "tcp" and not request.listen:
        out.append(Fix("option", "new_socket", {"option": "IP_BIND_ADDRESS_NO_PORT", **tag}))
    return out


def _free_ports(new: Sock, low: int, high: int, reserved: frozenset[int],
                taken: dict[int, list[Sock]], mode: bool | str) -> int:
    free = 0
    for port in range(low, high + 1):
        if port in reserved:
            continue
        if not bindrules.refused(replace(new, port=port), taken.get(port, []), ephemeral=mode):
            free += 1
    return free
