"""Names for network namespaces, shown beside their inode.

Every command prints a namespace as its inode (``4026532248``), the number
the kernel and portscope's events use; a person knows it by another name.
:class:`NetnsNames` gives each inode a short label, the first that applies:

* ``host``: the namespace of PID 1 (or, where PID 1 cannot be read, as in
  a container or a sandbox, of kthreadd, whose namespace is always the
  kernel's initial one; else of the topmost ancestor of this process that
  can be read);
* its ``ip netns`` name (a bind mount in /run/netns or /var/run/netns);
  a name that could be read as one of the other labels is shown as
  ``netns NAME``;
* ``pod UID`` or ``container ID`` (12 hex digits): the Kubernetes pod or
  the container of a process in the namespace, from its cgroup path
  (tracer/cgroups.py);
* else none.

Each source is read at most once per :class:`NetnsNames` (one per command
run), and the process walk is the one :func:`tracer.netns.list_netns`
already made for the command when it is given. A long-running command (a
trace) passes ``refresh_s``: an inode it has not seen makes it look again,
at most that often.

Names are written by whoever can create a file in /run/netns: they are kept
exact (JSON escapes them) and shown only through
:func:`tracer.text.printable`.
"""

from __future__ import annotations

import os
import re
import time
from typing import Iterable

from .cgroups import cgroup_of, identity_from_cgroup
from .netns import PROC, RUN_NETNS, NetnsScan, _scan_named, list_netns
from .text import printable

HOST = "host"
OTHER_RUN_NETNS = "/var/run/netns"  # the same directory as /run/netns almost everywhere
PF_KTHREAD = 0x00200000
# Processes of one namespace whose cgroups are read for a container or pod
# (the first that names one is enough; a namespace with none costs this many).
CGROUP_READS = 16
_POD_UID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_RESERVED = ("container ", "pod ", "netns ")


def name_label(name: str) -> str:
    """An ``ip netns`` name as a label: itself, unless a reader could take it
    for another kind of label (``host``, ``container ...``): ``netns NAME``."""
    return f"netns {name}" if name == HOST or name.startswith(_RESERVED) else name


def identity_label(cgroup: str | None) -> str | None:
    """``pod UID`` or ``container ID`` from a cgroup path, else None. Only a
    pod uid shaped as Kubernetes writes it counts (a podman pod's cgroup,
    ``libpod_pod_<id>``, is not one)."""
    ident = identity_from_cgroup(cgroup)
    pod = ident["pod"]
    if pod and _POD_UID.fullmatch(pod):
        return f"pod {pod}"
    return f"container {ident['container']}" if ident["container"] else None


def with_netns_name(doc: dict[str, object], names: "NetnsNames") -> dict[str, object]:
    """``doc`` with ``netns_name`` (the label, or None) right after ``netns``."""
    out: dict[str, object] = {}
    for key, value in doc.items():
        out[key] = value
        if key == "netns":
            out["netns_name"] = names.label(value) if isinstance(value, int) else None
    return out


