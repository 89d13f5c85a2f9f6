"""The socket inventory: every TCP and UDP socket in every network namespace,
with what the kernel reports (sock_diag), the flags it does not report
(BPF iterators) and the processes that hold it.

Three sources, joined:

* ``sockdiag``: state, addresses, queues, timers, uid, inode, cookie, one
  namespace at a time, filtered by port in the kernel;
* ``sockflags`` iter/task_file: which process holds which socket inode, and
  the flags of each socket held: SO_REUSEADDR, SO_REUSEPORT, V6ONLY,
  reuseport group (read after the dumps, which assign the cookies). Kernels
  before TCP_BOUND_INACTIVE (6.1 among them) leave bound-only TCP sockets
  out of sock_diag altogether: those the walk finds held in the namespace
  are added from it (:func:`bound_only_records`), so that the explainer sees
  every socket that holds a port on every kernel;
* ``sockflags`` iter/tcp and iter/udp: the same flags for the sockets no
  process holds (TIME_WAIT, request sockets), matched by cookie; walked only
  when the dump found such sockets, since the walk covers the host's whole
  tables.

What could not be read (a namespace that vanished, a process that exited,
a socket with no flags) is counted in the result, never raised.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Iterable, Mapping

from .acceptors import TakerFinder, Takers
from .errors import UsageError
from .netns import NetnsRef, NetnsScan, dump_in, list_netns, open_netns
from .owners import OwnerCache
from .records import Owner, SocketRecord, format_addr
from .sockdiag import SockRecord, StateFilter, state_mask, states_of
from .sockflags import Holder, Iterators, LoadingIterators, SockFlags


@dataclass(frozen=True, slots=True)
class Socket:
    """One socket and everything known about it."""

    diag: SockRecord
    flags: SockFlags | None  # None: no iterator saw it (counted in flags_unknown)
    owners: tuple[Owner, ...]  # every process holding it (several after fork)
    # Seen by the probe on a refused port at the moment of the refusal, and
    # closed before the inventory was taken (onthespot.with_capture).
    gone: bool = False
    fds: tuple[tuple[int, int], ...] = ()  # (pid, fd) of every descriptor holding it

    @property
    def options(self) -> frozenset[str]:
        return self.flags.options if self.flags else frozenset()

    def record(self) -> SocketRecord:
        """The socket's state as a journal snapshot keeps it."""
        d, f = self.diag, self.flags
        grouped = bool(f and f.group)
        return SocketRecord(
            netns=d.netns, protocol=d.protocol, family=d.family, state=d.state,
            addr=d.local_addr, port=d.local_port, dev=d.bound_dev_if, uid=d.uid,
            inode=d.inode, cookie=d.cookie, options=frozenset(f.options) if f else None,
            group=f.group if f and grouped else None,
            group_size=f.group_size if f and grouped else None,
            group_bpf=bool(f.group_bpf_prog) if f and grouped else None,
            owners=tuple(o.kept() for o in sorted(self.owners, key=lambda o: o.pid)))

    def to_json(self) -> dict[str, object]:
        d = self.diag
        f = self.flags
        return {
            "netns": d.netns, "protocol": d.protocol, "family": d.family, "state": d.state,
            "local": format_addr(d.family, d.local_addr, d.local_port),
            "remote": format_addr(d.family, d.remote_addr, d.remote_port),
            "recv_q": d.rqueue, "send_q": d.wqueue,
            "timer": d.timer, "timer_ms": d.timer_ms,
            "uid": d.uid, "inode": d.inode, "cookie": d.cookie,
            "bound_dev_if": d.bound_dev_if,
            "options": sorted(f.options) if f else None,
            "reuseport_group": f.group if f and f.group else None,
            "reuseport_group_size": f.group_size if f and f.group else None,
            "reuseport_bpf": f.group_bpf_prog if f and f.group else None,
            "owners": [o.to_json() for o in self.owners],
        }



@dataclass
class Inventory:
    sockets: list[Socket]
    namespaces: int = 0
    namespaces_gone: int = 0  # vanished between the scan and the dump
    unreadable_processes: int = 0  # /proc entries or owners that could not be read
    flags_unknown: int = 0  # sockets no iterator reported
    notes: list[str] = field(default_factory=list)
    # Which processes (or /run/netns entries) could not be read, and why.
    problems: list[tuple[str, str]] = field(default_factory=list)
    # The walk of namespaces it was taken from (what tracer/nsnames.py names
    # them with, without another walk); None when made by hand.
    scan: NetnsScan | None = None

    def health(self) -> dict[str, int]:
        return {
            "namespaces": self.namespaces,
            "namespaces_gone": self.namespaces_gone,
            "unreadable_processes": self.unreadable_processes,
            "flags_unknown": self.flags_unknown,
        }


