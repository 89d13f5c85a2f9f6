"""Who takes connections from a listening socket, as opposed to who holds it.

After fork every child holds every socket its parent opened: nginx's master
opens one ``reuseport`` socket per worker and each of its four workers holds
all four, haproxy's threads share one process's table, PID 1 holds what
systemd activates. The fd holders (tracer/inventory.py) are all true and
answer nothing an operator needs. What separates the worker that serves a
socket from the ones that only inherited it is that it waits on it:

* a thread blocked in ``accept()``/``accept4()`` on one of its fds
  (``/proc/PID/task/TID/syscall`` names the call and its first argument);
* a thread blocked in ``poll``/``ppoll``/``select``/``pselect6`` with the
  socket among the fds it waits to read (the array is read from
  ``/proc/PID/mem`` at the address the call was given);
* an epoll set that waits for the socket to become readable
  (``/proc/PID/fdinfo/EPFD`` lists every watched file's inode and events),
  attributed to the threads seen blocked in ``epoll_wait`` on that set, or
  to the process when none was seen blocked (a busy worker is running).

All of it is read from /proc by root, on every kernel portscope runs on, and
costs a few small reads per holder process. A process that cannot be read,
or that waits some other way (io_uring), gives no taker: the member then
shows its holders only, and :attr:`Takers.unseen` counts the processes that
could not be read.
"""

from __future__ import annotations

import os
import platform
import struct
from dataclasses import dataclass, field
from typing import Iterable

# System call numbers by machine (the kernel's syscall tables); a machine
# not here gives epoll sets only, which need no numbers.
_CALLS = {
    "x86_64": {"accept": (43, 288), "epoll": (232, 281, 441), "poll": (7, 271),
               "select": (23, 270)},
    "aarch64": {"accept": (202, 242), "epoll": (22, 441), "poll": (73,), "select": (72,)},
}
EPOLLIN = 0x1
POLLIN = 0x1
MAX_POLL_FDS = 4096  # a poll() over more fds than this is not read
MAX_FD_SCAN = 4096  # a process holding more fds is not searched for epoll sets (its
# threads seen in epoll_wait still name theirs): an inventory stays cheap on a busy host
_POLLFD = struct.Struct("=ihh")


@dataclass(frozen=True, order=True)
class Taker:
    """A thread (or, ``tid`` 0, some thread of a process) that takes
    connections from a socket; ``how``: accept, poll, select or epoll."""

    pid: int
    tid: int
    how: str


@dataclass
class Takers:
    """The takers of each socket inode found by one :meth:`TakerFinder.find`."""

    by_inode: dict[int, tuple[Taker, ...]] = field(default_factory=dict)
    unseen: int = 0  # holder processes whose threads or fds could not be read

    def of(self, inode: int) -> tuple[Taker, ...]:
        return self.by_inode.get(inode, ())


class TakerFinder:
    """Finds takers; remembers between calls which epoll set each thread was
    last seen waiting on, so that a worker busy at the moment of one read is
    still known by the set it waits on between connections."""

    def __init__(self) -> None:
        self.calls = _CALLS.get(platform.machine(), {})
        self._waits_on: dict[tuple[int, int], int] = {}  # (pid, tid) -> epoll fd
        # (pid, tid) -> what it was last seen waiting on in accept, poll or
        # select: a thread busy with a connection at the moment of a read
        # (running, or in another call) is still the one that takes them.
        self._took: dict[tuple[int, int], list[tuple[Taker, int]]] = {}

    def find(self, held: Iterable[tuple[int, int, int]]) -> Takers:
        """``held``: (inode, pid, fd) for every fd holding a socket of interest."""
        fds: dict[int, dict[int, int]] = {}  # pid -> fd -> inode
        for inode, pid, fd in held:
            fds.setdefault(pid, {})[fd] = inode
        wanted = {inode for table in fds.values() for inode in table.values()}
        found: dict[int, set[Taker]] = {}
        out = Takers()
        for pid, table in fds.items():
            try:
                for taker, inode in self._process(pid, table, wanted):
                    found.setdefault(inode, set()).add(taker)
            except OSError:
                out.unseen += 1  # gone since the inventory, or not readable
        # Forget the threads of processes that exited (not of the ones only
        # absent from this call: one finder serves several inventories).
        alive = {pid for pid, _ in [*self._waits_on, *self._took] if os.path.exists(f"/proc/{pid}")}
        self._waits_on = {k: v for k, v in self._waits_on.items() if k[0] in alive}
        self._took = {k: v for k, v in self._took.items() if k[0] in alive}
        out.by_inode = {inode: tuple(sorted(t)) for inode, t in found.items()}
        return out

    def _process(self, pid: int, table: dict[int, int],
                 wanted: set[int]) -> list[tuple[Taker, int]]:
        found: list[tuple[Taker, int]] = []
        epoll_waiters: dict[int, list[int]] = {}  # epoll fd -> tids blocked on it
        tids = _tids(pid)
        for tid in tids:
            took = self._waits(pid, tid, table)
            if took is not None:
                self._took[(pid, tid)] = took
            found += self._took.get((pid, tid), [])
        for key in [k for k in self._took if k[0] == pid and k[1] not in tids]:
            del self._took[key]  # the thread exited
        for (p, tid), epfd in self._waits_on.items():
            if p == pid and tid in tids:  # not a thread that exited since
                epoll_waiters.setdefault(epfd, []).append(tid)
        sets = self._epoll_sets(pid, epoll_waiters)
        for epfd, inodes in sets.items():
            tids = epoll_waiters.get(epfd) or [0]
            for inode in inodes & wanted:
                found += [(Taker(pid, tid, "epoll"), inode) for tid in tids]
        return found

    def _waits(self, pid: int, tid: int, table: dict[int, int]) -> list[tuple[Taker, int]] | None:
        """What the thread waits on now in accept, poll or select (a list,
        maybe empty); None when it is in none of them (running, or in
        another call), so that what it last waited on stands. A thread in
        epoll_wait is remembered with its epoll set instead."""
        call = _syscall(pid, tid)
        if call is None:
            return None
        nr, args = call
        if nr in self.calls.get("accept", ()):
            return [(Taker(pid, tid, "accept"), table[args[0]])] if args[0] in table else []
        if nr in self.calls.get("poll", ()):
            return [(Taker(pid, tid, "poll"), table[fd])
                    for fd in _polled(pid, args[0], args[1]) if fd in table]
        if nr in self.calls.get("select", ()):
            return [(Taker(pid, tid, "select"), table[fd])
                    for fd in _selected(pid, args[1], args[0]) if fd in table]
        if nr in self.calls.get("epoll", ()):
            self._waits_on[(pid, tid)] = args[0]
            return []
        return None

    def _epoll_sets(self, pid: int, waiters: dict[int, list[int]]) -> dict[int, set[int]]:
        """The inodes each epoll set of ``pid`` waits to read: the sets its
        threads were seen waiting on, or, when none was, every set it has."""
        sets = {}
        for epfd in waiters:
            inodes = _epoll_inodes(pid, epfd)
            if inodes is not None:
                sets[epfd] = inodes
        if not sets:
            for epfd in _epoll_fds(pid):
                inodes = _epoll_inodes(pid, epfd)
                if inodes is not None:
                    sets[epfd] = inodes
        return sets


