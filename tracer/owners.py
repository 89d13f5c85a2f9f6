"""Process attribution: who a pid is (command, executable, user, unit or
container), read with psutil.

Processes exit and change under our feet, and some cannot be read (other
pid namespaces, hardened /proc). Every failure is counted and the owner is
kept with what could be read: it is never an exception for the caller.
"""

from __future__ import annotations

import re
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


class CgroupIdentities:
    """``identity_from_cgroup`` of /proc/PID/cgroup, cached per pid (for
    ``ttl`` seconds, and at most ``size`` pids): what ``trace --json``,
    ``record --jsonl`` and ``export`` add to each event as ``unit``,
    ``container`` and ``pod`` (None each when the path names none, or the
    process is already gone)."""

    def __init__(self, ttl: float = 5.0, size: int = 4096) -> None:
        self.ttl = ttl
        self.size = size
        self._cache: dict[int, tuple[float, dict[str, str | None]]] = {}

    def get(self, pid: int) -> dict[str, str | None]:
        import time

        now = time.monotonic()
        hit = self._cache.get(pid)
        if hit is not None and now - hit[0] < self.ttl:
            return hit[1]
        identity = identity_from_cgroup(_cgroup(pid))
        if len(self._cache) >= self.size:
            self._cache = {p: v for p, v in self._cache.items() if now - v[0] < self.ttl}
            if len(self._cache) >= self.size:
                self._cache.clear()
        self._cache[pid] = (now, identity)
        return identity
