"""What the kernel allocates for the maps portscope loads, and how many
objects a process loads: every map the loaded programs use at the size its
configuration gives, every other map not created at all (tracer/engine.py
decides before load, from tracer/elfmaps.py), and one object per process
whatever parts it reads (tracer/loader.py). The oracle is the kernel's own
account of each descriptor the process holds (/proc/self/fd, fdinfo)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tracer import elfmaps
from tracer.coreobject import map_sizes
from tracer.engine import DEFAULT_OBJECT, EngineConfig, Need
from tracer.loader import open_engine
from tracer.plans import programs

REPO = Path(__file__).resolve().parents[2]


def kernel_view(fd: int) -> dict[str, int]:
    """The kernel's fdinfo of a map descriptor: max_entries, memlock, ..."""
    text = open(f"/proc/self/fdinfo/{fd}").read()
    return {k: int(v) for k, v in re.findall(r"^(\w+):\s+(\d+)$", text, re.M)}


def every_map() -> list[str]:
    return sorted(set().union(*elfmaps.program_maps(DEFAULT_OBJECT).values()))


def map_ids() -> set[int]:
    """The ids of every BPF map this process holds a descriptor on."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:bpf-map":
                found.add(kernel_view(int(fd))["map_id"])
        except (OSError, KeyError):
            continue
    return found


@pytest.mark.parametrize("part", ["events", pytest.param("groups", marks=pytest.mark.counts_groups)])
def test_each_map_sized_as_configured_or_not_created(root: None, part: str) -> None:
    config = EngineConfig(engine="libbpf", inflight_entries=2048, binder_entries=1024,
                          closer_entries=4096, closer_args_entries=512, get_port_entries=1024,
                          ring_bytes=1 << 20, events=part == "events", iterators=False,
                          groups=Need.REQUIRED if part == "groups" else Need.OFF)
    before = map_ids()
    with open_engine(config) as engine:
        used = elfmaps.maps_used(DEFAULT_OBJECT, programs(engine.plan, engine.group_plan, False))
        sizes = map_sizes(config)
        seen = {name: kernel_view(engine.map(name).fd) for name in every_map() if name in used}
        held = map_ids() - before
    assert used, "the loaded programs use no map: the relocations were not read"
    # Every map the process now holds is one the programs use (or the
    # object's own .rodata/.bss, which libbpf creates for its globals).
    assert {v["map_id"] for v in seen.values()} <= held
    assert len(held) - len(seen) <= 3, (held, seen)  # .rodata, .bss, .data at most
    for name, view in seen.items():
        if name in sizes:
            assert view["max_entries"] == sizes[name], (name, view)
    if part == "events":
        assert seen["ps_events"]["max_entries"] == 1 << 20
        assert "ps_group_counts" not in used
    else:
        assert "ps_events" not in used and "ps_closers" not in used
        assert seen["ps_group_counts"]["max_entries"] == 65536


# Run in a fresh interpreter: the process's iterators are shared state.
ONE_OBJECT_SCENARIO = r"""
import os, re, socket, sys
from tracer.engine import EngineConfig, Need
from tracer.loader import open_engine
from tracer.reuseport import GroupWatcher
from tracer.sockflags import SharedIterators

def ids(kind):
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == f"anon_inode:bpf-{kind}":
                text = open(f"/proc/self/fdinfo/{fd}").read()
                found.add(int(re.search(rf"^{kind}_id:\s+(\d+)", text, re.M).group(1)))
        except OSError:
            continue
    return found

before_progs, before_maps = ids("prog"), ids("map")
# What the terminal UI and the exporter open: events, groups, iterators.
engine = open_engine(EngineConfig(groups=Need.OPTIONAL))
progs, maps = ids("prog") - before_progs, ids("map") - before_maps
assert engine.carries_iterators and SharedIterators.loaded()
# Some plans cannot count on some kernels (tp_btf/sk_data_ready came in 6.6;
# 5.10 does not give fentry programs bpf_get_socket_cookie): then it says why.
counting = engine.group_plan is not None
assert counting or "count reuseport groups" in engine.groups_problem, engine.groups_problem
# Every other user of the probes in the process takes what is loaded.
its = SharedIterators()
watcher = GroupWatcher(engine=engine) if counting else None
with socket.socket() as listener:
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    inode = os.fstat(listener.fileno()).st_ino
    assert inode in {s.inode for s in its.sockets()}, "the shared iterators do not walk"
    if watcher:
        watcher.read()
assert ids("prog") - before_progs == progs, "a second object's programs were loaded"
assert ids("map") - before_maps == maps, "a second object's maps were created"
if watcher:
    watcher.close()
engine.close()
# The engine's hooks are gone; the iterators live on for their last handle.
assert ids("prog") - before_progs, "closing the engine closed the iterators under a handle"
assert inode not in {s.inode for s in its.sockets()}
its.close()
assert not (ids("prog") & progs), "the last handle left programs loaded"
assert not (ids("map") & maps), "the last handle left maps created"
print("ok", len(progs), len(maps))
"""


def test_one_object_per_process(root: None) -> None:
    """The terminal UI's probes (events, reuseport counting, iterators) are
    one object: the group watcher and every inventory walk of the process
    use it, nothing is loaded twice, and it goes with its last user."""
    result = subprocess.run([sys.executable, "-c", ONE_OBJECT_SCENARIO], capture_output=True,
                            text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0 and result.stdout.startswith("ok"), result.stderr


# Run in a fresh interpreter: in the test session another test's collector
# may already hold the process's shared iterators, which would hide the load.
SHARED_SCENARIO = r"""
import os, re, socket, sys
from tracer.sockflags import SharedIterators

def program_ids():
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:bpf-prog":
                text = open(f"/proc/self/fdinfo/{fd}").read()
                found.add(int(re.search(r"^prog_id:\s+(\d+)", text, re.M).group(1)))
        except OSError:
            continue
    return found

before = program_ids()
first = SharedIterators()
loaded = program_ids() - before
second = SharedIterators()
assert program_ids() - before == loaded, "a second handle loaded the programs again"
assert len(loaded) == 3, loaded  # iter/tcp, iter/udp, iter/task_file
first.close()
first.close()  # safe twice: gives back one handle only
with socket.socket() as listener:
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    inode = os.fstat(listener.fileno()).st_ino
    # the remaining handle still walks, and sees what is there
    assert inode in {s.inode for s in second.sockets()}, "the remaining handle does not walk"
assert program_ids() - before >= loaded, "closing one handle closed the shared programs"
second.close()
assert not (program_ids() & loaded), "the last handle left the programs loaded"
print("ok")
"""


def test_shared_iterators_load_once_and_close_with_the_last_handle(root: None) -> None:
    result = subprocess.run([sys.executable, "-c", SHARED_SCENARIO], capture_output=True, text=True,
                            timeout=120, cwd=REPO)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
