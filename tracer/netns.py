"""Network namespaces on the host, and the socket inventory across all of them.

A port is only ever held within one network namespace, and on a host with
containers most sockets are not in ours. Namespaces are found where they are
kept alive: by processes (``/proc/PID/ns/net``) and by ``ip netns`` names
(``/run/netns/NAME``, bind mounts of the namespace file). They are told apart
by inode, the same number as ``netns`` in portscope's events.

Processes come and go during a scan: one that vanished or cannot be read is
counted in ``unreadable``, never raised, so that a busy host still gets an
answer and the answer says what it could not see.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable

from .nsenter import in_netns
from .sockdiag import SockRecord, StateFilter, dump

PROC = "/proc"
RUN_NETNS = "/run/netns"


@dataclass(frozen=True, slots=True)
class NetnsRef:
    """One network namespace and how to enter it."""

    inode: int
    path: str  # /run/netns/NAME when it has a name, else /proc/PID/ns/net
    pids: tuple[int, ...]  # processes in it, ascending

    @property
    def name(self) -> str | None:
        """The ``ip netns`` name, if the namespace has one."""
        head, _, tail = self.path.rpartition("/")
        return tail if head == RUN_NETNS else None


@dataclass(frozen=True, slots=True)
class NetnsScan:
    namespaces: list[NetnsRef]  # ascending inode
    unreadable: int  # processes or /run/netns entries that could not be read
    # Which, and why: ("pid 812", "permission denied"), ("/run/netns/x", ...).
    problems: tuple[tuple[str, str], ...] = ()


def list_netns(proc: str = PROC, run_netns: str = RUN_NETNS) -> NetnsScan:
    """Every distinct network namespace held by a process or an ``ip netns`` name."""
    nsfs_dev = os.stat(f"{proc}/self/ns/net").st_dev
    pids_by_inode, unreadable = _scan_processes(proc, nsfs_dev)
    names_by_inode, unnamed = _scan_named(run_netns, nsfs_dev)
    problems = tuple(unreadable + unnamed)
    inodes = sorted(pids_by_inode.keys() | names_by_inode.keys())
    namespaces = [
        NetnsRef(inode,
                 names_by_inode.get(inode) or f"{proc}/{min(pids_by_inode[inode])}/ns/net",
                 tuple(sorted(pids_by_inode.get(inode, ()))))
        for inode in inodes
    ]
    return NetnsScan(namespaces, len(problems), problems)


def _scan_processes(proc: str, nsfs_dev: int) -> tuple[dict[int, list[int]], list[tuple[str, str]]]:
    """Namespace inode -> pids, and the processes that could not be read (why).

    Only thread-group leaders are listed in /proc; a thread that setns()'d
    alone (as ours do, briefly) is not seen.
    """
    pids_by_inode: dict[int, list[int]] = {}
    unreadable: list[tuple[str, str]] = []
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        try:
            st = os.stat(f"{entry.path}/ns/net")
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited since the listing: its sockets went with it
        except OSError as exc:  # not ours to read (another PID namespace, hardened /proc)
            unreadable.append((f"pid {entry.name}", exc.strerror or "unreadable"))
            continue
        if st.st_dev != nsfs_dev:
            unreadable.append((f"pid {entry.name}", "its namespace is on another nsfs"))
            continue
        pids_by_inode.setdefault(st.st_ino, []).append(int(entry.name))
    return pids_by_inode, unreadable


def _scan_named(run_netns: str, nsfs_dev: int) -> tuple[dict[int, str], list[tuple[str, str]]]:
    """Namespace inode -> /run/netns path, and how many entries are not
    namespaces (a file left behind by a failed ``ip netns add`` is a plain
    file on tmpfs, not a mounted namespace)."""
    named: dict[int, str] = {}
    broken: list[tuple[str, str]] = []
    try:
        entries = sorted(os.scandir(run_netns), key=lambda e: e.name)
    except FileNotFoundError:  # no namespace was ever named on this host
        return named, []
    for entry in entries:
        try:
            st = os.stat(entry.path)
        except OSError as exc:
            broken.append((entry.path, exc.strerror or "unreadable"))
            continue
        if st.st_dev != nsfs_dev:
            broken.append((entry.path, "not a mounted namespace"))
            continue
        named.setdefault(st.st_ino, entry.path)
    return named, broken


def open_netns(ref: NetnsRef) -> int | None:
    """An O_RDONLY fd on the namespace, or None if it is gone.

    Tries the name, then each process. A pid may have been reused by a
    process in another namespace since the scan, so the inode is checked.
    """
    candidates = [ref.path] + [f"{PROC}/{pid}/ns/net" for pid in ref.pids]
    for path in candidates:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, ProcessLookupError):
            continue
        if os.fstat(fd).st_ino == ref.inode:
            return fd
        os.close(fd)
    return None


def dump_in(ref: NetnsRef, protocols: Iterable[str] = ("tcp", "udp"),
            families: Iterable[str] = ("ipv4", "ipv6"), states: StateFilter = None,
            port: int | None = None, remote_port: int | None = None,
            memory: bool = False) -> list[SockRecord] | None:
    """``sockdiag.dump`` inside one namespace; None if the namespace is gone."""
    fd = open_netns(ref)
    if fd is None:
        return None
    try:
        return dump(fd, protocols, families, states, port, remote_port, memory)
    finally:
        os.close(fd)


def dump_all(port: int | None = None, protocols: Iterable[str] = ("tcp", "udp"),
             families: Iterable[str] = ("ipv4", "ipv6"), states: Iterable[str] | None = None,
             scan: NetnsScan | None = None) -> list[SockRecord]:
    """Every socket in every network namespace (``scan`` or a fresh one).

    A namespace that disappeared between the scan and its dump (its last
    process exited, its name was deleted) is skipped: its sockets were
    closed with it, so there is nothing left to report.
    """
    scan = scan or list_netns()
    protocols, families = tuple(protocols), tuple(families)
    states = None if states is None else tuple(states)
    records: list[SockRecord] = []
    for ref in scan.namespaces:
        records.extend(dump_in(ref, protocols, families, states, port) or ())
    return records


@dataclass(frozen=True, slots=True)
class PortRange:
    """net.ipv4.ip_local_port_range and ip_local_reserved_ports of a namespace."""

    low: int
    high: int
    reserved: frozenset[int]  # reserved ports inside [low, high]

    @property
    def usable(self) -> int:
        return self.high - self.low + 1 - len(self.reserved)


def port_range(ref: NetnsRef | None = None) -> PortRange | None:
    """The namespace's ephemeral range (default: our own); None if it is gone.
    /proc/sys/net shows the namespace of the reading thread, hence in_netns."""
    if ref is None:
        return _read_port_range()
    fd = open_netns(ref)
    if fd is None:
        return None
    try:
        return in_netns(fd, _read_port_range)
    finally:
        os.close(fd)


def _read_port_range() -> PortRange:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low, high = map(int, f.read().split())
    reserved: set[int] = set()
    with open("/proc/sys/net/ipv4/ip_local_reserved_ports") as f:
        for part in filter(None, f.read().strip().split(",")):
            lo, _, hi = part.partition("-")
            reserved.update(range(max(int(lo), low), min(int(hi or lo), high) + 1))
    return PortRange(low, high, frozenset(reserved))
