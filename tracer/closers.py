"""Who closed each TCP connection first: the kernel-side ``ps_closers`` map.

Every running collector (trace, and the commands built on the engine)
records active closes in its own LRU map and pins it in bpffs as
``/sys/fs/bpf/portscope/closers-PID``, so that ``portscope timewait`` — a
separate, short-lived process — can attribute TIME_WAIT sockets to the
process that left them, even after that process exited. The pin goes when
its collector stops; pins left by a collector that died are removed by the
next one (their programs are gone, so they would only hold memory).
"""

from __future__ import annotations

import ctypes
import glob
import os
import socket
import subprocess
from dataclasses import dataclass

from . import libbpf
from .events import Clock
from .layout import PsCloser, PsConnKey
from .text import system_text

BPFFS = "/sys/fs/bpf"
# Where collectors pin their maps; another directory keeps two portscope
# deployments (or a test) apart.
PIN_DIR = os.environ.get("PORTSCOPE_PIN_DIR", f"{BPFFS}/portscope")

ConnKey = tuple[int, str, str, int, str, int]  # netns, family, laddr, lport, raddr, rport

TCP_STATES = {1: "ESTABLISHED", 3: "SYN_RECV", 8: "CLOSE_WAIT"}


@dataclass(frozen=True, slots=True)
class Closer:
    pid: int
    uid: int
    comm: str
    cgroup_id: int
    time: float  # wall clock of the close
    from_state: str

    def to_json(self) -> dict[str, object]:
        return {"pid": self.pid, "uid": self.uid, "comm": self.comm,
                "cgroup_id": self.cgroup_id, "time": self.time, "from_state": self.from_state}


def pin_path(pid: int | None = None) -> str:
    return f"{PIN_DIR}/closers-{pid or os.getpid()}"


def publish(closers: "libbpf.Map | libbpf.FdMap") -> str | None:
    """Pin our map for other portscope processes; None if bpffs is not to be
    had (attribution then works only inside this process)."""
    if not _bpffs_ready():
        return None
    _prune_dead()
    path = pin_path()
    try:
        closers.pin(path)
    except OSError:
        return None
    return path


def withdraw(closers: "libbpf.Map | libbpf.FdMap", path: str | None) -> None:
    if path:
        try:
            closers.unpin(path)
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
    for path in glob.glob(f"{PIN_DIR}/closers-*"):
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
    for path in sorted(glob.glob(f"{PIN_DIR}/closers-*")):
        try:
            fd = libbpf.open_pinned(path)
        except OSError:
            continue
        try:
            pid = path.rsplit("-", 1)[-1]
            running += pid.isdigit() and _holds_map(int(pid), libbpf.map_id(fd, "ps_closers"))
            found.update(read_fd(fd, clock))
        finally:
            os.close(fd)
    return found, running


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


def read_fd(fd: int, clock: Clock) -> dict[ConnKey, Closer]:
    ksz, vsz = ctypes.sizeof(PsConnKey), ctypes.sizeof(PsCloser)
    out: dict[ConnKey, Closer] = {}
    for kraw, vraw in libbpf.lookup_batch(fd, ksz, vsz, "ps_closers"):
        k, v = PsConnKey.from_buffer_copy(kraw), PsCloser.from_buffer_copy(vraw)
        out[conn_key(k)] = Closer(v.pid, v.uid, system_text(v.comm), v.cgroup_id,
                                  clock.wall(v.ts_ns), TCP_STATES.get(v.from_state,
                                                                      str(v.from_state)))
    return out


def conn_key(k: PsConnKey) -> ConnKey:
    if k.family == socket.AF_INET6:
        fam, size, name = socket.AF_INET6, 16, "ipv6"
    else:
        fam, size, name = socket.AF_INET, 4, "ipv4"
    return (k.netns, name, socket.inet_ntop(fam, bytes(k.saddr)[:size]), k.sport,
            socket.inet_ntop(fam, bytes(k.daddr)[:size]), k.dport)
