"""Who closed each TCP connection first: the kernel-side ``ps_closers`` map,
and the command line of each process that closed one (``ps_closer_args``).

Every running collector (trace, and the commands built on the engine)
records active closes in its own LRU maps and pins them in bpffs as
``/sys/fs/bpf/portscope/closers-PID`` and ``closer-args-PID``, so that a
separate, short-lived process (``portscope timewait``, ``why``, ``ports``)
can attribute TIME_WAIT sockets to the process that left them, even after
that process exited: its pid, uid, name and command line were read in the
kernel at the close; its unit, container and pod come from its cgroup id,
while that cgroup exists. The pins go when their collector stops; pins
left by a collector that died are removed by the next one (their programs
are gone, so they would only hold memory), and meanwhile are read but not
counted as a running collector.
"""

from __future__ import annotations

import ctypes
import glob
import os
import socket
import subprocess
from dataclasses import dataclass, replace
from typing import Iterable

from . import libbpf
from .events import Clock
from .layout import PsCloser, PsConnKey, PsProcArgs
from .records import TCP_STATES
from .text import system_text

BPFFS = "/sys/fs/bpf"
# Where collectors pin their maps; another directory keeps two portscope
# deployments (or a test) apart.
PIN_DIR = os.environ.get("PORTSCOPE_PIN_DIR", f"{BPFFS}/portscope")

ConnKey = tuple[int, str, str, int, str, int]  # netns, family, laddr, lport, raddr, rport



@dataclass(frozen=True, slots=True)
class Closer:
    pid: int
    uid: int
    comm: str
    cgroup_id: int
    time: float  # wall clock of the close
    from_state: str
    cmdline: str | None = None  # read in the kernel at the process's first close
    unit: str | None = None  # from the cgroup id, while the cgroup exists
    container: str | None = None

    def label(self) -> str:
        where = self.container and f"container {self.container}" or self.unit
        return f"{self.comm}[{self.pid}]" + (f" ({where})" if where else "")

    def to_json(self) -> dict[str, object]:
        return {"pid": self.pid, "uid": self.uid, "comm": self.comm, "cmdline": self.cmdline,
                "unit": self.unit, "container": self.container, "cgroup_id": self.cgroup_id,
                "time": self.time, "from_state": self.from_state}


def pin_path(pid: int | None = None, what: str = "closers") -> str:
    return f"{PIN_DIR}/{what}-{pid or os.getpid()}"


def publish(closers: "libbpf.Map | libbpf.FdMap",
            args: "libbpf.Map | libbpf.FdMap | None" = None) -> str | None:
    """Pin our maps for other portscope processes; None if bpffs is not to be
    had (attribution then works only inside this process)."""
    if not _bpffs_ready():
        return None
    _prune_dead()
    path = pin_path()
    try:
        closers.pin(path)
        if args is not None:
            args.pin(pin_path(what="closer-args"))
    except OSError:
        return None
    return path


def withdraw(closers: "libbpf.Map | libbpf.FdMap", path: str | None,
             args: "libbpf.Map | libbpf.FdMap | None" = None) -> None:
    if path:
        for pinned, where in ((closers, path), (args, pin_path(what="closer-args"))):
            if pinned is None:
                continue
            try:
                pinned.unpin(where)
            except OSError:
                pass


def _bpffs_ready() -> bool:
    if not os.path.ismount(BPFFS):
        subprocess.run(["mount", "-t", "bpf", "bpf", BPFFS], capture_output=True)
    if not os.path.ismount(BPFFS):
        return False
    os.makedirs(PIN_DIR, mode=0o700, exist_ok=True)
    return True


def _prune_dead() -> None:
    for path in glob.glob(f"{PIN_DIR}/closers-*") + glob.glob(f"{PIN_DIR}/closer-args-*"):
        pid = path.rsplit("-", 1)[-1]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            try:
                os.unlink(path)
            except OSError:
                pass


def read_pinned(clock: Clock | None = None) -> tuple[dict[ConnKey, Closer], int]:
    """Every close recorded by every collector whose map is pinned, and how
    many of those collectors are running (0: nobody is watching now).

    A collector that was killed (SIGKILL, a crash) leaves its pin behind: its
    records up to its end are still true and are used, but it is not counted
    as recording. Running means: the process named in the pin still holds
    that very map (its id in /proc/PID/fdinfo), so a reused pid does not
    count either."""
    clock = clock or Clock()
    found: dict[ConnKey, Closer] = {}
    running = 0
    for pid, fd, args_fd in _pinned():
        try:
            running += _holds_map(pid, libbpf.map_id(fd, "ps_closers"))
            found.update(read_fd(fd, clock, args_fd))
        finally:
            os.close(fd)
            if args_fd is not None:
                os.close(args_fd)
    return found, running


def running_collectors() -> int:
    """How many collectors are recording closes now."""
    running = 0
    for pid, fd, args_fd in _pinned():
        running += _holds_map(pid, libbpf.map_id(fd, "ps_closers"))
        os.close(fd)
        if args_fd is not None:
            os.close(args_fd)
    return running


