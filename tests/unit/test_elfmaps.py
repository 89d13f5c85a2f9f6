"""tracer/elfmaps.py against LLVM's own reading of the committed object:
for every program, the maps its relocations name (llvm-objdump -r, placed
in functions by llvm-objdump -t) are exactly the maps elfmaps says it uses."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tracer import elfmaps
from tracer.engine import DEFAULT_OBJECT
from tracer.plans import GROUP_PROGRAMS, ITERATOR_PROGRAMS, PLAN_PROGRAMS, Plan


def objdump(*args: str) -> str:
    tool = shutil.which("llvm-objdump")
    if tool is None:
        pytest.fail("llvm-objdump is missing: run scripts/setup (it installs llvm)")
    return subprocess.run([tool, *args, str(DEFAULT_OBJECT)], capture_output=True, text=True,
                          check=True).stdout


def llvm_table() -> dict[str, frozenset[str]]:
    """Program -> maps, from LLVM's symbol table and relocation listing."""
    functions: dict[str, list[tuple[int, int, str]]] = {}
    for line in objdump("-t").splitlines():
        m = re.match(r"([0-9a-f]{16}) g\s+F (\S+)\s+([0-9a-f]{16}) (\S+)$", line)
        if m:
            start, size = int(m.group(1), 16), int(m.group(3), 16)
            functions.setdefault(m.group(2), []).append((start, start + size, m.group(4)))
    maps = {line.split()[-1] for line in objdump("-t").splitlines() if " .maps\t" in line}
    table: dict[str, set[str]] = {name: set() for fns in functions.values() for _, _, name in fns}
    section = None
    for line in objdump("-r").splitlines():
        header = re.match(r"RELOCATION RECORDS FOR \[(.+)\]:", line)
        if header:
            section = header.group(1).removeprefix(".rel")
            continue
        parts = line.split()
        if len(parts) == 3 and parts[2] in maps and section in functions:
            offset = int(parts[0], 16)
            for start, end, prog in functions[section]:
                if start <= offset < end:
                    table[prog].add(parts[2])
    return {prog: frozenset(found) for prog, found in table.items()}


def test_maps_by_program_match_llvm() -> None:
    ours = elfmaps.program_maps(DEFAULT_OBJECT)
    theirs = llvm_table()
    assert ours == theirs
    # and the table is about the programs the plans load, not an empty one
    every = {p for plan in Plan for p in PLAN_PROGRAMS[plan] + GROUP_PROGRAMS[plan]}
    assert every | set(ITERATOR_PROGRAMS) <= set(ours)
    assert "ps_events" in elfmaps.maps_used(DEFAULT_OBJECT, PLAN_PROGRAMS[Plan.TRACEPOINT])
    assert "ps_group_counts" not in elfmaps.maps_used(DEFAULT_OBJECT, PLAN_PROGRAMS[Plan.TRACEPOINT])


def test_not_an_object_is_one_error(tmp_path: Path) -> None:
    bad = tmp_path / "x.o"
    bad.write_bytes(b"not an ELF file at all")
    with pytest.raises(elfmaps.NotAnObject):
        elfmaps.program_maps(bad)


def test_a_truncated_object_is_one_error(tmp_path: Path) -> None:
    cut = tmp_path / "cut.o"
    cut.write_bytes(DEFAULT_OBJECT.read_bytes()[:200])
    with pytest.raises(elfmaps.NotAnObject):
        elfmaps.program_maps(cut)
