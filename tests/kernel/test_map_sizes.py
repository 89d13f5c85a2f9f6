"""What the kernel allocates for each map portscope loads: every map at the
size its configuration gives, every map the loaded programs do not use at
the smallest the kernel allows (tracer/engine.py sizes them before load,
from tracer/elfmaps.py). The oracle is the kernel's own account of each map
descriptor (/proc/self/fdinfo: max_entries, memlock)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tracer import elfmaps
from tracer.engine import DEFAULT_OBJECT, EngineConfig, map_sizes
from tracer.loader import open_engine
from tracer.plans import GROUP_PROGRAMS, PLAN_PROGRAMS


def kernel_view(fd: int) -> dict[str, int]:
    """The kernel's fdinfo of a map descriptor: max_entries, memlock, ..."""
    text = open(f"/proc/self/fdinfo/{fd}").read()
    return {k: int(v) for k, v in re.findall(r"^(\w+):\s+(\d+)$", text, re.M)}


def every_map() -> list[str]:
    return sorted(set().union(*elfmaps.program_maps(DEFAULT_OBJECT).values()))


@pytest.mark.parametrize("programs", ["events", "groups"])
def test_each_map_sized_as_configured_or_to_nothing(root: None, programs: str) -> None:
    config = EngineConfig(engine="libbpf", inflight_entries=2048, binder_entries=1024,
                          closer_entries=4096, closer_args_entries=512, get_port_entries=1024,
                          ring_bytes=1 << 20,
                          programs=PLAN_PROGRAMS if programs == "events" else GROUP_PROGRAMS)
    page = os.sysconf("SC_PAGE_SIZE")
    with open_engine(config) as engine:
        used = elfmaps.maps_used(DEFAULT_OBJECT, config.programs[engine.plan])
        sizes = map_sizes(config)
        seen = {name: kernel_view(engine.map(name).fd) for name in every_map()}
    assert used, "the loaded programs use no map: the relocations were not read"
    for name, view in seen.items():
        if name not in used:
            # LRU hashes round one entry up to one per possible CPU.
            smallest = page if name == "ps_events" else 1
            assert view["max_entries"] <= max(smallest, os.cpu_count() or 1), (name, view)
            assert view["memlock"] <= 64 << 10, (name, view)
        elif name in sizes:
            assert view["max_entries"] == sizes[name], (name, view)
    if programs == "events":
        assert seen["ps_events"]["max_entries"] == 1 << 20
        assert seen["ps_group_counts"]["max_entries"] == 1
    else:
        assert seen["ps_events"]["max_entries"] == page
        assert seen["ps_group_counts"]["max_entries"] == 65536


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
                            timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
