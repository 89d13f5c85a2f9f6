"""What `portscope trace` looks up for every event it prints, kept so that a
storm of events costs one look-up per caller or namespace, not per event.

The caller's unit, container and pod (tracer/cgroups.py's CgroupIdentities)
from a made-up /proc and cgroup hierarchy: the cgroup id first,
/proc/PID/cgroup read once per (pid, comm) and kept IDENTITY_TTL_S, read
afresh after that or for another comm on the same pid (a reused pid); trace's
lines, text and JSON, ask the one cache of their Printer. A namespace no
source names (tracer/nsnames.py) is searched for once per walk of /proc."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import pytest

from tracer import cgroups, nsnames, trace
from tracer.cgroups import IDENTITY_TTL_S, CgroupIdentities, CgroupPaths
from tracer.netns import NetnsRef, NetnsScan
from tracer.nsnames import NetnsNames
from tracer.records import CallEvent

from tests.unit.test_hostile_surfaces import EVENT

PID = 4242


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def set_cgroup(proc: Path, pid: int, path: str) -> None:
    (proc / str(pid)).mkdir(parents=True, exist_ok=True)
    (proc / str(pid) / "cgroup").write_text(f"1:name=systemd:/\n0::{path}\n")


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    set_cgroup(tmp_path / "proc", PID, "/system.slice/web.service")
    return tmp_path / "proc"


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """pids whose /proc/PID/cgroup was read, in order."""
    done: list[int] = []
    real = cgroups.cgroup_of

    def counting(pid: int, proc: str = "/proc") -> str | None:
        done.append(pid)
        return real(pid, proc)

    monkeypatch.setattr(cgroups, "cgroup_of", counting)
    return done


def unresolved(proc: Path, clock: Clock) -> CgroupIdentities:
    """Events with cgroup id 0 (a cgroup v1 host): no id resolves."""
    empty = proc.parent / "cgroup2-empty"
    empty.mkdir(exist_ok=True)
    return CgroupIdentities(paths=CgroupPaths(root=str(empty)), proc=str(proc), clock=clock)


def test_one_read_per_pid_and_comm_within_the_lifetime(proc: Path, reads: list[int]) -> None:
    clock = Clock()
    ids = unresolved(proc, clock)
    assert ids.get(PID, 0, "web")["unit"] == "web.service"
    set_cgroup(proc, PID, "/system.slice/moved.service")
    for _ in range(1000):
        clock.now += (IDENTITY_TTL_S - 0.5) / 1000
        assert ids.get(PID, 0, "web")["unit"] == "web.service"
    assert reads == [PID]


def test_read_again_once_the_lifetime_is_over(proc: Path, reads: list[int]) -> None:
    clock = Clock()
    ids = unresolved(proc, clock)
    assert ids.get(PID, 0, "web")["unit"] == "web.service"
    set_cgroup(proc, PID, "/system.slice/moved.service")
    clock.now += IDENTITY_TTL_S
    assert ids.get(PID, 0, "web")["unit"] == "moved.service"
    assert reads == [PID, PID]


def test_a_reused_pid_with_another_comm_is_read_afresh(proc: Path, reads: list[int]) -> None:
    clock = Clock()
    ids = unresolved(proc, clock)
    assert ids.get(PID, 0, "web")["unit"] == "web.service"
    # web exited and its pid went to another program, in another cgroup
    set_cgroup(proc, PID, "/system.slice/docker-" + "ab" * 32 + ".scope")
    clock.now += 0.1
    other = ids.get(PID, 0, "sh")
    assert other["container"] == "ab" * 6 and other["unit"] == "docker-" + "ab" * 32 + ".scope"
    assert reads == [PID, PID]


def test_a_gone_process_is_kept_as_none_too(proc: Path, reads: list[int]) -> None:
    ids = unresolved(proc, Clock())
    assert ids.get(999, 0, "gone") == {"unit": None, "container": None, "pod": None}
    assert ids.get(999, 0, "gone") == {"unit": None, "container": None, "pod": None}
    assert reads == [999]


def test_without_comm_every_call_reads(proc: Path, reads: list[int]) -> None:
    ids = unresolved(proc, Clock())
    for _ in range(3):
        assert ids.get(PID, 0)["unit"] == "web.service"
    assert reads == [PID] * 3


def test_a_resolving_cgroup_id_wins_and_reads_no_proc(tmp_path: Path, proc: Path,
                                                      reads: list[int]) -> None:
    root = tmp_path / "cgroup2"
    (root / "system.slice" / "db.service").mkdir(parents=True)
    ids = CgroupIdentities(paths=CgroupPaths(root=str(root)), proc=str(proc), clock=Clock())
    cgroup_id = (root / "system.slice" / "db.service").stat().st_ino
    assert ids.get(PID, cgroup_id, "web")["unit"] == "db.service"
    assert reads == []
    assert ids.get(PID, 0, "web")["unit"] == "web.service"  # id 0: /proc


def test_the_pid_cache_is_bounded(proc: Path, reads: list[int]) -> None:
    clock = Clock()
    ids = unresolved(proc, clock)
    for pid in range(cgroups.IDENTITY_CACHE + 10):
        ids.get(pid, 0, "many")
    assert len(ids._by_pid) <= cgroups.IDENTITY_CACHE


def test_trace_lines_text_and_json_read_proc_once_per_caller(proc: Path, reads: list[int]) -> None:
    ev = CallEvent.from_json({**EVENT, "pid": PID, "comm": "web", "cgroup_id": 0})
    for as_json in (False, True):
        reads.clear()
        output, out = trace.Output(None), io.StringIO()
        output.stream = out
        printer = trace.Printer(output, as_json, None, identities=unresolved(proc, Clock()))
        for _ in range(50):
            printer.emit(ev)
        lines = out.getvalue().splitlines()
        if as_json:
            assert all('"unit":"web.service"' in line for line in lines)
        else:
            assert all(line.endswith(" unit=web.service") for line in lines[1:])
        assert reads == [PID]


def test_an_unnamed_namespace_is_searched_for_once_per_walk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(nsnames, "time", SimpleNamespace(monotonic=clock))
    host, made_since = 4026531840, 4026532999
    first = NetnsScan([NetnsRef(host, "/proc/1/ns/net", (1,))], 0)
    later = NetnsScan([*first.namespaces, NetnsRef(made_since, "/run/netns/green", ())], 0)
    walks = [later]
    monkeypatch.setattr(nsnames, "list_netns", lambda proc: walks.pop(0))
    names = NetnsNames(first, proc=str(tmp_path), run_netns=(), self_pid=1, refresh_s=1.0)
    searches: list[int] = []
    compute = names._compute
    monkeypatch.setattr(names, "_compute",
                        lambda inode, scan: searches.append(inode) or compute(inode, scan))
    for _ in range(1000):
        clock.now += 0.0009
        assert names.text(made_since) == str(made_since)
    assert searches == [made_since] and walks == [later]
    clock.now += 0.1  # a second after the first walk: walked again, found
    assert names.text(made_since) == f"{made_since} (green)"
    assert names.text(made_since) == f"{made_since} (green)"
    assert searches == [made_since, made_since] and walks == []