def select_namespaces(spec: str | None) -> tuple[list[NetnsRef], int]:
    refs, scan = select_namespaces_scan(spec)
    return refs, scan.unreadable


def select_namespaces_scan(spec: str | None) -> tuple[list[NetnsRef], NetnsScan]:
    """Namespaces matching ``spec`` (None: all): an inode number, an
    ``ip netns`` name, a path to a namespace file, or ``pid:PID``. Anything
    else (an empty name, a path to a file that is not a network namespace,
    such as /etc/passwd or /proc/self/ns/mnt) is one UsageError."""
    scan = list_netns()
    if spec is None:
        return scan.namespaces, scan
    forms = "give an inode number, an ip-netns name, a path to a namespace file, or pid:PID"
    if not spec.strip():
        raise UsageError(f"invalid --netns '': {forms}")
    if spec.isdigit():
        chosen = [ref for ref in scan.namespaces if ref.inode == int(spec)]
    else:
        path = _spec_path(spec)
        inode, problem = network_namespace_inode(path)
        if inode is None:
            raise UsageError(f"no network namespace matches {spec!r} ({path} {problem}): {forms}")
        chosen = [ref for ref in scan.namespaces if ref.inode == inode] or [NetnsRef(inode, path, ())]
    if not chosen:
        raise UsageError(f"no network namespace matches {spec!r}: {forms}")
    return chosen, scan


def _spec_path(spec: str) -> str:
    if spec.startswith("pid:"):
        return f"/proc/{spec[4:]}/ns/net"
    return spec if "/" in spec else f"/run/netns/{spec}"


NS_GET_NSTYPE = 0xB703  # ioctl on a namespace file: which kind it is
CLONE_NEWNET = 0x40000000


def network_namespace_inode(path: str) -> tuple[int | None, str]:
    """The inode of the network namespace at ``path``, or None and why not:
    the path must live on nsfs (checked before opening, so that a FIFO never
    blocks us) and be of the network kind (ioctl NS_GET_NSTYPE)."""
    import fcntl

    try:
        st = os.stat(path)
        if st.st_dev != os.stat("/proc/self/ns/net").st_dev:
            return None, "is not a network namespace"
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None, "does not exist"
    except OSError as exc:
        return None, f"cannot be read ({exc.strerror})"
    try:
        kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError:
        kind = 0
    finally:
        os.close(fd)
    return (st.st_ino, "") if kind == CLONE_NEWNET else (None, "is not a network namespace")


def take(port: int | None = None, protocols: Iterable[str] = ("tcp", "udp"),
         states: StateFilter = None, netns: str | None = None,
         iterators: Iterators | None = None, details: bool = True,
         remote_port: int | None = None, flags: bool = True,
         takers: bool = True, memory: bool = False) -> Inventory:
    """The inventory, optionally only ``port`` (local), ``remote_port``,
    ``protocols``, ``states`` (for all protocols, or per protocol) and one
    namespace (see :func:`select_namespaces`).
    ``details=False``: sock_diag alone, no flags and no owners (cheaper);
    ``flags=False``: owners but no flags (no walk of the socket tables);
    ``takers=False``: the owners of a listener several processes hold are not
    marked by who accepts (:func:`mark_takers`; the group watcher does it
    with a finder of its own); ``memory``: each socket's drops too."""
    refs, scan = select_namespaces_scan(netns)
    protocols = tuple(protocols)
    if states is not None and not isinstance(states, Mapping):
        states = tuple(states)
    inv = Inventory(sockets=[], namespaces=len(refs), unreadable_processes=scan.unreadable,
                    problems=list(scan.problems), scan=scan)
    if not details:
        for ref in refs:
            records = dump_in(ref, protocols, ("ipv4", "ipv6"), states, port, remote_port, memory)
            if records is None:
                inv.namespaces_gone += 1
            inv.sockets.extend(Socket(rec, None, ()) for rec in records or ())
        return inv
    owned_here = iterators is None
    its = iterators or LoadingIterators()  # loads while the namespaces are dumped
    try:
        dumps = [(ref, dump_in(ref, protocols, ("ipv4", "ipv6"), states, port, remote_port, memory))
                 for ref in refs]
        # Who holds each socket is read after the dumps: a socket bound
        # between an earlier walk and its dump would be shown with no owner.
        holders = _holders_by_inode(its.holders(port))
        owners = OwnerCache()
        for ref, records in dumps:
            if records is None:
                inv.namespaces_gone += 1
                continue
            walked = _walk_tables(ref, records, holders, its, port) if flags else None
            bound_only = bound_only_records(ref.inode, records, holders, states_of(states, "tcp")) \
                if "tcp" in protocols else []
            _join(records + bound_only, walked, holders, owners, inv)
        inv.unreadable_processes += owners.unreadable
        inv.problems += owners.problems
        if takers:
            inv.sockets = mark_takers(inv.sockets)
        return inv
    finally:
        if owned_here:
            its.close()


