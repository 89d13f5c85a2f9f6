"""The kernel's socket lookup for a new connection or datagram, as rules.

When a SYN or a datagram arrives for ADDR:PORT, the kernel looks for the
socket that gets it in a fixed order (net/ipv4/inet_hashtables.c,
net/ipv6/inet6_hashtables.c, net/ipv4/udp.c, net/ipv6/udp.c, the same from
5.10 to 6.18):

TCP (``__inet_lookup``)
    1. the established table: a socket of exactly that 4-tuple (an open
       connection, a request socket, a TIME_WAIT socket);
    2. the namespace's ``sk_lookup`` BPF programs (tracer/netprogs.py);
    3. listeners bound to the destination address itself;
    4. listeners bound to the wildcard address.
UDP (``__udp4_lib_lookup``)
    1. sockets bound to the destination address itself; a connected one
       (``connect()``-ed to this source) that wins ends the lookup;
    2. the ``sk_lookup`` programs;
    3. the winner of step 1, if any;
    4. sockets bound to the wildcard address.

Within a step the highest score wins (``compute_score``): a socket bound to
a device scores over an unbound one, an IPv4 socket over an IPv6 dual-stack
one, and for UDP each address or port a socket is bound or connected to
adds to it. A socket that cannot take the packet at all (another address,
another device, IPv6-only for an IPv4 packet, a UDP socket connected to
another peer) scores -1. Equal scores are decided by the order of the
kernel's hash chain, which no dump shows: the answer then names both.
``sk_incoming_cpu`` adds one point on the CPU a socket asked for
(SO_INCOMING_CPU); portscope does not read it, and says nothing of it.
The winner's reuseport group then picks the member (tracer/deliver.py).

These functions are pure: they take the sockets of one port as
:class:`Endpoint` and a :class:`Packet`, and say what the kernel does with
each socket, so that recorded sockets can be judged as live ones are.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Iterable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
ANY4 = ipaddress.IPv4Address("0.0.0.0")
ANY6 = ipaddress.IPv6Address("::")

# TCP states whose sockets are in the established hash (request sockets show
# in sock_diag as SYN_RECV).
CONNECTION_STATES = frozenset({"ESTABLISHED", "SYN_SENT", "SYN_RECV", "FIN_WAIT1", "FIN_WAIT2", "CLOSE_WAIT", "LAST_ACK", "CLOSING",
                               "TIME_WAIT"})


@dataclass(frozen=True, slots=True)
class Packet:
    """The first packet of a connection (a SYN) or a datagram, as the
    receiving namespace sees it."""

    protocol: str  # tcp | udp
    family: str  # ipv4 | ipv6: the packet's
    daddr: IPAddress
    dport: int
    saddr: IPAddress | None = None  # None: any source
    sport: int | None = None  # None: any source port
    dif: int = 0  # the device it arrives on (a VRF's, when it arrives on a VRF's port); 0: one no socket is bound to
    sdif: int = 0  # the VRF port it came in on (dif is then the VRF)
    l3mdev_accept: bool = False  # net.ipv4.{tcp,udp}_l3mdev_accept


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One socket as the lookup sees it."""

    cookie: int
    family: str
    state: str
    laddr: IPAddress
    lport: int
    raddr: IPAddress
    rport: int
    dev: int  # SO_BINDTODEVICE's ifindex, 0: none
    v6only: bool | None  # None: not known (no iterator read the socket)
    reuseport: bool = False
    group: int = 0  # reuseport group id, 0: none
    group_size: int = 0
    group_bpf: bool = False  # a BPF program picks the group's member
    group_has_conns: bool = False  # a UDP group with connected members
    transparent: bool = False


@dataclass(frozen=True, slots=True)
class Judged:
    """What the lookup makes of one socket."""

    endpoint: Endpoint
    step: str  # established | exact | wildcard | none
    score: int  # -1: it cannot take the packet
    rule: str  # why it cannot (see EXCLUSIONS), or "scored"
    parts: tuple[str, ...] = ()  # what its score is made of (see SCORE_PARTS)


