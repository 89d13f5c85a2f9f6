"""The kernel is the oracle: ``portscope why`` (tracer.explain) against real binds.

Every case runs in a fresh private network namespace:

1. the existing sockets are created for real by actors (forked children,
   possibly as another uid): bound only, listening, TIME_WAIT (made by a
   server that closes first), connections left after their listener closed,
   bound to a device (``lo`` or a dummy device ``d0`` made in the namespace);
2. the explainer is asked about the new bind (or listen);
3. an actor performs that bind (and listen) for real, with the same options
   and as the same uid;
4. the verdict must be the kernel's: free <=> errno 0, conflict <=> EADDRINUSE;
5. the blockers must be exactly the sockets that cause the refusal:

   * every blocker is one of the scenario's sockets, and the rules named
     (``b.rule.value``) are the ones the case states;
   * removing every blocker makes the same bind succeed for real (so no
     socket the explainer left out blocks it);
   * when there are several blockers, each one alone (the scenario rebuilt in
     another namespace without the other blockers) still makes the kernel
     refuse, and the explainer then names just that one (so no blocker is a
     bystander);
   * a "free" verdict has no blockers and no fixes.

   Removing a blocker means closing it in the actor that holds it, except:

   * TIME_WAIT sockets, which no process holds. First the other blockers are
     closed and the bind must still fail (the TIME_WAIT socket alone blocks
     it); then the TIME_WAIT socket is destroyed with SOCK_DESTROY (``ss -K``
     on its exact port pair; its disappearance is checked in the inventory),
     and the bind must succeed. A kernel that keeps the socket after
     SOCK_DESTROY (5.10 keeps TIME_WAIT sockets and orphans) must see the
     explainer not offer it and say so, and the bind must still fail.
     The blocker is also checked to be TIME_WAIT in the explainer's own
     inventory, with no inode and no owner. The TIME_WAIT rows where the
     options do match (both SO_REUSEADDR, both SO_REUSEPORT, another uid)
     prove the other half of the rule: there the kernel accepts the bind
     with the TIME_WAIT socket still present.
   * connections left after their listener closed: the peer closes first,
     then the holder, so that the connection really goes away (closing only
     the holder would leave it in FIN_WAIT on the port).

6. every fix that is a change to the new socket (SO_REUSEADDR, SO_REUSEPORT,
   IPV6_V6ONLY, another uid, a specific address, another device) or to the
   namespace (a wider ephemeral range) is applied for real and the kernel
   must accept the bind; "stop X" and "wait for TIME_WAIT" fixes are what
   step 5 proves. A fix text the test does not know fails the case, so that a
   new kind of fix cannot go unproven. Where the explainer notes that
   SO_REUSEADDR on the new socket alone does not beat a TIME_WAIT socket, the
   kernel must refuse that bind too.

   Each fix is proven in a namespace of its own, with the case rebuilt and
   the fix applied to the new socket: a bind that succeeds leaves per-port
   state in the kernel (the SO_REUSEPORT fast path, see tracer.bindrules)
   that outlives its socket and would change the answers of the proofs that
   follow. Only refused binds, which change nothing, run in the case's own
   namespace. ``test_reuseport_cache_outlives_its_socket`` and
   ``test_reuseport_fast_path_depends_on_bind_order`` pin that kernel
   behaviour, the one place where the visible sockets do not decide.

The device cases make ``d0`` as a dummy device, or, on a kernel built
without CONFIG_DUMMY (this one), as one end of a veth pair; either way it is
up and has the address 10.9.0.1/24.

Port 0 (the ephemeral range, set to two ports in the namespace) has no
per-socket blockers: the explainer counts the free ports. There the proof is
that removing one occupant, or widening the range as the fix says, lets the
kernel's own port-0 bind succeed.

Each case states its expected verdict and rules, so that a case that stops
exercising its rule fails as "scenario broken" instead of passing quietly;
what decides is always the kernel. ``coverage_table.py`` counts the cases
per rule.
"""

from __future__ import annotations

import errno
import json
import re
import socket
import subprocess
import time
from dataclasses import dataclass, replace
from itertools import product
from typing import Callable, Iterator

import pytest
from harness import CAP_NET_BIND_SERVICE, Actor, ActorError, Netns, Truth

from tracer.bindcheck import IP_LOCAL_PORT_RANGE
from tracer.errors import UsageError
from tracer.explain import SPECIFIC_PROBES, Explanation, Request, explain, holding
from tracer.inventory import Socket, take
from tracer.records import Fix
from tracer.sockflags import SharedIterators

PORT = 7000
EPHEMERAL_RANGE = (40000, 40001)

V4, V4B, W4 = "127.0.0.1", "127.0.0.2", "0.0.0.0"
V6, W6, MAPPED = "::1", "::", "::ffff:127.0.0.1"
DUMMY = "d0"
DUMMY_ADDR = "10.9.0.1"

# Existing sockets that are one end of a connection the scenario makes.
CONNECTION_KINDS = ("timewait", "established", "fin_wait1", "fin_wait2")
# The kernel's TCP states a closing connection passes through on the port.
TRANSIENT = {"FIN_WAIT1", "FIN_WAIT2", "CLOSING", "LAST_ACK", "CLOSE_WAIT", "SYN_RECV"}


# ---- the cases -------------------------------------------------------------


@dataclass(frozen=True)
class Old:
    """An existing socket. kind: bound | listen | timewait | established
    (a connection accepted by a listener that has since closed)."""

    addr: str
    kind: str = "bound"
    reuseaddr: bool = False
    reuseport: bool = False
    v6only: bool = False
    dev: str | None = None
    uid: int = 0
    port: int = PORT


@dataclass(frozen=True)
class New:
    """The socket being bound; listen: the question is its listen(), after
    a bind that must succeed. ``caps``: the capabilities its process keeps
    (None: what its uid gets; root all, others none)."""

    addr: str
    reuseaddr: bool = False
    reuseport: bool = False
    v6only: bool = False
    dev: str | None = None
    uid: int = 0
    listen: bool = False
    port: int = PORT
    freebind: bool = False
    transparent: bool = False
    no_port: bool = False  # IP_BIND_ADDRESS_NO_PORT
    port_range: tuple[int, int] | None = None  # IP_LOCAL_PORT_RANGE
    caps: frozenset[int] | None = None


@dataclass(frozen=True)
class Case:
    group: str
    name: str
    protocol: str
    old: tuple[Old, ...]
    new: New
    expect: str  # free | conflict | an errno name the kernel refuses with before the port
    rules: frozenset[str]  # a conflict: its blockers' b.rule.value ("ephemeral": port 0);
    # a refusal: the explanation's reasons' rules, in order
    port_range: tuple[int, int] | None = None
    setup: tuple[tuple[str, ...], ...] = ()  # ip commands run in the namespace first
    sysctls: tuple[tuple[str, str], ...] = ()  # written in the namespace first

    @property
    def errno(self) -> int:
        known = {"free": 0, "conflict": errno.EADDRINUSE}
        return known[self.expect] if self.expect in known else getattr(errno, self.expect)

    @property
    def id(self) -> str:
        verdict = self.expect + "".join("." + r for r in (
            sorted(self.rules) if self.expect in ("free", "conflict") else self.reason_rules))
        return f"{self.group}/{self.name}=>{verdict}"

    @property
    def reason_rules(self) -> list[str]:
        return list(self.rules_in_order)

    rules_in_order: tuple[str, ...] = ()


def case(group: str, name: str, old: Old | list[Old], new: New, expect: str,
         rules: str = "", protocol: str = "tcp",
         port_range: tuple[int, int] | None = None,
         setup: tuple[tuple[str, ...], ...] = (),
         sysctls: tuple[tuple[str, str], ...] = ()) -> Case:
    olds = tuple(old) if isinstance(old, list) else (old,)
    assert (expect == "free") == (not rules), f"{group}/{name}: a refusal names its rules"
    return Case(group, name, protocol, olds, new, expect, frozenset(rules.split()), port_range,
                setup, sysctls, tuple(rules.split()))