def _tids(pid: int) -> list[int]:
    return [int(name) for name in os.listdir(f"/proc/{pid}/task") if name.isdigit()]


def _syscall(pid: int, tid: int) -> tuple[int, list[int]] | None:
    """The system call a thread is blocked in, with its arguments; None when
    it is running or not in one (or exited since it was listed)."""
    try:
        with open(f"/proc/{pid}/task/{tid}/syscall", "rb") as f:
            words = f.read().split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    if len(words) < 7 or words[0] in (b"running", b"-1"):
        return None
    try:
        return int(words[0]), [int(w, 16) for w in words[1:7]]
    except ValueError:
        return None


def _epoll_fds(pid: int) -> list[int]:
    """Every epoll fd of ``pid`` (none if it holds too many fds to search)."""
    names = os.listdir(f"/proc/{pid}/fd")
    if len(names) > MAX_FD_SCAN:
        return []
    out = []
    for name in names:
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") == "anon_inode:[eventpoll]":
                out.append(int(name))
        except OSError:
            continue  # closed since listed
    return sorted(out)


def _epoll_inodes(pid: int, epfd: int) -> set[int] | None:
    """The inodes an epoll set waits to read (EPOLLIN), from its fdinfo:
    ``tfd: N events: HEX data: HEX pos:N ino:HEX sdev:HEX`` per watched file;
    None when the fd is not an epoll set (any more)."""
    try:
        with open(f"/proc/{pid}/fdinfo/{epfd}", "rb") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    if b"tfd:" not in text:
        return None if b"eventpoll" not in text else set()
    out = set()
    for line in text.splitlines():
        if not line.startswith(b"tfd:"):
            continue
        fields = dict(_pairs(line))
        try:
            if int(fields.get(b"events", b"0"), 16) & EPOLLIN and b"ino" in fields:
                out.add(int(fields[b"ino"], 16))
        except ValueError:
            continue
    return out


def _pairs(line: bytes) -> list[tuple[bytes, bytes]]:
    """``tfd:        5 events:       19 data: ... ino:1a2b`` as (key, value) pairs."""
    tokens = line.replace(b":", b": ").split()
    pairs, key = [], None
    for tok in tokens:
        if tok.endswith(b":"):
            key = tok[:-1]
        elif key is not None:
            pairs.append((key, tok))
            key = None
    return pairs


def _read_mem(pid: int, address: int, size: int) -> bytes:
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.pread(fd, size, address)
    finally:
        os.close(fd)


def _polled(pid: int, address: int, count: int) -> list[int]:
    """The fds a poll() waits to read, from its pollfd array."""
    if not 0 < count <= MAX_POLL_FDS:
        return []
    try:
        raw = _read_mem(pid, address, count * _POLLFD.size)
    except OSError:
        return []
    return [fd for fd, events, _ in _POLLFD.iter_unpack(raw[: len(raw) // 8 * 8])
            if fd >= 0 and events & POLLIN]


def _selected(pid: int, address: int, nfds: int) -> list[int]:
    """The fds a select() waits to read, from its read fd_set."""
    if not address or not 0 < nfds <= MAX_POLL_FDS:
        return []
    try:
        raw = _read_mem(pid, address, (nfds + 63) // 64 * 8)
    except OSError:
        return []
    bits = int.from_bytes(raw, "little")
    return [fd for fd in range(min(nfds, len(raw) * 8)) if bits >> fd & 1]