# Why a socket on the port cannot take the packet.
EXCLUSIONS = {
    "other_address": "bound to another address",
    "other_family": "an IPv4 socket: the packet is IPv6",
    "v6only": "IPv6-only (IPV6_V6ONLY): the packet is IPv4",
    "v6only_unknown": "an IPv6 socket whose IPV6_V6ONLY could not be read",
    "other_device": "bound to another device",
    "vrf_unbound": "bound to no device, and the packet comes through a VRF "
                   "(net.ipv4.*_l3mdev_accept is 0)",
    "not_listening": "not listening",
    "other_peer": "connected to another peer",
    "peer_unknown": "connected: it receives only its peer's datagrams",
    "other_connection": "another connection",
}

# What adds to a score, in the order a comparison names them.
SCORE_PARTS = {
    "connected": "connected to this source",
    "address": "bound to the destination address",
    "device": "bound to the device the packet arrives on",
    "ipv4": "an IPv4 socket (over an IPv6 dual-stack one)",
}


@dataclass
class Step:
    """One step of the lookup: its candidates and the one it picks."""

    name: str  # exact | wildcard
    winner: Endpoint | None = None
    score: int = -1
    ties: list[Endpoint] = field(default_factory=list)  # others with the winner's score


# ---- addresses ----------------------------------------------------------------


def address(text: str) -> IPAddress:
    """An address as text (``::ffff:a.b.c.d`` kept as IPv6)."""
    return ipaddress.ip_address(text.split("%", 1)[0])


def seen_as(ep: Endpoint, family: str) -> IPAddress | None:
    """The local address the lookup compares for a packet of ``family``:
    an IPv6 socket takes IPv4 packets on :: (dual-stack) and on a v4-mapped
    address; None when the socket's family cannot take that packet."""
    if family == "ipv6":
        return ep.laddr if ep.family == "ipv6" else None
    if ep.family == "ipv4":
        return ep.laddr
    if ep.laddr == ANY6:
        return ANY4
    mapped = getattr(ep.laddr, "ipv4_mapped", None)
    return mapped


def remote_as(ep: Endpoint, family: str) -> IPAddress | None:
    if ep.family == "ipv6" and family == "ipv4":
        return ANY4 if ep.raddr == ANY6 else getattr(ep.raddr, "ipv4_mapped", None)
    return ep.raddr


def wildcard(family: str) -> IPAddress:
    return ANY4 if family == "ipv4" else ANY6


def device_matches(bound: int, p: Packet) -> bool:
    """inet_bound_dev_eq(): an unbound socket takes packets that do not come
    through a VRF (or any, with l3mdev_accept); a bound one those of its
    device, or of its VRF."""
    if not bound:
        return not p.sdif or p.l3mdev_accept
    return bound == p.dif or bound == p.sdif


# ---- the established table ---------------------------------------------------------


def established(p: Packet, eps: Iterable[Endpoint]) -> Endpoint | None:
    """The socket of exactly this 4-tuple (``__inet_lookup_established``),
    when the source port is known; None otherwise."""
    if p.saddr is None or p.sport is None:
        return None
    for ep in eps:
        if ep.state not in CONNECTION_STATES or ep.lport != p.dport or ep.rport != p.sport:
            continue
        if seen_as(ep, p.family) == p.daddr and remote_as(ep, p.family) == p.saddr:
            if not ep.dev or ep.dev in (p.dif, p.sdif):
                return ep
    return None


# ---- TCP listeners -----------------------------------------------------------------


def judge_listener(ep: Endpoint, p: Packet) -> Judged:
    """compute_score() of inet_hashtables.c / inet6_hashtables.c."""
    if ep.state != "LISTEN":
        return Judged(ep, "none", -1, "not_listening")
    step, excluded = _step(ep, p)
    if excluded:
        return Judged(ep, "none", -1, excluded)
    if not device_matches(ep.dev, p):
        return Judged(ep, step, -1, "other_device" if ep.dev else "vrf_unbound")
    parts = (("address",) if step == "exact" else ()) + (("device",) if ep.dev else ())
    score = 2 if ep.dev else 1
    if p.family == "ipv4" and ep.family == "ipv4":
        score += 1
        parts += ("ipv4",)
    return Judged(ep, step, score, "scored", parts)