def mark_takers(sockets: list[Socket], finder: TakerFinder | None = None,
                found: Takers | None = None, every: bool = False) -> list[Socket]:
    """Of each listening socket (a TCP listener, an unconnected UDP socket)
    that several processes hold, mark the owners that take its connections
    (``accepts``) and put them first (tracer/acceptors.py); the others only
    inherited it. Left unmarked when no holder was seen waiting on it.
    ``found``: takers already found (by the group watcher); ``every``: look
    at sockets held by one process too."""
    shared = [i for i, s in enumerate(sockets)
              if s.diag.state in ("LISTEN", "CLOSE")
              and len({pid for pid, _ in s.fds}) > (0 if every else 1)]
    if not shared:
        return sockets
    if found is None:
        found = (finder or TakerFinder()).find(
            (sockets[i].diag.inode, pid, fd) for i in shared for pid, fd in sockets[i].fds)
    out = list(sockets)
    for i in shared:
        s = sockets[i]
        pids = {t.pid for t in found.of(s.diag.inode)}
        if pids:
            marked = [replace(o, accepts=o.pid in pids) for o in s.owners]
            marked.sort(key=lambda o: not o.accepts)
            out[i] = replace(s, owners=tuple(marked))
    return out


def _holders_by_inode(holders: list[Holder]) -> dict[int, list[Holder]]:
    by_inode: dict[int, list[Holder]] = {}
    for h in holders:
        if h.sock.inode:
            by_inode.setdefault(h.sock.inode, []).append(h)
    return by_inode


def _walk_tables(ref: NetnsRef, records: list[SockRecord], holders: dict[int, list[Holder]],
                 its: Iterators, port: int | None) -> dict[int, SockFlags]:
    """The flags of the dumped sockets no process holds (TIME_WAIT, request
    sockets, a socket in flight), by cookie, from a walk of the socket
    tables; None when the namespace is gone. A held socket's flags come
    with its holder (iter/task_file reads the same fields), so when every
    dumped socket is held there is no walk: on a host with a big TCP table,
    the walk, not the matching sockets, is what it costs."""
    cookies = {rec.cookie for rec in records if rec.cookie and not holders.get(rec.inode)}
    if not cookies:
        return {}
    fd = open_netns(ref)
    if fd is None:
        return {}
    try:
        return {f.cookie: f for f in its.sockets(fd, port, cookies)}
    finally:
        os.close(fd)


def _join(records: list[SockRecord], walked: dict[int, SockFlags] | None,
          holders: dict[int, list[Holder]], owners: OwnerCache, inv: Inventory) -> None:
    """One namespace's sockets, with their flags (from their holder or the
    table walk; ``walked`` None: flags not asked for) and owners, into ``inv``."""
    for rec in records:
        held = holders.get(rec.inode, []) if rec.inode else []
        flag = held[0].sock if held else (walked or {}).get(rec.cookie)
        if flag is None and walked is not None:
            inv.flags_unknown += 1
        if held:
            pids = sorted({h.pid: h.comm for h in held}.items())
            inv.sockets.append(Socket(rec, flag, tuple(owners.get(pid, comm) for pid, comm in pids),
                                      fds=tuple((h.pid, h.fd) for h in held)))
        else:  # most sockets of a busy port (TIME_WAIT): no process holds them
            inv.sockets.append(Socket(rec, flag, ()))


def bound_only_records(netns: int, records: list[SockRecord],
                       holders: dict[int, list[Holder]],
                       states: tuple[str, ...] | None) -> list[SockRecord]:
    """Bound-only TCP sockets of ``netns`` that processes hold but that
    sock_diag did not report (kernels without TCP_BOUND_INACTIVE), built from
    what iter/task_file read in the socket itself."""
    if states is not None and not state_mask(states) & state_mask(("CLOSE",)):
        return []
    reported = {rec.inode for rec in records}
    out = []
    for inode, held in holders.items():
        f = held[0].sock
        if (inode in reported or f.netns != netns or f.protocol != "tcp"
                or f.state != "CLOSE" or not f.port):
            continue
        unspecified = "::" if f.family == "ipv6" else "0.0.0.0"
        out.append(SockRecord(
            netns=f.netns, protocol="tcp", family=f.family, state="CLOSE",
            local_addr=f.addr, local_port=f.port, remote_addr=unspecified, remote_port=0,
            rqueue=0, wqueue=0, timer=None, timer_ms=0, uid=f.sock_uid, inode=inode,
            cookie=f.cookie, bound_dev_if=f.bound_dev_if))
    return out