def _reuseaddr_table() -> list[Case]:
    """The SO_REUSEADDR table of the BSD/Linux comparison: addresses
    (same specific, different specific, wildcard then specific, specific
    then wildcard, both wildcard) x SO_REUSEADDR on the old socket x on the
    new one x the old socket listening or only bound."""
    pairs = {"same": (V4, V4), "other": (V4, V4B), "wild-spec": (W4, V4),
             "spec-wild": (V4, W4), "wild-wild": (W4, W4)}
    out = []
    for (pname, (a_old, a_new)), ra_old, ra_new, listening in product(
            pairs.items(), (False, True), (False, True), (False, True)):
        overlap = a_old == a_new or W4 in (a_old, a_new)
        if not overlap:
            expect, rules = "free", ""
        elif listening:  # Linux: SO_REUSEADDR never shares with a listener
            expect, rules = "conflict", "listener"
        elif ra_old and ra_new:
            expect, rules = "free", ""
        elif ra_old or ra_new:
            expect, rules = "conflict", "reuseaddr_one_side"
        else:
            expect, rules = "conflict", "no_reuse"
        name = (f"{pname}.old-{'ra' if ra_old else 'no'}.new-{'ra' if ra_new else 'no'}"
                f".{'listening' if listening else 'bound'}")
        out.append(case("reuseaddr", name,
                        Old(a_old, "listen" if listening else "bound", reuseaddr=ra_old),
                        New(a_new, reuseaddr=ra_new), expect, rules))
    return out


RA = {"reuseaddr": True}
RP = {"reuseport": True}


def O(addr: str, kind: str = "bound", **kw: object) -> Old:  # noqa: E743
    return Old(addr, kind, **kw)  # type: ignore[arg-type]


def N(addr: str, **kw: object) -> New:
    return New(addr, **kw)  # type: ignore[arg-type]


TIME_WAIT_CASES = [
    case("timewait", "old-no.new-no", O(V4, "timewait"), N(V4), "conflict", "time_wait"),
    case("timewait", "old-no.new-ra.linux-not-bsd", O(V4, "timewait"), N(V4, **RA),
         "conflict", "time_wait"),
    case("timewait", "old-ra.new-no", O(V4, "timewait", **RA), N(V4), "conflict", "time_wait"),
    case("timewait", "old-ra.new-ra", O(V4, "timewait", **RA), N(V4, **RA), "free"),
    case("timewait", "old-rp-1001.new-rp-1001", O(V4, "timewait", reuseport=True, uid=1001),
         N(V4, reuseport=True, uid=1001), "free"),
    case("timewait", "old-rp-1001.new-rp-1002.no-uid-match",
         O(V4, "timewait", reuseport=True, uid=1001), N(V4, reuseport=True, uid=1002), "free"),
    case("timewait", "old-rp.new-no", O(V4, "timewait", **RP), N(V4), "conflict", "time_wait"),
    case("timewait", "old-no.new-rp", O(V4, "timewait"), N(V4, **RP), "conflict", "time_wait"),
    case("timewait", "old-ra.new-rp", O(V4, "timewait", **RA), N(V4, **RP),
         "conflict", "time_wait"),
    case("timewait", "old-rp.new-ra", O(V4, "timewait", **RP), N(V4, **RA),
         "conflict", "time_wait"),
    case("timewait", "old-ra+rp-1001.new-ra-1002", O(V4, "timewait", reuseaddr=True,
         reuseport=True, uid=1001), N(V4, reuseaddr=True, uid=1002), "free"),
    case("timewait", "spec.new-wild", O(V4, "timewait"), N(W4), "conflict", "time_wait"),
    case("timewait", "spec-ra.new-wild-ra", O(V4, "timewait", **RA), N(W4, **RA), "free"),
    case("timewait", "other-address", O(V4, "timewait"), N(V4B), "free"),
    case("timewait", "v6.new-wild6", O(V6, "timewait"), N(W6), "conflict", "time_wait"),
    case("timewait", "v6-ra.new-wild6-ra", O(V6, "timewait", **RA), N(W6, **RA), "free"),
    case("timewait", "v4.new-wild6-dualstack", O(V4, "timewait"), N(W6), "conflict", "time_wait"),
    case("timewait", "v4.new-wild6-v6only", O(V4, "timewait"), N(W6, v6only=True), "free"),
    case("timewait", "plus-bound-other-address.new-wild",
         [O(V4, "timewait"), O(V4B)], N(W4), "conflict", "time_wait no_reuse"),
]

REUSEPORT_CASES = [
    case("reuseport", "1001-1001.listening", O(V4, "listen", reuseport=True, uid=1001),
         N(V4, reuseport=True, uid=1001), "free"),
    case("reuseport", "1001-1001.bound", O(V4, reuseport=True, uid=1001),
         N(V4, reuseport=True, uid=1001), "free"),
    case("reuseport", "1001-1002.listening", O(V4, "listen", reuseport=True, uid=1001),
         N(V4, reuseport=True, uid=1002), "conflict", "reuseport_other_uid"),
    case("reuseport", "1001-1002.bound", O(V4, reuseport=True, uid=1001),
         N(V4, reuseport=True, uid=1002), "conflict", "reuseport_other_uid"),
    case("reuseport", "root-1001.listening", O(V4, "listen", reuseport=True),
         N(V4, reuseport=True, uid=1001), "conflict", "reuseport_other_uid"),
    case("reuseport", "old-only.listening", O(V4, "listen", **RP), N(V4),
         "conflict", "listener"),
    case("reuseport", "old-only.bound", O(V4, **RP), N(V4), "conflict", "reuseport_one_side"),
    case("reuseport", "new-only.bound", O(V4), N(V4, **RP), "conflict", "reuseport_one_side"),
    case("reuseport", "wild-listening.new-spec", O(W4, "listen", **RP), N(V4, **RP), "free"),
    case("reuseport", "group-1001.new-1002",
         [O(W4, "listen", reuseport=True, uid=1001), O(W4, "listen", reuseport=True, uid=1001)],
         N(W4, reuseport=True, uid=1002), "conflict", "reuseport_other_uid"),
    case("reuseport", "ra+rp-1001.bound.new-ra+rp-1002",
         O(V4, reuseaddr=True, reuseport=True, uid=1001),
         N(V4, reuseaddr=True, reuseport=True, uid=1002), "free"),
    case("reuseport", "ra+rp-1001.listening.new-ra+rp-1002",
         O(V4, "listen", reuseaddr=True, reuseport=True, uid=1001),
         N(V4, reuseaddr=True, reuseport=True, uid=1002), "conflict", "reuseport_other_uid"),
    case("reuseport", "v6-1001-1001.dualstack", O(W6, "listen", reuseport=True, uid=1001),
         N(W4, reuseport=True, uid=1001), "free"),
]

