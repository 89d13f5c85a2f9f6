"""Which unit, container or pod a process or an event belongs to, from its
cgroup v2 path. No psutil here: `trace` imports this and must start with
nothing beyond the standard library."""

from __future__ import annotations

import os
import re
import time

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


class CgroupIdentities:
    """unit, container and pod of an event: from its cgroup id when the
    cgroup still exists, else from /proc/PID/cgroup (None each when the path
    names none, or both are gone). What ``trace --json``, ``record --jsonl``
    and ``export`` add to each event."""

    def __init__(self) -> None:
        self._paths = CgroupPaths()
        self._by_path: dict[str | None, dict[str, str | None]] = {}

    def get(self, pid: int, cgroup_id: int = 0) -> dict[str, str | None]:
        path = self._paths.path_of(cgroup_id) or cgroup_of(pid)
        if path not in self._by_path:
            if len(self._by_path) >= 4096:
                self._by_path.clear()
            self._by_path[path] = identity_from_cgroup(path)
        return self._by_path[path]
