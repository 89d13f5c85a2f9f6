"""The socket inventory: every TCP and UDP socket in every network namespace,
with what the kernel reports (sock_diag), the flags it does not report
(BPF iterators) and the processes that hold it.

Three sources, joined:

* ``sockdiag``: state, addresses, queues, timers, uid, inode, cookie, one
  namespace at a time, filtered by port in the kernel;
* ``sockflags`` iter/tcp and iter/udp: SO_REUSEADDR, SO_REUSEPORT, V6ONLY,
  reuseport group, matched by cookie (sock_diag assigns the cookie, so the
  dump runs first);
* ``sockflags`` iter/task_file: which process holds which socket inode, and
  the flags of sockets iter/tcp does not walk (bound-only TCP). Kernels
  before TCP_BOUND_INACTIVE (6.1 among them) leave bound-only TCP sockets
  out of sock_diag altogether: those the walk finds held in the namespace
  are added from it (:func:`bound_only_records`), so that the explainer sees
  every socket that holds a port on every kernel.

What could not be read (a namespace that vanished, a process that exited,
a socket with no flags) is counted in the result, never raised.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterable

from .errors import UsageError
from .netns import NetnsRef, dump_in, list_netns, open_netns
from .owners import Owner, OwnerCache
from .sockdiag import SockRecord, dump, state_mask
from .sockflags import Holder, SocketIterators, SockFlags


@dataclass(frozen=True, slots=True)
class Socket:
    """One socket and everything known about it."""

    diag: SockRecord
    flags: SockFlags | None  # None: no iterator saw it (counted in flags_unknown)
    owners: tuple[Owner, ...]  # every process holding it (several after fork)

    @property
    def options(self) -> frozenset[str]:
        return self.flags.options if self.flags else frozenset()

    def to_json(self) -> dict[str, object]:
        d = self.diag
        f = self.flags
        return {
            "netns": d.netns, "protocol": d.protocol, "family": d.family, "state": d.state,
            "local": _endpoint(d.family, d.local_addr, d.local_port),
            "remote": _endpoint(d.family, d.remote_addr, d.remote_port),
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


def _endpoint(family: str, addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if family == "ipv6" else f"{addr}:{port}"


@dataclass
class Inventory:
    sockets: list[Socket]
    namespaces: int = 0
    namespaces_gone: int = 0  # vanished between the scan and the dump
    unreadable_processes: int = 0  # /proc entries or owners that could not be read
    flags_unknown: int = 0  # sockets no iterator reported
    notes: list[str] = field(default_factory=list)

    def health(self) -> dict[str, int]:
        return {
            "namespaces": self.namespaces,
            "namespaces_gone": self.namespaces_gone,
            "unreadable_processes": self.unreadable_processes,
            "flags_unknown": self.flags_unknown,
        }


def select_namespaces(spec: str | None) -> tuple[list[NetnsRef], int]:
    """Namespaces matching ``spec`` (None: all): an inode number, an
    ``ip netns`` name, a path to a namespace file, or ``pid:PID``."""
    scan = list_netns()
    if spec is None:
        return scan.namespaces, scan.unreadable
    inode = _spec_inode(spec)
    chosen = [ref for ref in scan.namespaces if ref.inode == inode]
    if not chosen and inode is not None:
        path = _spec_path(spec)
        chosen = [NetnsRef(inode, path, ())] if path else []
    if not chosen:
        raise UsageError(f"no network namespace matches {spec!r}: give an inode number, an "
                         "ip-netns name, a path to a namespace file, or pid:PID")
    return chosen, scan.unreadable


def _spec_path(spec: str) -> str | None:
    if spec.startswith("pid:"):
        return f"/proc/{spec[4:]}/ns/net"
    if spec.isdigit():
        return None
    return spec if "/" in spec else f"/run/netns/{spec}"


def _spec_inode(spec: str) -> int | None:
    if spec.isdigit():
        return int(spec)
    path = _spec_path(spec)
    try:
        return os.stat(path).st_ino if path else None
    except OSError:
        return None


def take(port: int | None = None, protocols: Iterable[str] = ("tcp", "udp"),
         states: Iterable[str] | None = None, netns: str | None = None,
         iterators: SocketIterators | None = None, details: bool = True) -> Inventory:
    """The inventory, optionally only ``port`` (local), ``protocols``,
    ``states`` and one namespace (see :func:`select_namespaces`).
    ``details=False``: sock_diag alone, no flags and no owners (cheaper)."""
    refs, unreadable = select_namespaces(netns)
    protocols = tuple(protocols)
    states = None if states is None else tuple(states)
    inv = Inventory(sockets=[], namespaces=len(refs), unreadable_processes=unreadable)
    if not details:
        for ref in refs:
            records = dump_in(ref, protocols, ("ipv4", "ipv6"), states, port)
            if records is None:
                inv.namespaces_gone += 1
            inv.sockets.extend(Socket(rec, None, ()) for rec in records or ())
        return inv
    owned_here = iterators is None
    its = iterators or SocketIterators()
    try:
        dumps = [(ref, _dump_one(ref, port, protocols, states, its)) for ref in refs]
        # Who holds each socket is read after the dumps: a socket bound
        # between an earlier walk and its dump would be shown with no owner.
        holders = _holders_by_inode(its.holders(port))
        owners = OwnerCache()
        for ref, dumped in dumps:
            if dumped is None:
                inv.namespaces_gone += 1
                continue
            records, flags = dumped
            _join(ref, records, flags, states, holders, owners, inv)
        inv.unreadable_processes += owners.unreadable
        return inv
    finally:
        if owned_here:
            its.close()


def _holders_by_inode(holders: list[Holder]) -> dict[int, list[Holder]]:
    by_inode: dict[int, list[Holder]] = {}
    for h in holders:
        if h.sock.inode:
            by_inode.setdefault(h.sock.inode, []).append(h)
    return by_inode


def _dump_one(ref: NetnsRef, port: int | None, protocols: tuple[str, ...],
              states: tuple[str, ...] | None, its: SocketIterators,
              ) -> tuple[list[SockRecord], dict[int, SockFlags]] | None:
    """One namespace's sockets (sock_diag) and their flags by cookie (the
    iterators); None when the namespace is gone."""
    fd = open_netns(ref)
    if fd is None:
        return None
    try:
        records = dump(fd, protocols, ("ipv4", "ipv6"), states, port)
        # After the dump: sock_diag gives every socket its cookie.
        flags = {f.cookie: f for f in its.sockets(fd, port) if f.cookie}
    finally:
        os.close(fd)
    return records, flags


def _join(ref: NetnsRef, records: list[SockRecord], flags: dict[int, SockFlags],
          states: tuple[str, ...] | None, holders: dict[int, list[Holder]],
          owners: OwnerCache, inv: Inventory) -> None:
    """One namespace's sockets, with their flags and owners, into ``inv``."""
    records = records + bound_only_records(ref.inode, records, holders, states)
    for rec in records:
        held = holders.get(rec.inode, []) if rec.inode else []
        flag = flags.get(rec.cookie) or (held[0].sock if held else None)
        if flag is None:
            inv.flags_unknown += 1
        pids = sorted({h.pid: h.comm for h in held}.items())
        inv.sockets.append(Socket(rec, flag, tuple(owners.get(pid, comm) for pid, comm in pids)))


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
