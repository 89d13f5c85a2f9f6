"""Process attribution: who a pid is (command, executable, user, unit or
container), read with psutil.

Processes exit and change under our feet, and some cannot be read (other
pid namespaces, hardened /proc). Every failure is counted and the owner is
kept with what could be read: it is never an exception for the caller.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field

import psutil

# Container runtimes and systemd leave recognisable cgroup path segments.
_CONTAINER = re.compile(r"(?:docker|cri-containerd|crio|libpod)[-/:]([0-9a-f]{12,64})")
_UNIT = re.compile(r"/([^/]+\.(?:service|scope))(?:/|$)")
_POD = re.compile(r"pod([0-9a-f_-]{36})")


@dataclass(frozen=True, slots=True)
class Owner:
    pid: int
    comm: str
    exe: str | None = None
    cmdline: str | None = None
    user: str | None = None
    uid: int | None = None
    cgroup: str | None = None
    unit: str | None = None  # systemd unit, when the cgroup path names one
    container: str | None = None  # container id (12 chars), when it does
    pod: str | None = None  # Kubernetes pod uid
    readable: bool = True  # False: the process vanished or could not be read

    def label(self) -> str:
        where = self.container and f"container {self.container}" or self.unit
        return f"{self.comm}[{self.pid}]" + (f" ({where})" if where else "")

    def to_json(self) -> dict[str, object]:
        return {
            "pid": self.pid, "comm": self.comm, "exe": self.exe, "cmdline": self.cmdline,
            "user": self.user, "uid": self.uid, "cgroup": self.cgroup, "unit": self.unit,
            "container": self.container, "pod": self.pod, "readable": self.readable,
        }


def identity_from_cgroup(path: str | None) -> dict[str, str | None]:
    """unit, container and pod from a cgroup v2 path."""
    if not path:
        return {"unit": None, "container": None, "pod": None}
    container = _CONTAINER.search(path)
    unit = _UNIT.findall(path)
    pod = _POD.search(path)
    return {
        "unit": unit[-1] if unit else None,
        "container": container.group(1)[:12] if container else None,
        "pod": pod.group(1).replace("_", "-") if pod else None,
    }


@dataclass
class OwnerCache:
    """Looks each pid up once per inventory and counts what failed."""

    unreadable: int = 0
    _seen: dict[int, Owner] = field(default_factory=dict)

    def get(self, pid: int, comm: str) -> Owner:
        if pid not in self._seen:
            self._seen[pid] = self._read(pid, comm)
        return self._seen[pid]

    def _read(self, pid: int, comm: str) -> Owner:
        try:
            proc = psutil.Process(pid)
            with proc.oneshot():
                uids = proc.uids()
                cgroup = _cgroup(pid)
                return Owner(
                    pid=pid,
                    comm=proc.name() or comm,
                    exe=_quiet(proc.exe),
                    cmdline=" ".join(_quiet(proc.cmdline) or []) or None,
                    user=_quiet(proc.username),
                    uid=uids.effective,
                    cgroup=cgroup,
                    **identity_from_cgroup(cgroup),
                )
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            self.unreadable += 1
            return Owner(pid=pid, comm=comm, readable=False)


def _quiet(getter):  # type: ignore[no-untyped-def]
    """One attribute that may be unreadable while the others are fine."""
    try:
        return getter()
    except (psutil.AccessDenied, psutil.ZombieProcess, OSError):
        return None


def _cgroup(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].strip()
    except OSError:
        pass
    return None


class CgroupPaths:
    """cgroup v2 ids (what BPF's bpf_get_current_cgroup_id() puts in each
    event: the inode of the cgroup's directory) back to their paths.

    Resolving by id rather than through /proc/PID/cgroup still works after
    the process exited, which is the common case for a failed bind. The
    hierarchy is walked once and again on a miss, at most once a second."""

    def __init__(self, root: str | None = None) -> None:
        self.root = root or _cgroup2_root()
        self._paths: dict[int, str] = {}
        self._walked = 0.0

    def path_of(self, cgroup_id: int) -> str | None:
        if not self.root or not cgroup_id:
            return None
        if cgroup_id not in self._paths and time.monotonic() - self._walked >= 1.0:
            self._walk()
        return self._paths.get(cgroup_id)

    def _walk(self) -> None:
        self._walked = time.monotonic()
        paths: dict[int, str] = {}
        root = self.root or ""
        for dirpath, dirnames, _ in os.walk(root):
            try:
                paths[os.stat(dirpath).st_ino] = "/" + os.path.relpath(dirpath, root).lstrip(".")
            except OSError:
                continue  # a cgroup removed during the walk
        self._paths = paths


def _cgroup2_root() -> str | None:
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                _, mnt, fstype = line.split()[:3]
                if fstype == "cgroup2":
                    return mnt
    except OSError:
        pass
    return None


class CgroupIdentities:
    """unit, container and pod of an event: from its cgroup id when the
    cgroup still exists, else from /proc/PID/cgroup (None each when the path
    names none, or both are gone). What ``trace --json``, ``record --jsonl``
    and ``export`` add to each event."""

    def __init__(self) -> None:
        self._paths = CgroupPaths()
        self._by_path: dict[str | None, dict[str, str | None]] = {}

    def get(self, pid: int, cgroup_id: int = 0) -> dict[str, str | None]:
        path = self._paths.path_of(cgroup_id) or _cgroup(pid)
        if path not in self._by_path:
            if len(self._by_path) >= 4096:
                self._by_path.clear()
            self._by_path[path] = identity_from_cgroup(path)
        return self._by_path[path]
