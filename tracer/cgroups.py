"""Which unit, container or pod a process or an event belongs to, from its
cgroup v2 path. No psutil here: `trace` imports this and must start with
nothing beyond the standard library."""

from __future__ import annotations

import os
import re
import time
from typing import Callable

# Container runtimes and systemd leave recognisable cgroup path segments.
_CONTAINER = re.compile(r"(?:docker|cri-containerd|crio|libpod)[-/:]([0-9a-f]{12,64})")
_UNIT = re.compile(r"/([^/]+\.(?:service|scope))(?:/|$)")
_POD = re.compile(r"pod([0-9a-f_-]{36})")


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


def cgroup_of(pid: int, proc: str = "/proc") -> str | None:
    try:
        with open(f"{proc}/{pid}/cgroup", errors="surrogateescape") as f:
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
        self.root = root or cgroup2_root()
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
                paths[os.stat(dirpath).st_ino] = ("/" if dirpath == root
                                                  else "/" + os.path.relpath(dirpath, root))
            except OSError:
                continue  # a cgroup removed during the walk
        self._paths = paths


def cgroup2_root() -> str | None:
    try:
        with open("/proc/self/mounts", errors="surrogateescape") as f:
            for line in f:
                _, mnt, fstype = line.split()[:3]
                if fstype == "cgroup2":
                    return mnt
    except OSError:
        pass
    return None


# How long an identity read from /proc/PID/cgroup is kept for that pid.
IDENTITY_TTL_S = 5.0
IDENTITY_CACHE = 4096  # entries, of paths and of pids, before one is emptied


class CgroupIdentities:
    """unit, container and pod of an event: from its cgroup id when the
    cgroup still exists, else from /proc/PID/cgroup (None each when the path
    names none, or both are gone). What ``trace`` (each line, text or
    ``--json``), ``record --jsonl`` and ``export`` add to each event.

    The id is looked up for every event (a dictionary, the hierarchy walked
    again at most once a second on a miss). /proc/PID/cgroup, the fallback
    when the id does not resolve (a cgroup v1 or hybrid host, a cgroup gone),
    costs a file read: when the caller gives the event's ``comm`` it is read
    once per (pid, comm) and kept ``ttl_s`` seconds, so a storm of one
    process's calls reads it once, and a pid reused by another program
    (another comm) is read afresh. Without ``comm`` it is read every time."""

    def __init__(self, ttl_s: float = IDENTITY_TTL_S, paths: CgroupPaths | None = None,
                 proc: str = "/proc", clock: Callable[[], float] = time.monotonic) -> None:
        self._paths = paths if paths is not None else CgroupPaths()
        self._by_path: dict[str | None, dict[str, str | None]] = {}
        self._by_pid: dict[tuple[int, str], tuple[float, str | None]] = {}
        self._ttl_s = ttl_s
        self._proc = proc
        self._clock = clock

    def get(self, pid: int, cgroup_id: int = 0,
            comm: str | None = None) -> dict[str, str | None]:
        path = self._paths.path_of(cgroup_id) or self._proc_path(pid, comm)
        if path not in self._by_path:
            if len(self._by_path) >= IDENTITY_CACHE:
                self._by_path.clear()
            self._by_path[path] = identity_from_cgroup(path)
        return self._by_path[path]

    def _proc_path(self, pid: int, comm: str | None) -> str | None:
        if comm is None:
            return cgroup_of(pid, self._proc)
        now = self._clock()
        key = (pid, comm)
        kept = self._by_pid.get(key)
        if kept is not None and now < kept[0]:
            return kept[1]
        if len(self._by_pid) >= IDENTITY_CACHE:
            self._by_pid = {k: v for k, v in self._by_pid.items() if now < v[0]}
            if len(self._by_pid) >= IDENTITY_CACHE:
                self._by_pid.clear()
        path = cgroup_of(pid, self._proc)
        self._by_pid[key] = (now + self._ttl_s, path)
        return path