def lookup(keys: Iterable[ConnKey], clock: Clock | None = None) -> dict[ConnKey, Closer]:
    """The closers of these connections only (one map lookup per key and
    collector: a port's few blockers on a host with 65,536 recorded closes)."""
    keys = list(keys)
    clock = clock or Clock()
    found: dict[ConnKey, Closer] = {}
    if not keys:
        return found
    for _pid, fd, args_fd in _pinned():
        try:
            for key in keys:
                raw = libbpf.FdMap(fd, "ps_closers", ctypes.sizeof(PsConnKey),
                                   ctypes.sizeof(PsCloser), 0).lookup(
                    raw_key(key), ctypes.sizeof(PsCloser))
                if raw is not None:
                    found[key] = _closer(PsCloser.from_buffer_copy(raw), clock, args_fd)
        finally:
            os.close(fd)
            if args_fd is not None:
                os.close(args_fd)
    return _identified(found)


def _pinned() -> Iterable[tuple[int, int, int | None]]:
    """(pid, closers fd, args fd or None) of every pinned collector."""
    for path in sorted(glob.glob(f"{PIN_DIR}/closers-*")):
        pid = path.rsplit("-", 1)[-1]
        if not pid.isdigit():
            continue
        try:
            fd = libbpf.open_pinned(path)
        except OSError:
            continue
        try:
            args_fd: int | None = libbpf.open_pinned(pin_path(int(pid), "closer-args"))
        except OSError:
            args_fd = None
        yield int(pid), fd, args_fd


def _holds_map(pid: int, map_id: int) -> bool:
    """Whether process ``pid`` has the BPF map ``map_id`` open."""
    wanted = f"map_id:\t{map_id}\n"
    try:
        fds = os.listdir(f"/proc/{pid}/fdinfo")
    except OSError:
        return False
    for fd in fds:
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                if wanted in f.read():
                    return True
        except OSError:
            continue
    return False


def read_fd(fd: int, clock: Clock, args_fd: int | None = None) -> dict[ConnKey, Closer]:
    ksz, vsz = ctypes.sizeof(PsConnKey), ctypes.sizeof(PsCloser)
    out: dict[ConnKey, Closer] = {}
    for kraw, vraw in libbpf.lookup_batch(fd, ksz, vsz, "ps_closers"):
        out[conn_key(PsConnKey.from_buffer_copy(kraw))] = _closer(
            PsCloser.from_buffer_copy(vraw), clock, args_fd)
    return _identified(out)


_ARGS_CACHE: dict[tuple[int, int], str | None] = {}


def _closer(v: PsCloser, clock: Clock, args_fd: int | None) -> Closer:
    cmdline = None
    if args_fd is not None:
        key = (args_fd, v.pid)
        if key not in _ARGS_CACHE:
            raw = libbpf.FdMap(args_fd, "ps_closer_args", 4, ctypes.sizeof(PsProcArgs), 0).lookup(
                v.pid.to_bytes(4, "little"), ctypes.sizeof(PsProcArgs))
            _ARGS_CACHE[key] = _args_text(PsProcArgs.from_buffer_copy(raw)) if raw else None
        cmdline = _ARGS_CACHE[key]
    return Closer(v.pid, v.uid, system_text(v.comm), v.cgroup_id, clock.wall(v.ts_ns),
                  TCP_STATES.get(v.from_state, str(v.from_state)), cmdline)


def _args_text(a: PsProcArgs) -> str | None:
    if not a.len:
        return None
    raw = bytes(a.args)[:a.len].rstrip(b"\0")
    return system_text(raw.replace(b"\0", b" ")) or None


def _identified(found: dict[ConnKey, Closer]) -> dict[ConnKey, Closer]:
    """Unit and container of each closer, from its cgroup id (while the
    cgroup exists: a stopped service's cgroup is gone)."""
    from .cgroups import CgroupPaths, identity_from_cgroup

    paths = CgroupPaths()
    named: dict[int, dict[str, str | None]] = {}
    out = {}
    for key, c in found.items():
        if c.cgroup_id not in named:
            named[c.cgroup_id] = identity_from_cgroup(paths.path_of(c.cgroup_id))
        who = named[c.cgroup_id]
        out[key] = replace(c, unit=who["unit"], container=who["container"])
    return out


def raw_key(key: ConnKey) -> bytes:
    netns, family, laddr, lport, raddr, rport = key
    k = PsConnKey()
    k.netns, k.sport, k.dport = netns, lport, rport
    fam = socket.AF_INET6 if family == "ipv6" else socket.AF_INET
    k.family = fam
    for field, addr in (("saddr", laddr), ("daddr", raddr)):
        packed = socket.inet_pton(fam, addr)
        ctypes.memmove(ctypes.addressof(k) + getattr(PsConnKey, field).offset, packed, len(packed))
    return bytes(k)


def conn_key(k: PsConnKey) -> ConnKey:
    if k.family == socket.AF_INET6:
        fam, size, name = socket.AF_INET6, 16, "ipv6"
    else:
        fam, size, name = socket.AF_INET, 4, "ipv4"
    return (k.netns, name, socket.inet_ntop(fam, bytes(k.saddr)[:size]), k.sport,
            socket.inet_ntop(fam, bytes(k.daddr)[:size]), k.dport)