DUAL_STACK_CASES = [
    case("ipv6", "wild4.new-wild6", O(W4), N(W6), "conflict", "no_reuse"),
    case("ipv6", "wild4.new-wild6-v6only", O(W4), N(W6, v6only=True), "free"),
    case("ipv6", "wild6.new-wild4", O(W6), N(W4), "conflict", "no_reuse"),
    case("ipv6", "wild6-v6only.new-wild4", O(W6, v6only=True), N(W4), "free"),
    case("ipv6", "wild6.new-wild6", O(W6), N(W6), "conflict", "no_reuse"),
    case("ipv6", "wild6-v6only.new-wild6", O(W6, v6only=True), N(W6), "conflict", "no_reuse"),
    case("ipv6", "wild6-v6only.new-wild6-v6only", O(W6, v6only=True), N(W6, v6only=True),
         "conflict", "no_reuse"),
    case("ipv6", "loop6.new-wild6-v6only", O(V6), N(W6, v6only=True), "conflict", "no_reuse"),
    case("ipv6", "loop6.new-wild4", O(V6), N(W4), "free"),
    case("ipv6", "loop6.new-loop6", O(V6), N(V6), "conflict", "no_reuse"),
    case("ipv6", "loop6.new-loop4", O(V6), N(V4), "free"),
    case("ipv6", "loop4.new-mapped", O(V4), N(MAPPED), "conflict", "no_reuse"),
    case("ipv6", "mapped.new-loop4", O(MAPPED), N(V4), "conflict", "no_reuse"),
    case("ipv6", "mapped.new-wild4", O(MAPPED), N(W4), "conflict", "no_reuse"),
    case("ipv6", "wild4.new-mapped", O(W4), N(MAPPED), "conflict", "no_reuse"),
    case("ipv6", "wild6-v6only.new-mapped", O(W6, v6only=True), N(MAPPED), "free"),
    case("ipv6", "mapped.new-wild6-v6only", O(MAPPED), N(W6, v6only=True), "free"),
    case("ipv6", "mapped.new-wild6", O(MAPPED), N(W6), "conflict", "no_reuse"),
    case("ipv6", "wild6.new-mapped", O(W6), N(MAPPED), "conflict", "no_reuse"),
    case("ipv6", "wild4-ra.listening.new-wild6-ra", O(W4, "listen", **RA), N(W6, **RA),
         "conflict", "listener"),
    case("ipv6", "wild4-ra.bound.new-wild6-ra", O(W4, **RA), N(W6, **RA), "free"),
    case("ipv6", "wild6.listening.new-loop4", O(W6, "listen"), N(V4), "conflict", "listener"),
    case("ipv6", "loop4.listening.new-wild6", O(V4, "listen"), N(W6), "conflict", "listener"),
    case("ipv6", "loop6.listening.new-loop4", O(V6, "listen"), N(V4), "free"),
    case("ipv6", "wild6-v6only.listening.new-wild4", O(W6, "listen", v6only=True), N(W4), "free"),
]

UDP_CASES = [
    case("udp", "no-no", O(V4), N(V4), "conflict", "no_reuse", "udp"),
    case("udp", "ra-ra", O(V4, **RA), N(V4, **RA), "free", "", "udp"),
    case("udp", "ra-no", O(V4, **RA), N(V4), "conflict", "reuseaddr_one_side", "udp"),
    case("udp", "no-ra", O(V4), N(V4, **RA), "conflict", "reuseaddr_one_side", "udp"),
    case("udp", "ra-ra.1001-1002", O(V4, reuseaddr=True, uid=1001),
         N(V4, reuseaddr=True, uid=1002), "free", "", "udp"),
    case("udp", "rp-rp.1001-1001", O(V4, reuseport=True, uid=1001),
         N(V4, reuseport=True, uid=1001), "free", "", "udp"),
    case("udp", "rp-rp.1001-1002", O(V4, reuseport=True, uid=1001),
         N(V4, reuseport=True, uid=1002), "conflict", "reuseport_other_uid", "udp"),
    case("udp", "rp-no", O(V4, **RP), N(V4), "conflict", "reuseport_one_side", "udp"),
    case("udp", "no-rp", O(V4), N(V4, **RP), "conflict", "reuseport_one_side", "udp"),
    case("udp", "ra+rp-1001.new-rp-1002", O(V4, reuseaddr=True, reuseport=True, uid=1001),
         N(V4, reuseport=True, uid=1002), "conflict", "reuseport_other_uid", "udp"),
    case("udp", "wild4.new-spec", O(W4), N(V4), "conflict", "no_reuse", "udp"),
    case("udp", "spec.new-other-spec", O(V4), N(V4B), "free", "", "udp"),
    case("udp", "wild4.new-wild6", O(W4), N(W6), "conflict", "no_reuse", "udp"),
    case("udp", "wild4.new-wild6-v6only", O(W4), N(W6, v6only=True), "free", "", "udp"),
    case("udp", "mapped.new-loop4", O(MAPPED), N(V4), "conflict", "no_reuse", "udp"),
]

DEVICE_CASES = [
    case("device", "lo.new-d0", O(W4, dev="lo"), N(W4, dev=DUMMY), "free"),
    case("device", "d0.new-none", O(W4, dev=DUMMY), N(W4), "conflict", "no_reuse"),
    case("device", "none.new-d0", O(W4), N(W4, dev=DUMMY), "conflict", "no_reuse"),
    case("device", "d0.new-d0", O(W4, dev=DUMMY), N(W4, dev=DUMMY), "conflict", "no_reuse"),
    case("device", "d0-listening.new-lo", O(W4, "listen", dev=DUMMY), N(W4, dev="lo"), "free"),
    case("device", "d0-addr-listening.new-wild", O(DUMMY_ADDR, "listen", dev=DUMMY), N(W4),
         "conflict", "listener"),
    case("device", "d0-wild6.new-lo-wild4", O(W6, dev=DUMMY), N(W4, dev="lo"), "free"),
    case("device", "udp.lo.new-d0", O(W4, dev="lo"), N(W4, dev=DUMMY), "free", "", "udp"),
    case("device", "udp.d0.new-none", O(W4, dev=DUMMY), N(W4), "conflict", "no_reuse", "udp"),
]

LISTEN_CASES = [
    case("listen", "ra-listening.new-ra", O(V4, "listen", **RA), N(V4, listen=True, **RA),
         "conflict", "listener"),
    case("listen", "ra-bound.new-ra", O(V4, **RA), N(V4, listen=True, **RA), "free"),
    case("listen", "wild-ra-listening.new-spec-ra", O(W4, "listen", **RA),
         N(V4, listen=True, **RA), "conflict", "listener"),
    case("listen", "spec-ra-listening.new-wild-ra", O(V4, "listen", **RA),
         N(W4, listen=True, **RA), "conflict", "listener"),
    case("listen", "ra+rp-1001-listening.new-ra+rp-1001",
         O(V4, "listen", reuseaddr=True, reuseport=True, uid=1001),
         N(V4, listen=True, reuseaddr=True, reuseport=True, uid=1001), "free"),
    case("listen", "ra+rp-1001-listening.new-ra+rp-1002",
         O(V4, "listen", reuseaddr=True, reuseport=True, uid=1001),
         N(V4, listen=True, reuseaddr=True, reuseport=True, uid=1002),
         "conflict", "reuseport_other_uid"),
    case("listen", "wild6-ra-listening.new-wild4-ra", O(W6, "listen", **RA),
         N(W4, listen=True, **RA), "conflict", "listener"),
    case("listen", "wild6-v6only-ra-listening.new-wild4-ra",
         O(W6, "listen", reuseaddr=True, v6only=True), N(W4, listen=True, **RA), "free"),
]

ESTABLISHED_CASES = [
    case("established", "no.new-no", O(V4, "established"), N(V4), "conflict", "no_reuse"),
    case("established", "ra.new-ra", O(V4, "established", **RA), N(V4, **RA), "free"),
    case("established", "ra.new-no", O(V4, "established", **RA), N(V4),
         "conflict", "reuseaddr_one_side"),
    case("established", "no.new-wild", O(V4, "established"), N(W4), "conflict", "no_reuse"),
]

