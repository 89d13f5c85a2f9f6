"""Why a connect() failed with EADDRNOTAVAIL or EADDRINUSE, with numbers.

A TCP connect() needs a 4-tuple (source address and port, destination
address and port) that no other socket of the namespace has:

* an unbound socket gets a port from ip_local_port_range (minus the
  reserved ones and those that listeners and bound sockets hold), any port
  not already used towards that destination (``__inet_hash_connect``):
  when none is left, EADDRNOTAVAIL. So the figures that explain it are the
  ports in use towards the destination against that capacity, and who
  holds them (TIME_WAIT sockets by the process that closed them, the rest
  by their owners);
* a socket bound to a port beforehand can only use that port: when the
  4-tuple already exists, the kernel refuses (EADDRNOTAVAIL on 6.x,
  EADDRINUSE on older kernels), and the socket that has it is named.
"""

from __future__ import annotations

from collections import Counter

from .explain import Fix, Reason
from .inventory import Socket, select_namespaces, take
from .netns import port_range
from .records import BlockerSummary, CallEvent, EventExplanation, format_addr

TOP = 5


def explain_connect(ev: CallEvent, iterators: object) -> EventExplanation:
    inv = take(protocols=("tcp",), netns=str(ev.netns), iterators=iterators)  # type: ignore[arg-type]
    dest = (ev.addr, ev.port)
    towards = [s for s in inv.sockets if (s.diag.remote_addr, s.diag.remote_port) == dest
               and s.diag.state != "LISTEN"]
    if ev.bound_port:
        return _four_tuple(ev, towards)
    return _exhausted(ev, inv.sockets, towards)


def _four_tuple(ev: CallEvent, towards: list[Socket]) -> EventExplanation:
    holder = [s for s in towards if s.diag.local_port == ev.bound_port
              and (ev.bound_addr in ("0.0.0.0", "::") or s.diag.local_addr == ev.bound_addr)]
    local = format_addr(ev.family, ev.bound_addr, ev.bound_port)
    remote = format_addr(ev.addr_family if ev.addr_family != "unspec" else ev.family, ev.addr,
                         ev.port)
    reason = Reason(ev.errno_name or "EADDRNOTAVAIL", "four_tuple_taken",
                    {"local": local, "remote": remote, "holders": len(holder)})
    fixes = [Fix("option", "new_socket", {"option": "IP_BIND_ADDRESS_NO_PORT",
                                          "for": "four_tuple_taken"}),
             Fix("port", "new_socket", {"value": 0, "for": "four_tuple_taken"})]
    blockers = tuple(_summary(s, "four_tuple") for s in holder)
    return EventExplanation(blockers, reasons=(reason,), fixes=tuple(fixes))


def _exhausted(ev: CallEvent, sockets: list[Socket], towards: list[Socket]) -> EventExplanation:
    refs, _ = select_namespaces(str(ev.netns))
    rng = port_range(refs[0]) if refs else None
    if rng is None:
        return EventExplanation(error="the socket's network namespace is gone")
    eph = [s for s in towards if rng.low <= s.diag.local_port <= rng.high]
    held = {s.diag.local_port for s in sockets if not s.diag.remote_port
            and rng.low <= s.diag.local_port <= rng.high}
    capacity = rng.usable - len(held - rng.reserved)
    by_holder: Counter[str] = Counter()
    states: Counter[str] = Counter()
    for s in eph:
        states[s.diag.state] += 1
        by_holder[" ".join(o.label() for o in s.owners) or s.diag.state] += 1
    dest = format_addr(ev.addr_family if ev.addr_family != "unspec" else ev.family, ev.addr, ev.port)
    facts = {"destination": dest, "in_use": len(eph), "capacity": capacity,
             "range": [rng.low, rng.high], "reserved": len(rng.reserved),
             "held_by_listeners_and_bound": len(held), "states": dict(states),
             "top_holders": [{"holder": h, "count": n} for h, n in by_holder.most_common(TOP)]}
    rule = "ephemeral_exhausted" if len(eph) >= capacity else "ephemeral_unexplained"
    fixes = [Fix("sysctl", "namespace", {"name": "net.ipv4.ip_local_port_range", "value": "wider",
                                         "for": rule})]
    if states.get("TIME_WAIT"):
        fixes.append(Fix("sysctl", "namespace", {"name": "net.ipv4.tcp_tw_reuse", "value": 1,
                                                 "for": rule}))
    fixes.append(Fix("source_address", "new_socket", {"destination": dest, "for": rule}))
    reason = Reason(ev.errno_name or "EADDRNOTAVAIL", rule, facts)
    return EventExplanation(reasons=(reason,), fixes=tuple(fixes))


def _summary(s: Socket, rule: str) -> BlockerSummary:
    from .explain import holding

    d = s.diag
    return BlockerSummary(tuple(o.pid for o in s.owners), s.owners[0].comm if s.owners else None,
                          d.state, format_addr(d.family, d.local_addr, d.local_port), rule,
                          held=holding(s), remote=format_addr(d.family, d.remote_addr,
                                                              d.remote_port),
                          owners=tuple(o.kept() for o in s.owners))