class NetnsNames:
    """inode -> label (see the module's text), cached."""

    def __init__(self, scan: NetnsScan | None = None, proc: str = PROC,
                 run_netns: Iterable[str] = (OTHER_RUN_NETNS,), refresh_s: float | None = None,
                 self_pid: int | None = None) -> None:
        """``scan``: the command's own walk (else one is made at the first
        label); ``run_netns``: directories of names beyond the scan's
        /run/netns (read when they are another directory)."""
        self._scan = scan
        self._proc = proc
        self._extra_dirs = tuple(run_netns)
        self._refresh_s = refresh_s
        self._self_pid = os.getpid() if self_pid is None else self_pid
        self._scanned_at = time.monotonic() if scan is not None else 0.0
        self._labels: dict[int, str | None] = {}
        # inodes no source names, not in the walk of _scanned_at: the answer
        # stays None until the next walk (a trace's every event would else
        # search the walk and the names again)
        self._missed: dict[int, float] = {}
        self._host: int | None = None
        self._host_known = False
        self._extra_names: dict[int, str] | None = None

    def label(self, inode: int) -> str | None:
        """The namespace's label, exact (not escaped), or None."""
        if inode in self._labels:
            return self._labels[inode]
        if (self._missed.get(inode) == self._scanned_at and self._refresh_s is not None
                and time.monotonic() - self._scanned_at < self._refresh_s):
            return None
        scan = self._current_scan(inode)
        found = self._compute(inode, scan)
        # An inode no walk found yet may be a namespace made since: asked
        # again after refresh_s; any other answer is kept.
        known = any(ref.inode == inode for ref in scan.namespaces)
        if known or self._refresh_s is None or found is not None:
            self._labels[inode] = found
        else:
            if len(self._missed) >= 4096:
                self._missed.clear()
            self._missed[inode] = self._scanned_at
        return found

    def describe(self, inode: int) -> str:
        """``4026532248 (blue)``, or the inode alone; not escaped (for a
        cell its caller escapes whole)."""
        found = self.label(inode)
        return f"{inode} ({found})" if found else str(inode)

    def text(self, inode: int) -> str:
        """:meth:`describe`, escaped for a terminal."""
        return printable(self.describe(inode))

    # -- the sources

    def _current_scan(self, inode: int) -> NetnsScan:
        if self._scan is None:
            self._rescan()
        elif (self._refresh_s is not None
              and all(ref.inode != inode for ref in self._scan.namespaces)
              and time.monotonic() - self._scanned_at >= self._refresh_s):
            self._rescan()
            self._extra_names = None
        assert self._scan is not None
        return self._scan

    def _rescan(self) -> None:
        self._scan = list_netns(self._proc)
        self._scanned_at = time.monotonic()

    def _compute(self, inode: int, scan: NetnsScan) -> str | None:
        if inode == self._host_inode(scan):
            return HOST
        ref = next((r for r in scan.namespaces if r.inode == inode), None)
        if ref is not None and ref.name is not None:
            return name_label(ref.name)
        extra = self._names_elsewhere().get(inode)
        if extra is not None:
            return name_label(extra)
        if ref is None:
            return None
        for pid in ref.pids[:CGROUP_READS]:
            found = identity_label(cgroup_of(pid, self._proc))
            if found:
                return found
        return None

    def _names_elsewhere(self) -> dict[int, str]:
        """inode -> name in the other directories of names (each read once)."""
        if self._extra_names is None:
            self._extra_names = {}
            try:
                nsfs_dev = os.stat(f"{self._proc}/self/ns/net").st_dev
                main = os.path.realpath(RUN_NETNS)
            except OSError:
                return self._extra_names
            for directory in self._extra_dirs:
                if os.path.realpath(directory) == main:
                    continue
                named, _ = _scan_named(directory, nsfs_dev)
                for found, path in named.items():
                    self._extra_names.setdefault(found, path.rpartition("/")[2])
        return self._extra_names

    def _host_inode(self, scan: NetnsScan) -> int | None:
        if self._host_known:
            return self._host
        netns_of = {pid: ref.inode for ref in scan.namespaces for pid in ref.pids}
        host = netns_of.get(1)
        if host is None and self._is_kthread(2):
            host = netns_of.get(2)
        if host is None:  # the topmost ancestor of ours we can read
            pid, seen = self._self_pid, 0
            while pid > 0 and seen < 4096:
                host = netns_of.get(pid, host)
                pid, seen = self._ppid(pid), seen + 1
        self._host, self._host_known = host, True
        return host

    def _stat_fields(self, pid: int) -> list[str]:
        """/proc/PID/stat after the name (which may hold spaces and parens)."""
        try:
            with open(f"{self._proc}/{pid}/stat", "rb") as f:
                return f.read().rpartition(b")")[2].decode("ascii", "replace").split()
        except OSError:
            return []

    def _ppid(self, pid: int) -> int:
        fields = self._stat_fields(pid)
        return int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else 0

    def _is_kthread(self, pid: int) -> bool:
        fields = self._stat_fields(pid)
        return (len(fields) > 6 and fields[1] == "0" and fields[6].isdigit()
                and bool(int(fields[6]) & PF_KTHREAD))


def netns_named(explanation: dict[str, object], scan: NetnsScan | None) -> dict[str, object]:
    """An explanation's JSON (``why --json``) with ``netns_name`` beside each
    blocker's ``netns``."""
    names = NetnsNames(scan)
    blockers = explanation.get("blockers")
    if isinstance(blockers, list):
        explanation["blockers"] = [with_netns_name(b, names) for b in blockers]
    return explanation