LO, HI = EPHEMERAL_RANGE
EPH = {"port_range": EPHEMERAL_RANGE}
EPHEMERAL_CASES = [
    case("ephemeral", "both-listening", [O(W4, "listen", port=LO), O(W4, "listen", port=HI)],
         N(W4, port=0), "conflict", "ephemeral", **EPH),
    case("ephemeral", "one-listening", O(W4, "listen", port=LO), N(W4, port=0), "free", **EPH),
    case("ephemeral", "both-ra-bound.new-ra.never-shared",
         [O(W4, port=LO, **RA), O(W4, port=HI, **RA)], N(W4, port=0, **RA),
         "conflict", "ephemeral", **EPH),
    case("ephemeral", "both-rp-listening.new-rp.never-shared",
         [O(W4, "listen", port=LO, **RP), O(W4, "listen", port=HI, **RP)],
         N(W4, port=0, **RP), "conflict", "ephemeral", **EPH),
    case("ephemeral", "both-spec.new-other-spec", [O(V4, port=LO), O(V4, port=HI)],
         N(V4B, port=0), "free", **EPH),
    case("ephemeral", "both-spec.new-wild", [O(V4, port=LO), O(V4, port=HI)],
         N(W4, port=0), "conflict", "ephemeral", **EPH),
    case("ephemeral", "both-timewait-ra.new-ra", [O(V4, "timewait", port=LO, **RA),
         O(V4, "timewait", port=HI, **RA)], N(W4, port=0, **RA), "conflict", "ephemeral", **EPH),
    case("ephemeral", "both-wild6.new-wild4", [O(W6, "listen", port=LO), O(W6, port=HI)],
         N(W4, port=0), "conflict", "ephemeral", **EPH),
    case("ephemeral", "both-wild4.new-wild6-v6only", [O(W4, "listen", port=LO), O(W4, port=HI)],
         N(W6, port=0, v6only=True), "free", **EPH),
    case("ephemeral", "udp.both", [O(W4, port=LO), O(W4, port=HI)], N(W4, port=0),
         "conflict", "ephemeral", "udp", **EPH),
    case("ephemeral", "udp.both-ra.new-ra.udp-shares", [O(W4, port=LO, **RA),
         O(W4, port=HI, **RA)], N(W4, port=0, **RA), "free", "", "udp", **EPH),
    case("ephemeral", "udp.both-rp-1001.new-rp-1001",
         [O(W4, port=LO, reuseport=True, uid=1001), O(W4, port=HI, reuseport=True, uid=1001)],
         N(W4, port=0, reuseport=True, uid=1001), "free", "", "udp", **EPH),
    case("ephemeral", "udp.both-rp-1001.new-rp-1002",
         [O(W4, port=LO, reuseport=True, uid=1001), O(W4, port=HI, reuseport=True, uid=1001)],
         N(W4, port=0, reuseport=True, uid=1002), "conflict", "ephemeral", "udp", **EPH),
]

# ---- refusals before the port, and how each is lifted ------------------------

NOT_LOCAL4, NOT_LOCAL6 = "10.99.0.9", "2001:db8::99"
NOBODY = 1001
NO_CAPS = frozenset()  # root without CAP_NET_BIND_SERVICE
WITH_CAP = frozenset({CAP_NET_BIND_SERVICE})
VETH = (("link", "add", "v0", "type", "veth", "peer", "name", "v1"), ("link", "set", "v1", "up"),
        ("link", "set", "v0", "up"))
SLOW_DAD = (("sysctl", "net/ipv6/conf/v0/dad_transmits", "100"),)
P80 = {"port": 80}

PRIVILEGED_CASES = [
    case("privileged", "uid-1001.port-80", [], N(W4, uid=NOBODY, **P80), "EACCES",
         "privileged_port"),
    case("privileged", "uid-1001.port-80.start-80", [], N(W4, uid=NOBODY, **P80), "free",
         sysctls=(("net/ipv4/ip_unprivileged_port_start", "80"),)),
    case("privileged", "root-without-cap.port-80", [], N(W4, caps=NO_CAPS, **P80), "EACCES",
         "privileged_port"),
    case("privileged", "uid-1001-with-cap.port-80", [], N(W4, uid=NOBODY, caps=WITH_CAP, **P80),
         "free"),
    case("privileged", "ipv6.uid-1001.port-80", [], N(W6, uid=NOBODY, **P80), "EACCES",
         "privileged_port"),
    case("privileged", "udp.uid-1001.port-53", [], N(W4, uid=NOBODY, port=53), "EACCES",
         "privileged_port", "udp"),
    case("privileged", "ipv4-order.address-first", [], N(NOT_LOCAL4, uid=NOBODY, **P80),
         "EADDRNOTAVAIL", "address_not_local privileged_port"),
    case("privileged", "ipv6-order.port-first", [], N(NOT_LOCAL6, uid=NOBODY, **P80), "EACCES",
         "privileged_port address_not_local"),
    case("privileged", "then-the-port", O(W4, "listen", port=80), N(W4, uid=NOBODY, **P80),
         "EACCES", "privileged_port conflict"),
]

ADDRESS_CASES = [
    case("address", "ipv4.not-local", [], N(NOT_LOCAL4), "EADDRNOTAVAIL", "address_not_local"),
    case("address", "ipv4.not-local.freebind", [], N(NOT_LOCAL4, freebind=True), "free"),
    case("address", "ipv4.not-local.transparent", [], N(NOT_LOCAL4, transparent=True), "free"),
    case("address", "ipv4.not-local.nonlocal-sysctl", [], N(NOT_LOCAL4), "free",
         sysctls=(("net/ipv4/ip_nonlocal_bind", "1"),)),
    case("address", "ipv4.anyip-local-route", [], N("10.77.0.5"), "free",
         setup=(("route", "add", "local", "10.77.0.0/24", "dev", "lo"),)),
    # The local route of an address stays while its device is down.
    case("address", "ipv4.on-a-device-that-is-down", [], N(DUMMY_ADDR), "free",
         setup=(("device", DUMMY), ("link", "set", DUMMY, "down"))),
    case("address", "ipv4.on-a-deleted-address", [], N(DUMMY_ADDR), "EADDRNOTAVAIL",
         "address_not_local", setup=(("device", DUMMY),
                                     ("addr", "del", f"{DUMMY_ADDR}/24", "dev", DUMMY))),
    # 0.0.0.0/8 is unicast since Linux 5.3 (only 0.0.0.0 is "this host").
    case("address", "ipv4.zeronet-is-unicast", [], N("0.1.2.3"), "EADDRNOTAVAIL",
         "address_not_local"),
    case("address", "ipv4.limited-broadcast", [], N("255.255.255.255"), "free", "", "udp"),
    case("address", "ipv4.udp-multicast", [], N("239.1.1.1"), "free", "", "udp"),
    case("address", "ipv4.tcp-multicast", [], N("239.1.1.1"), "free"),
    case("address", "ipv4.mapped.not-local", [], N("::ffff:" + NOT_LOCAL4), "EADDRNOTAVAIL",
         "address_not_local"),
    case("address", "ipv6.not-local", [], N(NOT_LOCAL6), "EADDRNOTAVAIL", "address_not_local"),
    case("address", "ipv6.not-local.freebind", [], N(NOT_LOCAL6, freebind=True), "free"),
    case("address", "ipv6.not-local.nonlocal-sysctl", [], N(NOT_LOCAL6), "free",
         sysctls=(("net/ipv6/ip_nonlocal_bind", "1"),)),
    case("address", "ipv6.tentative", [], N("2001:db8::7"), "EADDRNOTAVAIL", "address_tentative",
         setup=VETH + SLOW_DAD + (("addr", "add", "2001:db8::7/64", "dev", "v0"),)),
    case("address", "ipv6.link-local.without-device", [], N("fe80::77"), "EINVAL",
         "link_local_needs_device",
         setup=VETH + (("addr", "add", "fe80::77/64", "dev", "v0", "nodad"),)),
    case("address", "ipv6.mapped.on-v6only", [], N(MAPPED, v6only=True), "EINVAL",
         "mapped_on_v6only"),
    case("address", "ipv6.tcp-multicast", [], N("ff0e::1"), "EINVAL", "multicast_stream"),
    case("address", "ipv6.udp-multicast", [], N("ff0e::1"), "free", "", "udp"),
]

RANGE = (40000, 40009)
RANGE_CASES = [
    case("ephemeral", "autobind-reuse.both-ra-bound.new-ra.shared",
         [O(W4, port=LO, **RA), O(W4, port=HI, **RA)], N(W4, port=0, **RA), "free",
         sysctls=(("net/ipv4/ip_autobind_reuse", "1"),), **EPH),
    case("ephemeral", "autobind-reuse.ra+rp-same-uid.never-a-group",
         [O(W4, port=LO, reuseaddr=True, reuseport=True),
          O(W4, port=HI, reuseaddr=True, reuseport=True)],
         N(W4, port=0, reuseaddr=True, reuseport=True), "conflict", "ephemeral",
         sysctls=(("net/ipv4/ip_autobind_reuse", "1"),), **EPH),
    case("ephemeral", "socket-range.exhausted",
         [O(W4, "listen", port=40005), O(W4, "listen", port=40006)],
         N(W4, port=0, port_range=(40005, 40006)), "conflict", "ephemeral", port_range=RANGE),
    case("ephemeral", "socket-range.free", [O(W4, "listen", port=40005)],
         N(W4, port=0, port_range=(40005, 40006)), "free", port_range=RANGE),
    case("ephemeral", "no-port.both-listening", [O(W4, "listen", port=LO), O(W4, "listen", port=HI)],
         N(W4, port=0, no_port=True), "free", **EPH),
]

