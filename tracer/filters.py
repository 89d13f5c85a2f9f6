"""The filters people know from ``ss``, one definition for every listing
command (``ports``, ``why``'s blockers, ``timewait``, ``groups``, ``trace``).

A :class:`Filter` holds the criteria the options gave (tracer/commands/
common.py adds the options, tracer/arguments.py checks each value). Criteria
combine with AND; the values of one repeated option with OR. Its ``matches_*``
methods take what each command lists: a socket of the inventory (with who
closed it, for a socket no process holds), an owner list, a trace event, a
reuseport group or one of its member events.

What a socket's process criteria (``--pid``, ``--comm``, ``--uid``,
``--unit``) look at: its holders, one of which must match all of them; for a
socket no process holds (TIME_WAIT, an orphan), the process that closed it
when a portscope collector recorded it. ``--uid`` also matches the socket's
own uid (the UID column), except where the kernel reports none (TIME_WAIT
and request sockets, which it reports as 0).

Addresses match literally (a listener on 0.0.0.0 matches ``--src
0.0.0.0/0``, not ``--src 127.0.0.1``), an IPv4-mapped IPv6 address as its
IPv4 form. ``--dport``/``--dst`` only match sockets that have a remote end.
"""

from __future__ import annotations

import argparse
import ipaddress
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any, Callable, Iterable, Protocol

from .errors import UsageError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# The states in which the kernel reports no uid of a socket (it sends 0).
_NO_UID_STATES = ("TIME_WAIT", "SYN_RECV")
# Calls whose requested address is the local one (connect's is the peer's).
_LOCAL_CALLS = ("bind", "listen", "get_port", "listen_close")


class Holder(Protocol):
    """What a process criterion reads: an Owner, or a closers.Closer."""

    pid: int
    comm: str
    uid: int | None
    unit: str | None


@lru_cache(maxsize=65536)
def _address(text: str) -> Address | None:
    """A socket's address as the filters compare it: an IPv4-mapped IPv6
    address as its IPv4 form; None when it does not parse."""
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _within(text: str, networks: Iterable[Network]) -> bool:
    addr = _address(text)
    return addr is not None and any(addr.version == n.version and addr in n for n in networks)