def _step(ep: Endpoint, p: Packet) -> tuple[str, str]:
    """Which of the two hash lookups finds the socket (``exact``: bound to
    the destination address, ``wildcard``), or why neither does."""
    excluded = _family_exclusion(ep, p)
    if excluded:
        return "", excluded
    local = seen_as(ep, p.family)
    if local == p.daddr:
        return "exact", ""
    if local == wildcard(p.family):
        return "wildcard", ""
    return "", "other_address"


def _family_exclusion(ep: Endpoint, p: Packet) -> str:
    if p.family == "ipv6" and ep.family == "ipv4":
        return "other_family"
    if p.family == "ipv4" and ep.family == "ipv6":
        if ep.v6only:
            return "v6only"
        if seen_as(ep, "ipv4") is None:
            return "other_address"
        if ep.v6only is None:
            return "v6only_unknown"
    return ""


# ---- UDP ---------------------------------------------------------------------------


def judge_udp(ep: Endpoint, p: Packet) -> Judged:
    """compute_score() of udp.c (IPv4: 2 for an IPv4 socket, 1 for IPv6,
    +4 for each of bound address, connected address, connected port, bound
    device) and of ipv6/udp.c (+1 for each)."""
    step, excluded = _step(ep, p)
    if excluded:
        return Judged(ep, "none", -1, excluded)
    v4 = p.family == "ipv4"
    unit = 4 if v4 else 1
    score = (2 if ep.family == "ipv4" else 1) if v4 else 0
    parts: tuple[str, ...] = ()
    if step == "exact":
        score += unit
        parts += ("address",)
    peer = remote_as(ep, p.family)
    if peer is not None and peer != wildcard(p.family) or ep.rport:
        if p.saddr is None or (ep.rport and p.sport is None):
            return Judged(ep, step, -1, "peer_unknown")
        if peer != p.saddr or (ep.rport and ep.rport != p.sport):
            return Judged(ep, step, -1, "other_peer")
        score += unit * ((peer != wildcard(p.family)) + bool(ep.rport))
        parts += ("connected",)
    if not device_matches(ep.dev, p):
        return Judged(ep, step, -1, "other_device" if ep.dev else "vrf_unbound")
    if ep.dev:
        score += unit
        parts += ("device",)
    if v4 and ep.family == "ipv4":
        parts += ("ipv4",)
    return Judged(ep, step, score, "scored", parts)


def connected(ep: Endpoint) -> bool:
    """A UDP socket connect()-ed to a peer (the kernel's TCP_ESTABLISHED)."""
    return ep.state == "ESTABLISHED"


# ---- one step ----------------------------------------------------------------------


def pick(name: str, judged: list[Judged]) -> Step:
    """The highest score among the step's sockets; ties kept (the hash
    chain's order decides them, and the dump does not show it). Members of
    one reuseport group are not ties: the group picks among them."""
    step = Step(name)
    for j in judged:
        if j.step != name or j.score < 0:
            continue
        if j.score > step.score:
            step.winner, step.score, step.ties = j.endpoint, j.score, []
        elif j.score == step.score and step.winner is not None and not same_group(j.endpoint, step.winner):
            step.ties.append(j.endpoint)
    return step


def judge(ep: Endpoint, p: Packet) -> Judged:
    """The socket as the lookup of the packet's protocol scores it."""
    return judge_listener(ep, p) if p.protocol == "tcp" else judge_udp(ep, p)


def best(judged: list[Judged]) -> Step:
    """The exact-address step's pick, else the wildcard step's (UDP's
    connected sockets and the sk_lookup programs between the two are the
    caller's: tracer/deliver.py)."""
    exact = pick("exact", judged)
    return exact if exact.winner is not None else pick("wildcard", judged)


def same_group(a: Endpoint, b: Endpoint) -> bool:
    return bool(a.group) and a.group == b.group


def beats(winner: Judged, loser: Judged) -> str:
    """The rule by which ``winner`` takes the packet over ``loser`` (both
    could take it): ``group`` (one reuseport group), ``step`` (an earlier
    step: an exact address over the wildcard), a score part of SCORE_PARTS
    the winner has and the loser lacks, or ``order`` (equal scores)."""
    if same_group(winner.endpoint, loser.endpoint):
        return "group"
    if winner.step != loser.step:
        return "step"
    for part in SCORE_PARTS:
        if part in winner.parts and part not in loser.parts:
            return part
    return "order"