ORPHAN_CASES = [
    case("orphan", "fin-wait2.new-no", O(V4, "fin_wait2"), N(V4), "conflict", "time_wait"),
    case("orphan", "fin-wait2-ra.new-ra", O(V4, "fin_wait2", **RA), N(V4, **RA), "free"),
    case("orphan", "fin-wait2.new-wild", O(V4, "fin_wait2"), N(W4), "conflict", "time_wait"),
    case("orphan", "fin-wait1.new-no", O(V4, "fin_wait1"), N(V4), "conflict", "no_reuse"),
    case("orphan", "fin-wait1-ra.new-ra", O(V4, "fin_wait1", **RA), N(V4, **RA), "free"),
]

CASES: list[Case] = (PRIVILEGED_CASES + ADDRESS_CASES + RANGE_CASES + ORPHAN_CASES
                     + _reuseaddr_table() + TIME_WAIT_CASES + REUSEPORT_CASES
                     + DUAL_STACK_CASES + UDP_CASES + DEVICE_CASES + LISTEN_CASES
                     + ESTABLISHED_CASES + EPHEMERAL_CASES)


# ---- building a scenario for real -----------------------------------------


def family(addr: str) -> str:
    return "ipv6" if ":" in addr else "ipv4"


def ip(*args: str) -> str:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if r.returncode:
        raise AssertionError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r.stdout


@dataclass
class Held:
    """One existing socket of the scenario, and how to remove it."""

    index: int  # in case.old
    spec: Old
    actor: Actor
    fd: int | None  # None: TIME_WAIT, held by no process
    inode: int = 0  # bound and listening sockets
    ports: tuple[int, int] | None = None  # (local, remote): connections, TIME_WAIT
    peer: int | None = None  # the client side of a connection (same actor)

    def is_(self, s: Socket) -> bool:
        d = s.diag
        if self.inode:
            return d.inode == self.inode
        return self.ports == (d.local_port, d.remote_port)


