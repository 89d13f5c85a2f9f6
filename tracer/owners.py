"""Process attribution: who a pid is (command, executable, user, unit or
container), read with psutil.

Processes exit and change under our feet, and some cannot be read (other
pid namespaces, hardened /proc). Every failure is counted and the owner is
kept with what could be read: it is never an exception for the caller.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import psutil

from .cgroups import CgroupPaths, cgroup_of, identity_from_cgroup
from .records import CallEvent, Owner

__all__ = ["Owner", "OwnerCache", "caller_of"]

@dataclass
class OwnerCache:
    """Looks each pid up once per inventory and counts what failed."""

    unreadable: int = 0
    problems: list[tuple[str, str]] = field(default_factory=list)  # ("pid 9 (comm)", why)
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
                cgroup = cgroup_of(pid)
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
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            # Gone since its socket was seen: its socket went with it, or
            # another holder has it; nothing that can change an answer.
            return Owner(pid=pid, comm=comm, readable=False, problem="gone")
        except psutil.AccessDenied:
            problem = "permission denied"
        except OSError as exc:
            problem = exc.strerror or str(exc)
        self.unreadable += 1
        self.problems.append((f"pid {pid} ({comm})", problem))
        return Owner(pid=pid, comm=comm, readable=False, problem=problem)


def _quiet(getter):  # type: ignore[no-untyped-def]
    """One attribute that may be unreadable while the others are fine."""
    try:
        return getter()
    except (psutil.AccessDenied, psutil.ZombieProcess, OSError):
        return None


def caller_of(ev: CallEvent, cache: OwnerCache, paths: CgroupPaths) -> Owner:
    """Who made the call ``ev``, read after it: the process if it is still
    the one that called (same command name), else what the event itself
    says (comm, uid, and the unit or container of its cgroup id, which
    outlives the process). A pid reused by another program is not it."""
    owner = cache.get(ev.pid, ev.comm)
    if owner.readable and owner.comm[:15] == ev.comm[:15]:
        return owner
    path = paths.path_of(ev.cgroup_id)
    problem = owner.problem if not owner.readable else "gone (pid reused)"
    return Owner(pid=ev.pid, comm=ev.comm, uid=ev.uid, cgroup=path, readable=False,
                 problem=problem, **identity_from_cgroup(path))