@dataclass(frozen=True)
class Filter:
    sports: frozenset[int] = frozenset()
    dports: frozenset[int] = frozenset()
    srcs: tuple[Network, ...] = ()
    dsts: tuple[Network, ...] = ()
    pids: frozenset[int] = frozenset()
    comms: frozenset[str] = frozenset()
    uids: frozenset[int] = frozenset()
    units: frozenset[str] = frozenset()
    netns: tuple[str, ...] = ()  # as the user named them
    inodes: frozenset[int] | None = None  # ``netns`` resolved (:meth:`resolved`); None: not yet

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Filter":
        """The criteria of the options ``add_filter_options`` added (absent
        options are no criterion)."""
        def values(name: str) -> list:
            return list(getattr(args, name, None) or ())

        return cls(sports=frozenset(values("sport")), dports=frozenset(values("dport")),
                   srcs=tuple(dict.fromkeys(values("src"))), dsts=tuple(dict.fromkeys(values("dst"))),
                   pids=frozenset(values("pid")), comms=frozenset(values("comm")),
                   uids=frozenset(values("uid")), units=frozenset(values("unit")),
                   netns=tuple(dict.fromkeys(values("netns"))))

    # -- what it asks

    @property
    def process(self) -> bool:
        """Whether a criterion looks at processes (pid, comm, uid, unit)."""
        return bool(self.pids or self.comms or self.uids or self.units)

    @property
    def remote(self) -> bool:
        """Whether a criterion needs a remote end (--dport, --dst)."""
        return bool(self.dports or self.dsts)

    @property
    def active(self) -> bool:
        return bool(self.sports or self.remote or self.srcs or self.process or self.netns)

    def namespace(self) -> str | None:
        """What the inventory is asked for: the one namespace named, else
        None (every namespace; several named are chosen by :meth:`matches_netns`)."""
        return self.netns[0] if len(self.netns) == 1 else None

    def resolved(self) -> "Filter":
        """With the namespaces named resolved to their inodes, once (a bad
        name is one UsageError here, before anything is loaded)."""
        if not self.netns or self.inodes is not None:
            return self
        from .inventory import select_namespaces

        inodes: set[int] = set()
        for spec in self.netns:
            refs, _ = select_namespaces(spec)
            inodes.update(ref.inode for ref in refs)
        return replace(self, inodes=frozenset(inodes))

    def local_ports(self, given: Iterable[int] = ()) -> list[int] | None:
        """The local ports to ask the kernel for: the positional PORTs and
        --sport must both hold (None: any port). A UsageError when they
        cannot: no socket has two local ports."""
        given = set(given)
        if given and self.sports:
            both = given & self.sports
            if not both:
                raise UsageError(f"PORT {_listed(given)} and --sport {_listed(self.sports)} can "
                                 "never both match: a socket has one local port")
            return sorted(both)
        chosen = given or self.sports
        return sorted(chosen) if chosen else None

    # -- matching

    def matches_netns(self, netns: int) -> bool:
        return not self.netns or self.inodes is None or netns in self.inodes

    def matches_endpoints(self, netns: int, local_addr: str, local_port: int,
                          remote_addr: str = "", remote_port: int = 0) -> bool:
        """The address criteria, of one socket's two ends (``remote_port`` 0:
        it has no remote end, which --dport and --dst never match)."""
        return self.matches_netns(netns) and self._local(local_addr, local_port) \
            and self._remote(remote_addr, remote_port)

    def _local(self, addr: str, port: int) -> bool:
        return (not self.sports or port in self.sports) and (
            not self.srcs or _within(addr, self.srcs))

    def _remote(self, addr: str, port: int) -> bool:
        if not self.remote:
            return True
        return bool(port) and (not self.dports or port in self.dports) and (
            not self.dsts or _within(addr, self.dsts))

    def matches_holder(self, h: Holder, sock_uid: int | None = None) -> bool:
        """Whether one process meets every process criterion."""
        if self.pids and h.pid not in self.pids:
            return False
        if self.comms and h.comm not in self.comms:
            return False
        if self.uids and h.uid not in self.uids and sock_uid not in self.uids:
            return False
        return not self.units or self._unit(h.unit)

    def _unit(self, unit: str | None) -> bool:
        if not unit:
            return False
        return unit in self.units or (unit.endswith(".service") and unit[:-8] in self.units)

    def matches_owners(self, owners: Iterable[Holder], sock_uid: int | None = None) -> bool:
        """Whether one of ``owners`` meets every process criterion; with no
        owner, only a --uid alone can match (the socket's ``sock_uid``)."""
        if not self.process:
            return True
        owners = tuple(owners)
        if owners:
            return any(self.matches_holder(o, sock_uid) for o in owners)
        return not (self.pids or self.comms or self.units) and sock_uid in self.uids

    def matches_socket(self, s: Any, closer: Holder | None = None) -> bool:
        """An inventory socket (tracer.inventory.Socket), with the process
        that closed it when no process holds it."""
        d = s.diag
        if not self.matches_endpoints(d.netns, d.local_addr, d.local_port, d.remote_addr,
                                      d.remote_port):
            return False
        owners: tuple = s.owners or ((closer,) if closer is not None else ())
        return self.matches_owners(owners, sock_uid(d))

    def matches_event(self, e: Any, unit_of: Callable[[Any], str | None] | None = None) -> bool:
        """A trace event (records.CallEvent): its local end is what it asked
        for (bind, listen) and what it holds after; a connect's remote end
        is its destination. ``unit_of`` gives an event's systemd unit."""
        if not self.matches_netns(e.netns):
            return False
        local = [(e.bound_addr, e.bound_port)] if e.bound_port else []
        remote: tuple[str, int] = ("", 0)
        if e.call == "connect":
            remote = (e.addr, e.port)
        else:
            local.append((e.addr, e.port))
        if (self.sports or self.srcs) and not any(self._local(a, p) for a, p in local):
            return False
        if not self._remote(*remote):
            return False
        if self.pids and e.pid not in self.pids:
            return False
        if self.comms and e.comm not in self.comms:
            return False
        if self.uids and e.uid not in self.uids and e.sock_uid not in self.uids:
            return False
        return not self.units or self._unit(unit_of(e) if unit_of else None)

    def matches_group(self, g: Any) -> bool:
        """A reuseport group (records.Group): its address and port, and one
        member held by a process that meets the process criteria."""
        if not self.matches_endpoints(g.netns, g.addr, g.port):
            return False
        return not self.process or any(self.matches_owners(m.owners) for m in g.members)

    def matches_member_event(self, e: Any) -> bool:
        """A member joining or leaving a group (records.MemberEvent)."""
        return self.matches_endpoints(e.netns, e.addr, e.port) and self.matches_owners(e.owners)


def sock_uid(d: Any) -> int | None:
    """The uid the kernel reports of a socket (a SockRecord), None where it
    reports none."""
    if d.state in _NO_UID_STATES or (d.state == "FIN_WAIT2" and d.timer == "timewait"):
        return None
    return d.uid


def _listed(values: Iterable[int]) -> str:
    return ", ".join(str(v) for v in sorted(values))