class Scenario:
    """A case built for real in one namespace: the existing sockets, then
    the new one (bound already when the question is its listen())."""

    def __init__(self, ns: Netns, case: Case, omit: frozenset[int] = frozenset()) -> None:
        self.ns = ns
        self.case = case
        self.omit = omit
        self.actors: dict[tuple[str, int], Actor] = {}
        self.held: list[Held] = []
        self.ifindex = {"lo": 1}
        self.new_fd: int | None = None  # listen questions: the bound new socket
        self.probes: set[str] = set()
        self.prepared = False

    # -- plumbing

    def actor(self, role: str, uid: int, caps: frozenset[int] | None = None) -> Actor:
        key = (role, uid) if caps is None else (role, uid, caps)
        if key not in self.actors:
            self.actors[key] = Actor(self.ns, uid=uid, caps=caps)  # type: ignore[index]
        return self.actors[key]  # type: ignore[index]

    def device(self, name: str | None) -> int:
        if name is None:
            return 0
        if name not in self.ifindex and name != DUMMY:  # one the case's setup made
            self.ifindex[name] = json.loads(ip("-n", self.ns.name, "-j", "link", "show",
                                               name))[0]["ifindex"]
        if name not in self.ifindex:
            n = self.ns.name
            try:
                ip("-n", n, "link", "add", DUMMY, "type", "dummy")
            except AssertionError:  # a kernel without CONFIG_DUMMY: one end of a veth pair
                ip("-n", n, "link", "add", DUMMY, "type", "veth", "peer", "name", DUMMY + "p")
                ip("-n", n, "link", "set", DUMMY + "p", "up")
            ip("-n", n, "link", "set", DUMMY, "up")
            ip("-n", n, "addr", "add", f"{DUMMY_ADDR}/24", "dev", DUMMY)
            self.ifindex[DUMMY] = json.loads(ip("-n", n, "-j", "link", "show", DUMMY))[0]["ifindex"]
        return self.ifindex[name]

    def socket(self, actor: Actor, spec: Old | New) -> int:
        opts: dict[str, object] = {k: True for k in ("reuseaddr", "reuseport", "v6only")
                                   if getattr(spec, k)}
        if isinstance(spec, New):
            opts.update({k: True for k, on in (("freebind", spec.freebind),
                                               ("transparent", spec.transparent),
                                               ("bind_address_no_port", spec.no_port)) if on})
            if spec.port_range:
                opts["local_port_range"] = spec.port_range
        if spec.dev:
            self.device(spec.dev)
            opts["bindtodevice"] = spec.dev
        return actor.socket(self.case.protocol, family(spec.addr), **opts)

    def must(self, truth: Truth, what: str) -> Truth:
        if truth.errno:
            raise AssertionError(f"scenario broken: {what}: {truth.describe()}")
        return truth

    # -- building

    def prepare(self) -> None:
        """The namespace as the case needs it: devices, addresses, routes, sysctls."""
        if self.prepared:
            return
        self.prepared = True
        for command in self.case.setup:
            if command[0] == "device":
                self.device(command[1])
            elif command[0] == "sysctl":
                self.ns.sysctl(command[1], command[2])
            else:
                ip("-n", self.ns.name, *command)
        for key, value in self.case.sysctls:
            self.ns.sysctl(key, value)

    def build(self) -> None:
        self.prepare()
        olds = [(i, o) for i, o in enumerate(self.case.old) if i not in self.omit]
        for i, o in olds:  # connections first: they need their own listener
            if o.kind in CONNECTION_KINDS:
                self._connection(i, o)
        if self.case.port_range:
            self.ns.sysctl("net/ipv4/ip_local_port_range", "%d %d" % self.case.port_range)
        to_listen = []
        for i, o in olds:  # bind every socket, then listen: listen() is checked again
            if o.kind in ("bound", "listen"):
                a = self.actor("old", o.uid)
                fd = self.socket(a, o)
                t = self.must(a.bind(fd, o.addr, o.port), f"existing socket {i}")
                self.held.append(Held(i, o, a, fd, inode=t.inode))
                if o.kind == "listen":
                    to_listen.append((a, fd, i))
        new = self.case.new
        if new.listen:
            a = self.actor("new", new.uid, new.caps)
            self.new_fd = self.socket(a, new)
            self.must(a.bind(self.new_fd, new.addr, new.port), "the new socket's bind")
        for a, fd, i in to_listen:
            self.must(a.listen(fd), f"existing socket {i} listen")

    def _connection(self, i: int, o: Old) -> None:
        assert o.addr not in (W4, W6), "a connection has a specific address"
        a = self.actor("old", o.uid)
        lst = self.socket(a, o)
        self.must(a.bind(lst, o.addr, o.port), f"listener of connection {i}")
        self.must(a.listen(lst), f"listener of connection {i}")
        cli = a.socket("tcp", family(o.addr), **({"rcvbuf": 4096} if o.kind == "fin_wait1" else {}))
        t = self.must(a.connect(cli, o.addr, o.port), f"client of connection {i}")
        conn = a.accept(lst)
        a.close(lst)
        ports = (o.port, t.bound_port)
        if o.kind == "established":
            self.held.append(Held(i, o, a, conn, ports=ports, peer=cli))
            return
        if o.kind == "fin_wait2":  # the server closes, its client never does
            a.close(conn)
            a.wait_tcp_states(o.port, lambda st: "FIN_WAIT2" in st)
            self.held.append(Held(i, o, a, None, ports=ports, peer=cli))
            return
        if o.kind == "fin_wait1":  # the server closes with data its client never reads
            a.fill(conn)
            a.close(conn)
            a.wait_tcp_states(o.port, lambda st: "FIN_WAIT1" in st)
            self.held.append(Held(i, o, a, None, ports=ports, peer=cli))
            return
        a.close(conn)  # the server closes first: its side goes to TIME_WAIT
        a.close(cli)
        a.wait_tcp_states(o.port, lambda st: "TIME_WAIT" in st and not TRANSIENT & set(st))
        self.held.append(Held(i, o, a, None, ports=ports))

    # -- asking and doing

    def request(self, new: New) -> Request:
        cap = None if new.caps is None else CAP_NET_BIND_SERVICE in new.caps
        return Request(port=new.port, protocol=self.case.protocol, addr=new.addr,
                       reuseaddr=new.reuseaddr, reuseport=new.reuseport, v6only=new.v6only,
                       bound_dev_if=self.device(new.dev), uid=new.uid, listen=new.listen,
                       freebind=new.freebind, transparent=new.transparent,
                       bind_address_no_port=new.no_port, port_range=new.port_range,
                       cap_net_bind_service=cap)

    def explain(self, new: New | None = None) -> Explanation:
        return explain(self.request(new or self.case.new), netns=str(self.ns.inode))

    def decide(self) -> Truth:
        """The kernel's answer to the case's own question. The new socket is
        then closed: fixes and retries use fresh sockets."""
        new = self.case.new
        if new.listen:
            a, fd = self.actor("new", new.uid, new.caps), self.new_fd
            assert fd is not None
            t = a.listen(fd)
            a.close(fd)
            self.new_fd = None
            return t
        return self.attempt(new)

    def attempt(self, new: New) -> Truth:
        """bind() (then listen()) a fresh socket like ``new``; the answer of
        the call the question is about. The socket is closed afterwards."""
        a = self.actor("new", new.uid, new.caps)
        fd = self.socket(a, new)
        t = a.bind(fd, new.addr, new.port)
        if new.listen and t.errno == 0:
            t = a.listen(fd)
        a.close(fd)
        return t

    def held_of(self, s: Socket) -> Held:
        found = [h for h in self.held if h.is_(s)]
        assert len(found) == 1, f"blocker {s.to_json()} is none of the scenario's sockets"
        return found[0]

    def sockets_on(self, port: int) -> list[Socket]:
        return take(port=port, protocols=(self.case.protocol,), netns=str(self.ns.inode)).sockets

    # -- removing

    def remove(self, h: Held) -> None:
        if h.fd is None:  # TIME_WAIT or an orphan: nobody holds it
            assert self.destroy(h), (f"existing socket {h.index} still there after "
                                     "SOCK_DESTROY (ss -K)")
            return
        if h.peer is not None:  # the peer first, so that the connection ends
            h.actor.close(h.peer)
        h.actor.close(h.fd)
        assert self.gone(h), (f"existing socket {h.index} still there after its removal: "
                              f"{self.states_of(h)}")
        self.held.remove(h)

    def destroy(self, h: Held) -> bool:
        """SOCK_DESTROY (``ss -K`` on the socket's exact port pair) for a
        socket no process holds: whether the kernel freed it (5.10 keeps
        TIME_WAIT sockets and orphans; 6.1 frees both)."""
        assert h.fd is None and h.ports is not None
        r = subprocess.run(
            ["ip", "netns", "exec", self.ns.name, "ss", "-K", "-tna",
             f"( sport = :{h.ports[0]} and dport = :{h.ports[1]} )"],
            capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, f"ss -K: {r.stderr}"
        if not self.gone(h):
            return False
        self.held.remove(h)
        return True

    def states_of(self, h: Held) -> list[str]:
        return [s.diag.state for s in self.sockets_on(h.spec.port) if h.is_(s)]

    def gone(self, h: Held, timeout: float = 3.0) -> bool:
        deadline = time.monotonic() + timeout
        while self.states_of(h):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True


# ---- fixes: which can be applied, and how --------------------------------


def _probe_address(sc: Scenario, new: New) -> New:
    fam = family(new.addr)
    probe = SPECIFIC_PROBES[fam]
    if probe not in sc.probes:
        extra = ["nodad"] if fam == "ipv6" else []
        ip("-n", sc.ns.name, "addr", "add", probe + ("/128" if fam == "ipv6" else "/32"),
           "dev", "lo", *extra)
        sc.probes.add(probe)
    return replace(new, addr=probe)


def _other_device(sc: Scenario, new: New, ex: Explanation) -> New:
    used = {s.diag.bound_dev_if for _, s in ex.blockers}
    for name in ("lo", DUMMY):
        if sc.device(name) not in used:
            return replace(new, dev=name)
    raise AssertionError("no device left that the blockers do not use")


# A fix is data: its kind says what to change, its parameters how. Each kind
# the explainer can propose has a way to apply it for real here; a kind this
# test does not know fails the case, so that no new fix goes unproven.
Applier = Callable[[Scenario, New, Explanation, Fix], New]
OPTIONS = {"SO_REUSEADDR": "reuseaddr", "SO_REUSEPORT": "reuseport", "IPV6_V6ONLY": "v6only",
           "IP_FREEBIND": "freebind", "IPV6_FREEBIND": "freebind",
           "IP_TRANSPARENT": "transparent", "IP_BIND_ADDRESS_NO_PORT": "no_port"}


def _option(sc: Scenario, new: New, ex: Explanation, fix: Fix) -> New:
    return replace(new, **{OPTIONS[str(fix.params["option"])]: fix.params.get("value", 1) != 0})


def _sysctl(sc: Scenario, new: New, ex: Explanation, fix: Fix) -> New:
    name = str(fix.params["name"]).replace(".", "/")
    if fix.params["value"] == "wider":
        lo, hi = sc.ns.local_port_range()
        sc.ns.sysctl(name, f"{lo} {hi + 2}")
    else:
        sc.ns.sysctl(name, str(fix.params["value"]))
    return new


def _add_address(sc: Scenario, new: New, ex: Explanation, fix: Fix) -> New:
    addr = str(fix.params["address"])
    v6 = ":" in addr and not addr.startswith("::ffff:")
    ip("-n", sc.ns.name, "addr", "add", addr.replace("::ffff:", "") + ("/128" if v6 else "/32"),
       "dev", "lo", *(["nodad"] if v6 else []))
    return new


APPLIED: dict[str, Applier] = {
    "option": _option,
    "uid": lambda sc, n, e, f: replace(n, uid=int(f.params["uid"])),  # type: ignore[call-overload]
    "specific_address": lambda sc, n, e, f: _probe_address(sc, n),
    "other_device": lambda sc, n, e, f: _other_device(sc, n, e),
    "sysctl": _sysctl,
    "capability": lambda sc, n, e, f: replace(n, caps=frozenset({CAP_NET_BIND_SERVICE})),
    "port": lambda sc, n, e, f: replace(n, port=int(f.params["at_least"])),  # type: ignore[call-overload]
    "add_address": _add_address,
    "device": lambda sc, n, e, f: replace(n, dev=str(f.params["device"])),
    "socket_port_range": lambda sc, n, e, f: replace(
        n, port_range=tuple(f.params["range"])),  # type: ignore[arg-type]
}
def _wait_dad(sc: Scenario, new: New, ex: Explanation, fix: Fix) -> New:
    """What the end of duplicate address detection gives: the address, not
    tentative (re-added without DAD, as the fix's text offers)."""
    addr = str(fix.params["address"])
    for line in ip("-n", sc.ns.name, "-o", "-6", "addr", "show").splitlines():
        words = line.split()
        if words[3].split("/")[0] == addr:
            ip("-n", sc.ns.name, "addr", "del", words[3], "dev", words[1])
            ip("-n", sc.ns.name, "addr", "add", words[3], "dev", words[1], "nodad")
            return new
    raise AssertionError(f"{addr} is not in the namespace")


def _protocol(sc: Scenario, new: New, ex: Explanation, fix: Fix) -> New:
    sc.case = replace(sc.case, protocol=str(fix.params["protocol"]))
    return new


APPLIED["wait_dad"] = _wait_dad
APPLIED["protocol"] = _protocol
NAMESPACE_FIXES = {"sysctl", "add_address", "wait_dad"}
# Fixes that step 5 proves: removing the blockers (stopping their holders,
# closing a connection, TIME_WAIT or an orphan running out, which
# SOCK_DESTROY stands in for).
PROVEN_BY_REMOVAL = {"stop_holder", "close_connection", "wait", "destroy_socket"}
TIME_WAIT_NOTE = "reuseaddr_alone_vs_time_wait"
DESTROY_NOTE = "destroy_keeps"


def prove_fixes(sc: Scenario, ex: Explanation) -> None:
    """Every fix that changes the new socket, its process or the namespace is
    applied for real, each in a namespace of its own where the case is
    rebuilt with the fix: the kernel keeps per-port state that a successful
    bind leaves behind (its SO_REUSEPORT fast path, see bindrules), so a fix
    proven in the case's own namespace could change the answer of the
    proofs that follow."""
    assert ex.fixes, "a refusal without a single fix"
    for fix in ex.fixes:
        assert fix.params.get("for") in {r.rule for r in ex.reasons}, fix
        if fix.kind in PROVEN_BY_REMOVAL:
            continue
        assert fix.kind in APPLIED, f"a fix this test cannot prove: {fix.kind} {fix.params}"
        with Netns() as ns2:
            fixed_sc = Scenario(ns2, sc.case)
            if fix.kind in NAMESPACE_FIXES:  # on the namespace as the case built it
                fixed_sc.build()
                APPLIED[fix.kind](fixed_sc, sc.case.new, ex, fix)
            else:  # on the new socket, which the case then builds
                fixed = APPLIED[fix.kind](fixed_sc, sc.case.new, ex, fix)
                fixed_sc.case = replace(fixed_sc.case, new=fixed)
                fixed_sc.build()
            # The fix removes its reason: asked again, the explainer no longer
            # gives it, and the kernel agrees with what it gives instead (for
            # a single reason: the bind succeeds).
            ex2 = fixed_sc.explain()
            t = fixed_sc.decide()
            what = f"fix {fix.text!r} applied as {fixed_sc.case.new}: the kernel says {t.describe()}"
            assert fix.params["for"] not in [r.rule for r in ex2.reasons], what
            assert (getattr(errno, ex2.errno) if ex2.errno else 0) == t.errno, \
                f"{what}, the explainer then says {ex2.errno}"
            if len(ex.reasons) == 1:
                assert t.errno == 0, what
    for note in ex.notes:  # the BSD difference must be true, not only said
        if note.kind == TIME_WAIT_NOTE:
            t = sc.attempt(replace(sc.case.new, reuseaddr=True))
            assert t.errno == errno.EADDRINUSE, f"note {note.text!r}, but the kernel says {t.errno_name}"


# ---- proving the blockers ---------------------------------------------------


def prove_blockers(sc: Scenario, ex: Explanation) -> None:
    helds = [sc.held_of(s) for _, s in ex.blockers]
    assert len({h.index for h in helds}) == len(helds), "a blocker listed twice"
    for (b, s), h in zip(ex.blockers, helds):
        if h.spec.kind == "timewait":
            assert s.diag.state == "TIME_WAIT" and s.diag.inode == 0 and not s.owners, \
                f"TIME_WAIT blocker seen as {s.diag.state}, inode {s.diag.inode}"
            assert b.sock.state == "TIME_WAIT"
    if ex.request.protocol == "tcp" and not any(n.kind == TIME_WAIT_NOTE for n in ex.notes):
        assert all(h.spec.reuseaddr for h in helds if h.spec.kind == "timewait"), \
            "a TIME_WAIT socket without SO_REUSEADDR blocks, and the explainer does not say " \
            "that SO_REUSEADDR on the new socket alone cannot help"

    if len(helds) > 1:  # each blocker alone blocks: rebuild without the others
        for h in helds:
            others = frozenset(x.index for x in helds if x is not h)
            with Netns() as ns2:
                alone = Scenario(ns2, sc.case, omit=others)
                alone.build()
                ex2 = alone.explain()
                t = alone.decide()
                assert t.errno == errno.EADDRINUSE, \
                    f"blocker {h.index} alone does not block: {t.describe()}"
                assert [alone.held_of(s).index for _, s in ex2.blockers] == [h.index]

    closable = [h for h in helds if h.fd is not None]
    waiting = [h for h in helds if h.fd is None]
    for h in closable:
        sc.remove(h)
    if waiting:
        t = sc.attempt(sc.case.new)
        assert t.errno == errno.EADDRINUSE, \
            f"only TIME_WAIT blockers left, yet the kernel says {t.errno_name}"
        if not destroys_all(sc, ex, waiting):
            return  # waiting, the one fix left, is proven where the kernel destroys them
    t = sc.attempt(sc.case.new)
    assert t.errno == 0, f"every blocker removed, yet the kernel says {t.describe()}"


def destroys_all(sc: Scenario, ex: Explanation, waiting: list[Held]) -> bool:
    """SOCK_DESTROY on every blocker no process holds. Where they were all
    the blockers, the explainer offers it exactly when the kernel frees them
    all; when the kernel keeps some, it says which states instead, and the
    port stays refused."""
    kept = {h.index: sc.states_of(h) for h in waiting if not sc.destroy(h)}
    offered = [f for f in ex.fixes if f.kind == "destroy_socket"]
    only_waiting = all(holding(s) in ("time_wait", "orphan") for _, s in ex.blockers)
    if not kept:
        assert offered or not only_waiting, \
            "the kernel destroyed the blockers, but the explainer did not offer it"
        return True
    assert not offered, f"destroy offered, but the kernel kept {kept} after SOCK_DESTROY"
    said = [n.params["states"] for n in ex.notes if n.kind == DESTROY_NOTE]
    if only_waiting:
        assert said and set(said[0]) == {st for states in kept.values() for st in states}, \
            f"the kernel kept {kept} after SOCK_DESTROY; the explainer's notes: {ex.notes}"
    t = sc.attempt(sc.case.new)
    assert t.errno == errno.EADDRINUSE, f"blockers kept, yet the kernel says {t.describe()}"
    return False


def prove_ephemeral(sc: Scenario, ex: Explanation, truth: Truth) -> None:
    """Port 0: no per-socket blockers; the free-port count is the verdict."""
    assert ex.blockers == [] and ex.ephemeral is not None
    lo, hi = ex.ephemeral["range"]  # type: ignore[misc]
    assert ex.ephemeral["namespace_range"] == list(sc.case.port_range or ())
    if sc.case.new.port_range is None:
        assert [lo, hi] == list(sc.case.port_range or ())
    if truth.errno == 0:
        if sc.case.new.no_port:  # the bind took no port, as the explainer says
            assert truth.bound_port == 0 and ex.ephemeral["free"] is None
            return
        assert ex.ephemeral["free"] >= 1
        assert lo <= truth.bound_port <= hi, (truth.bound_port, lo, hi)
        return
    assert ex.ephemeral["free"] == 0
    prove_fixes(sc, ex)
    # One occupant gone, one port free again: one a process holds, if any;
    # else a TIME_WAIT one, where the kernel can destroy it (the explainer
    # offers no destroying for port 0, only the free-port count).
    occupant = sorted(sc.held, key=lambda h: h.fd is None)[0]
    if occupant.fd is not None:
        sc.remove(occupant)
    elif not sc.destroy(occupant):
        return
    t = sc.attempt(sc.case.new)
    assert t.errno == 0, f"a port was freed, yet the kernel says {t.describe()}"


# ---- the test ---------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def iterators_loaded_once(root: None) -> Iterator[None]:
    """The explainer walks the socket tables with the process's shared
    iterators, which are loaded by the first handle and closed with the last:
    held here, they are loaded once for the module, not once per question
    (each load runs the verifier: seconds under emulation)."""
    with SharedIterators():
        yield


@pytest.fixture
def scenario(netns: Netns, request: pytest.FixtureRequest) -> Iterator[Scenario]:
    yield Scenario(netns, request.param)


@pytest.mark.parametrize("scenario", CASES, ids=[c.id for c in CASES], indirect=True)
def test_explainer_matches_kernel(scenario: Scenario) -> None:
    sc, case_ = scenario, scenario.case
    sc.build()
    if case_.new.port_range and not kernel_has_socket_port_range():
        prove_no_socket_port_range(sc)
        return
    ex = sc.explain()
    truth = sc.decide()

    assert truth.errno == case_.errno, \
        f"scenario broken: expected {case_.expect}, the kernel says {truth.describe()}"
    assert (getattr(errno, ex.errno) if ex.errno else 0) == truth.errno, (
        f"explainer says {ex.errno or 'success'}, kernel says {truth.errno_name}\n"
        + json.dumps(ex.to_json(), indent=1, default=str))

    if case_.expect not in ("free", "conflict"):  # refused before the port
        assert [r.rule for r in ex.reasons] == case_.reason_rules, \
            json.dumps(ex.to_json()["reasons"], indent=1)
        prove_fixes(sc, ex)
        return
    if case_.new.port == 0:
        prove_ephemeral(sc, ex, truth)
        return
    if case_.expect == "free":
        assert ex.blockers == [] and ex.fixes == [] and ex.reasons == []
        return
    assert [r.rule for r in ex.reasons] == ["conflict"]
    assert {b.rule.value for b, _ in ex.blockers} == rules_as_built(sc), \
        json.dumps(ex.to_json()["blockers"], indent=1)
    prove_fixes(sc, ex)
    prove_blockers(sc, ex)


def kernel_has_socket_port_range() -> bool:
    """IP_LOCAL_PORT_RANGE (6.3+): asked of the kernel with a setsockopt."""
    with socket.socket() as s:
        try:
            s.setsockopt(socket.IPPROTO_IP, IP_LOCAL_PORT_RANGE, 0)
        except OSError as exc:
            assert exc.errno == errno.ENOPROTOOPT, exc
            return False
    return True


def prove_no_socket_port_range(sc: Scenario) -> None:
    """A question about a socket this kernel cannot make: the explainer
    refuses it in one sentence, and the kernel refuses the option."""
    with pytest.raises(UsageError, match="no IP_LOCAL_PORT_RANGE"):
        sc.explain()
    with pytest.raises(ActorError, match="Protocol not available"):
        sc.socket(sc.actor("new", sc.case.new.uid, sc.case.new.caps), sc.case.new)


def rules_as_built(sc: Scenario) -> frozenset[str]:
    """The case's rules, for what the kernel built. An orphaned FIN_WAIT2 is
    usually a TIME_WAIT minisocket in its FIN_WAIT2 substate (timewait timer:
    the time_wait rule); but when the peer's ACK reaches the dying socket
    while its close() still holds the socket lock, tcp_rcv_state_process
    keeps a full orphan on the keepalive timer, bound by the plain reuse
    rules (seen under emulation, where close() is slow). ss, not portscope,
    says which one the kernel made."""
    case_ = sc.case
    orphans = [o for o in case_.old if o.kind == "fin_wait2"]
    if not orphans or "time_wait" not in case_.rules:
        return case_.rules
    timers = {_ss_fin_wait2_timer(sc.ns, o.port) for o in orphans}
    assert timers <= {"timewait", "keepalive"}, timers
    if timers == {"timewait"}:
        return case_.rules
    new = case_.new
    assert not (new.reuseaddr or new.reuseport or any(o.reuseaddr or o.reuseport for o in orphans)), \
        "a case with options on a full orphan needs its own expected rule here"
    return (case_.rules - {"time_wait"}) | {"no_reuse"}


def _ss_fin_wait2_timer(ns: Netns, port: int) -> str | None:
    """The timer ss shows on the FIN_WAIT2 socket on local ``port``."""
    out = subprocess.run(["ip", "netns", "exec", ns.name, "ss", "-tanoH", "state", "fin-wait-2"],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    for line in out.splitlines():
        local = line.split()[2] if len(line.split()) > 2 else ""
        if local.endswith(f":{port}"):
            found = re.search(r"timer:\((\w+),", line)
            return found.group(1) if found else None
    return None


def test_matrix_size() -> None:
    """The issue asks for at least 60 cases, with ids that stay unique."""
    assert len(CASES) >= 60
    assert len({c.id for c in CASES}) == len(CASES)


FAST_PATH_NOTE = "reuseport_fast_path"


@pytest.mark.parametrize("order", ["A-then-B", "B-then-A"])
def test_reuseport_fast_path_depends_on_bind_order(netns: Netns, order: str) -> None:
    """Where the explainer cannot be the oracle: the same sockets, bound in
    another order, get another answer from the kernel.

    A (uid 1001) and B (uid 1002), both SO_REUSEADDR + SO_REUSEPORT, share
    127.0.0.1 through SO_REUSEADDR. C (uid 1001, SO_REUSEPORT only) conflicts
    with B by the full check, which the kernel applies when B bound last;
    when A bound last, the port's SO_REUSEPORT cache holds A's uid and
    address and the kernel accepts C without a check (sk_reuseport_match).
    The explainer sees the same sockets both times: it must name B under
    the full rule and say that the kernel may accept anyway, because of A."""
    sc = Scenario(netns, case("fastpath", order, [], N(V4, reuseport=True, uid=1001), "conflict",
                              "reuseport_other_uid"))
    a, b = Old(V4, reuseaddr=True, reuseport=True, uid=1001), \
        Old(V4, reuseaddr=True, reuseport=True, uid=1002)
    inodes = {}
    for name, spec in (("A", a), ("B", b)) if order == "A-then-B" else (("B", b), ("A", a)):
        actor = sc.actor("old", spec.uid)
        fd = sc.socket(actor, spec)
        inodes[name] = sc.must(actor.bind(fd, spec.addr, spec.port), name).inode
    ex = sc.explain()
    assert ex.verdict == "conflict"
    assert [(bl.rule.value, s.diag.inode) for bl, s in ex.blockers] == \
        [("reuseport_other_uid", inodes["B"])]
    note = [n for n in ex.notes if n.kind == FAST_PATH_NOTE]
    assert len(note) == 1 and [x["inode"] for x in note[0].params["sockets"]] == [inodes["A"]], \
        ex.notes
    t = sc.decide()
    assert t.errno == (errno.EADDRINUSE if order == "A-then-B" else 0), t.describe()


def test_reuseport_cache_outlives_its_socket(netns: Netns) -> None:
    """Why every fix is proven in a namespace of its own: a successful bind
    leaves the port's SO_REUSEPORT cache behind after its socket closed, as
    long as the bucket lives on (here: a TIME_WAIT socket keeps it).

    A TIME_WAIT socket with SO_REUSEADDR refuses a SO_REUSEPORT-only socket
    (full check). Once a SO_REUSEADDR + SO_REUSEPORT socket of uid 0 has bound
    the port and closed again, the kernel accepts the same request unchecked.
    Nothing of the closed socket is visible, so the explainer keeps giving
    the full check's answer; this test pins the kernel's side of it."""
    sc = Scenario(netns, case("cache", "stale", O(V4, "timewait", **RA), N(V4, **RP),
                              "conflict", "time_wait"))
    sc.build()
    ex = sc.explain()
    assert ex.verdict == "conflict" and not [n for n in ex.notes if n.kind == FAST_PATH_NOTE]
    assert sc.attempt(sc.case.new).errno == errno.EADDRINUSE
    assert sc.attempt(N(V4, reuseaddr=True, reuseport=True)).errno == 0  # bound, then closed
    assert [s.diag.state for s in sc.sockets_on(PORT)] == ["TIME_WAIT"]
    assert sc.explain().verdict == "conflict"
    assert sc.attempt(sc.case.new).errno == 0
