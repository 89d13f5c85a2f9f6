"""The kernel's bind rules, as one pure function: which existing sockets
block a bind (or a listen) with given options, and under which rule.

This mirrors the kernel's own checks rather than a table of cases:

* TCP: ``inet_csk_get_port`` -> ``inet_csk_bind_conflict`` ->
  ``inet_bind_conflict`` (the option and uid rules) and
  ``inet_rcv_saddr_equal`` (the address overlap), net/ipv4/inet_connection_sock.c;
* UDP: ``udp_lib_get_port`` -> ``udp_lib_lport_inuse``, net/ipv4/udp.c.
  One kernel subtlety is not reproduced: UDP stops at the first overlapping
  socket on the port's hash chain, so when one socket would admit the
  newcomer through SO_REUSEPORT and another would refuse it, the chain order
  (not visible from user space) decides. Every blocker is listed instead.

A second subtlety is TCP's SO_REUSEPORT fast path (``sk_reuseport_match``).
Each port's bind bucket caches the uid and address of the last SO_REUSEPORT
socket that got the port (``tb->fastuid``, ``fast_rcv_saddr``, set by
``inet_csk_update_fastreuse`` when it did not match the cache, and kept until
a socket without SO_REUSEPORT binds the port or the bucket empties). A new
SO_REUSEPORT socket of that uid whose address the cached one covers is
accepted with no conflict check at all, even when another socket on the port
would refuse it (one admitted through SO_REUSEADDR, a TIME_WAIT socket).
Which socket set the cache depends on the order of earlier binds and
listens, and it may have closed since: two namespaces with the same sockets
can answer differently (the kernel tests show it). The verdict here is the
full check; :func:`fast_path_candidates` names the live sockets that could
have set the cache, so that the explainer can say the kernel might accept.

Sockets only ever conflict within one network namespace and one protocol on
one port; the caller passes those sockets only. The tests prove every
verdict against the kernel by performing the bind for real.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import operator
from dataclasses import dataclass, fields
from typing import Callable, Iterable, Iterator

TIME_WAIT = "TIME_WAIT"
LISTEN = "LISTEN"
NEW_SYN_RECV = "NEW_SYN_RECV"
SYN_RECV = "SYN_RECV"


@dataclass(frozen=True)
class Sock:
    """A socket as the bind rules see it. For the socket being bound, the
    address and options are the ones of the call; ``listening`` is set when
    the question is a listen() on an already bound socket."""

    protocol: str  # tcp | udp
    family: str  # ipv4 | ipv6
    addr: str
    port: int
    state: str = "CLOSE"
    reuseaddr: bool = False
    reuseport: bool = False
    v6only: bool = False
    bound_dev_if: int = 0
    uid: int = 0
    in_group: bool = False  # already in a reuseport group (UDP rule)
    key: object = None  # the caller's handle (inode, cookie ...), carried along

    @property
    def ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return _parse(self.addr)

    def kind(self) -> tuple:
        """Everything the rules look at: sockets of one kind get the same
        verdict (a busy port's 10,000s of TIME_WAIT sockets are a few kinds)."""
        return _kind_of(self)


# Every field but the caller's handle, so that a field added to Sock counts.
_kind_of = operator.attrgetter(*(f.name for f in fields(Sock) if f.name != "key"))


def distinct(socks: Iterable[Sock]) -> list[Sock]:
    """One socket of each kind: enough to ask whether anything refuses."""
    return list({_kind_of(s): s for s in socks}.values())


@functools.lru_cache(maxsize=65536)
def _parse(addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    # Cached: a port with 100,000 TIME_WAIT sockets has a handful of addresses.
    return ipaddress.ip_address(addr)


class Rule(str, enum.Enum):
    """Why the kernel's exemptions (SO_REUSEADDR, SO_REUSEPORT) do not apply."""

    NO_REUSE = "no_reuse"  # neither option set on both sides
    LISTENER = "listener"  # a listening socket: SO_REUSEADDR never shares with it
    REUSEADDR_ONE_SIDE = "reuseaddr_one_side"  # set on one socket only
    REUSEPORT_ONE_SIDE = "reuseport_one_side"  # set on one socket only
    REUSEPORT_OTHER_UID = "reuseport_other_uid"  # both set, different owners
    REUSEPORT_IN_GROUP = "reuseport_in_group"  # UDP: new socket already in a group
    TIME_WAIT = "time_wait"  # a TIME_WAIT socket and the options do not match
    EPHEMERAL = "ephemeral"  # port 0: the kernel never shares an automatically chosen port


class Overlap(str, enum.Enum):
    """How the two addresses overlap."""

    SAME_ADDRESS = "same_address"
    WILDCARD = "wildcard"  # one side is 0.0.0.0 or :: of the same family
    DUAL_STACK = "dual_stack"  # an IPv6 :: without IPV6_V6ONLY covers IPv4


@dataclass(frozen=True)
class Blocker:
    sock: Sock
    rule: Rule
    overlap: Overlap

    def sentence(self) -> str:
        return f"{RULE_TEXT[self.rule]}; {OVERLAP_TEXT[self.overlap]}"


RULE_TEXT = {
    Rule.NO_REUSE: "neither socket has SO_REUSEADDR or SO_REUSEPORT",
    Rule.LISTENER: "the existing socket is listening: SO_REUSEADDR never shares a port with a "
                   "listener (Linux, unlike BSD); only SO_REUSEPORT on both, same user, does",
    Rule.REUSEADDR_ONE_SIDE: "SO_REUSEADDR is set on one socket only; both need it",
    Rule.REUSEPORT_ONE_SIDE: "SO_REUSEPORT is set on one socket only; both need it",
    Rule.REUSEPORT_OTHER_UID: "both have SO_REUSEPORT but different owners (uids); "
                              "a reuseport group is for one user",
    Rule.REUSEPORT_IN_GROUP: "the new socket is already in a reuseport group",
    Rule.TIME_WAIT: "a TIME_WAIT socket holds the address; it only yields when both it "
                    "and the new socket have SO_REUSEADDR, or both SO_REUSEPORT",
    Rule.EPHEMERAL: "a port chosen by the kernel (port 0): TCP never shares it with an "
                    "overlapping socket, whatever the options; UDP shares it by its usual rules",
}
OVERLAP_TEXT = {
    Overlap.SAME_ADDRESS: "same address",
    Overlap.WILDCARD: "a wildcard address covers the other",
    Overlap.DUAL_STACK: "an IPv6 wildcard without IPV6_V6ONLY also covers IPv4",
}


# ---- address overlap: inet_rcv_saddr_equal(sk, sk2, match_wildcard=true) ----


def _v4_part(s: Sock) -> int | None:
    return _v4_of(s.addr)


@functools.lru_cache(maxsize=65536)
def _v4_of(addr: str) -> int | None:
    """sk_rcv_saddr as the kernel keeps it: the IPv4 address of an IPv4
    socket or of a v4-mapped IPv6 one, 0 for ::, and for any other IPv6
    address a placeholder that matches nothing (LOOPBACK4_IPV6)."""
    ip = _parse(addr)
    if isinstance(ip, ipaddress.IPv4Address):
        return int(ip)
    if ip.ipv4_mapped is not None:
        return int(ip.ipv4_mapped)
    if ip == ipaddress.IPv6Address("::"):
        return 0
    return None


def _v6_kind(s: Sock) -> str:
    """ipv6_addr_type() reduced to what the rule uses: any, mapped, other."""
    if s.family != "ipv6":
        return "mapped"  # inet6_rcv_saddr(ipv4 sock) is NULL: treated as mapped
    return _v6_kind_of(s.addr)


@functools.lru_cache(maxsize=65536)
def _v6_kind_of(addr: str) -> str:
    ip = _parse(addr)
    if ip == ipaddress.IPv6Address("::"):
        return "any"
    return "mapped" if ip.ipv4_mapped is not None else "other"


def overlap(new: Sock, old: Sock) -> Overlap | None:
    """How ``new``'s address overlaps ``old``'s, or None; ``new`` is the
    socket being bound (the kernel's sk), ``old`` an existing one (sk2)."""
    if new.family == "ipv4":
        return _v4_overlap(_v4_part(new), _v4_part(old), old.v6only, old.family)
    kind, kind2 = _v6_kind(new), _v6_kind(old)
    if kind == "mapped" and kind2 == "mapped":
        return _v4_overlap(_v4_part(new), _v4_part(old), old.v6only, old.family)
    if kind == "any" and kind2 == "any":
        return Overlap.SAME_ADDRESS
    if kind2 == "any" and not (old.v6only and kind == "mapped"):
        return Overlap.WILDCARD if kind == "other" else Overlap.DUAL_STACK
    if kind == "any" and not (new.v6only and kind2 == "mapped"):
        return Overlap.WILDCARD if kind2 == "other" else Overlap.DUAL_STACK
    if old.family == "ipv6" and new.ip == old.ip:
        return Overlap.SAME_ADDRESS
    return None


def _v4_overlap(a: int | None, b: int | None, b_v6only: bool, b_family: str) -> Overlap | None:
    """ipv4_rcv_saddr_equal with both wildcards matching."""
    if b_v6only or a is None or b is None:
        return None
    if a == b:
        # 0.0.0.0 against an IPv6 :: is the dual-stack case.
        return Overlap.DUAL_STACK if (a == 0 and b_family == "ipv6") else Overlap.SAME_ADDRESS
    if a == 0 or b == 0:
        return Overlap.DUAL_STACK if b_family == "ipv6" and b == 0 else Overlap.WILDCARD
    return None


def _devices_overlap(a: Sock, b: Sock) -> bool:
    return not a.bound_dev_if or not b.bound_dev_if or a.bound_dev_if == b.bound_dev_if


# ---- the option and uid rules ----------------------------------------------


def tcp_rule(new: Sock, old: Sock, relax: bool = True, reuseport_ok: bool = True) -> Rule | None:
    """inet_bind_conflict(): the Rule that makes ``old`` block ``new``, or None.

    An explicit port is checked with relax and reuseport_ok (the defaults).
    A port the kernel picks (port 0) first with neither (every overlapping
    socket blocks), then, with net.ipv4.ip_autobind_reuse, with relax only:
    SO_REUSEADDR on both shares the port again, unless both also have
    SO_REUSEPORT with one owner (an automatic bind never makes a group)."""
    both_reuse = new.reuseaddr and old.reuseaddr and old.state != LISTEN
    group_like = new.reuseport and old.reuseport and (old.state == TIME_WAIT or new.uid == old.uid)
    if both_reuse:
        if relax and (reuseport_ok or not group_like):
            return None  # relaxed: SO_REUSEADDR on both, the old one not listening
        return Rule.EPHEMERAL
    if reuseport_ok and group_like:
        return None
    if not reuseport_ok:
        return Rule.EPHEMERAL
    if old.state == TIME_WAIT:
        return Rule.TIME_WAIT
    if new.reuseport and old.reuseport:
        return Rule.REUSEPORT_OTHER_UID
    if old.state == LISTEN:
        return Rule.LISTENER
    return _one_sided(new, old)


def udp_rule(new: Sock, old: Sock) -> Rule | None:
    """udp_lib_lport_inuse(): SO_REUSEADDR on both shares the port outright;
    otherwise SO_REUSEPORT on both with one owner, unless the new socket is
    already in a group."""
    if new.reuseaddr and old.reuseaddr:
        return None
    if new.reuseport and old.reuseport:
        if new.in_group:
            return Rule.REUSEPORT_IN_GROUP
        return None if new.uid == old.uid else Rule.REUSEPORT_OTHER_UID
    return _one_sided(new, old)


def _one_sided(new: Sock, old: Sock) -> Rule:
    if new.reuseaddr != old.reuseaddr:
        return Rule.REUSEADDR_ONE_SIDE
    if new.reuseport != old.reuseport:
        return Rule.REUSEPORT_ONE_SIDE
    return Rule.NO_REUSE


def fast_path_candidates(new: Sock, existing: Iterable[Sock]) -> list[Sock]:
    """Live sockets that, had they been the last SO_REUSEPORT socket to get
    the port, would make sk_reuseport_match() accept ``new`` unchecked: TCP,
    an explicit port, SO_REUSEPORT on both, the same uid, and an address
    that covers the new one (the same, or a wildcard that overlaps it)."""
    if new.protocol != "tcp" or not new.port or not new.reuseport or new.in_group:
        return []
    out = []
    for old in existing:
        if old.protocol != "tcp" or old.port != new.port or not old.reuseport \
                or old.uid != new.uid or old.state in (TIME_WAIT, NEW_SYN_RECV, SYN_RECV):
            continue
        how = overlap(new, old)
        if how == Overlap.SAME_ADDRESS or (how is not None and old.ip.is_unspecified):
            out.append(old)
    return out


# ---- the verdict -------------------------------------------------------------


def _tcp_ephemeral_rule(new: Sock, old: Sock) -> Rule | None:
    """inet_csk_find_open_port() checks with relax=false and
    reuseport_ok=false: every overlapping socket blocks."""
    return tcp_rule(new, old, relax=False, reuseport_ok=False)


def _tcp_autobind_reuse_rule(new: Sock, old: Sock) -> Rule | None:
    """The second pass of inet_csk_find_open_port() when the first found no
    port and net.ipv4.ip_autobind_reuse is set: relax=true, reuseport_ok=false."""
    return tcp_rule(new, old, relax=True, reuseport_ok=False)


def blockers(new: Sock, existing: Iterable[Sock], ephemeral: bool | str = False) -> list[Blocker]:
    """Every existing socket that makes the kernel refuse ``new``.

    ``existing`` are the sockets of the same namespace, protocol and port;
    the socket itself (for a listen() question) must not be among them.
    ``ephemeral``: the port is one the kernel considers for a port-0 bind
    (``"autobind_reuse"``: in the second pass that net.ipv4.ip_autobind_reuse
    allows).
    Request sockets (SYN_RECV) do not sit in the bind table and never block.
    """
    return list(_blockers(new, existing, ephemeral))


def refused(new: Sock, existing: Iterable[Sock], ephemeral: bool | str = False) -> bool:
    """Whether any socket blocks ``new``: stops at the first one (a port may
    hold 100,000 TIME_WAIT sockets)."""
    return next(_blockers(new, existing, ephemeral), None) is not None


def _blockers(new: Sock, existing: Iterable[Sock], ephemeral: bool | str) -> Iterator[Blocker]:
    if new.protocol == "tcp":
        rule_of = (_tcp_autobind_reuse_rule if ephemeral == "autobind_reuse"
                   else _tcp_ephemeral_rule if ephemeral else tcp_rule)
    else:
        rule_of = udp_rule  # UDP picks a free port by the same rule (udp_lib_lport_inuse)
    verdicts: dict[tuple, tuple[Rule, Overlap] | None] = {}
    for old in existing:
        kind = _kind_of(old)
        if kind not in verdicts:
            verdicts[kind] = _verdict(new, old, rule_of)
        found = verdicts[kind]
        if found is not None:
            yield Blocker(old, *found)


def _verdict(new: Sock, old: Sock, rule_of: Callable[[Sock, Sock], Rule | None],
             ) -> tuple[Rule, Overlap] | None:
    """Whether ``old`` blocks ``new``: the rule and how they overlap."""
    if old.protocol != new.protocol or old.port != new.port:
        return None
    if old.state in (NEW_SYN_RECV, SYN_RECV):
        return None
    if not _devices_overlap(new, old):
        return None
    how = overlap(new, old)
    if how is None:
        return None
    rule = rule_of(new, old)
    return None if rule is None else (rule, how)
