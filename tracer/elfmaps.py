"""Which maps each BPF program of the object uses, read from the object's
ELF relocations (the same records libbpf reads to bind map references).

A program refers to a map through a relocation in its section against the
map's symbol in ``.maps``. Knowing this, the engine sizes every map no
loaded program uses down to one entry before load, so that a command pays
kernel memory only for what its programs touch (``trace`` has no use for the
reuseport counters, the group watcher none for the ring buffer), without a
hand-kept table that a new program could silently contradict.

A reference from ``.text`` (a subprogram, which any program may call) counts
as a use by every program.
"""

from __future__ import annotations

import functools
import struct
from pathlib import Path

SHT_SYMTAB = 2
SHT_REL = 9
STT_FUNC = 2
SHARED_SECTION = ".text"


class NotAnObject(ValueError):
    """The file is not a 64-bit little-endian ELF relocatable object."""


@functools.lru_cache(maxsize=4)
def maps_by_program(path: str, mtime_ns: int | None = None) -> dict[str, frozenset[str]]:
    """Program name -> the names of the ``.maps`` maps it refers to.

    ``mtime_ns`` is only part of the cache key (a rebuilt object is read
    again); call :func:`program_maps` instead."""
    data = Path(path).read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise NotAnObject(f"{path} is not a 64-bit little-endian ELF object")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_at = sections[shstrndx][4]

    def cstr(offset: int) -> str:
        return data[offset:data.index(b"\0", offset)].decode("ascii", "replace")

    section_names = [cstr(names_at + s[0]) for s in sections]
    symtab = next((s for s in sections if s[1] == SHT_SYMTAB), None)
    if symtab is None:
        raise NotAnObject(f"{path} has no symbol table")
    strings_at = sections[symtab[6]][4]
    symbols = [struct.unpack_from("<IBBHQQ", data, symtab[4] + off)
               for off in range(0, symtab[5], 24)]
    maps_index = section_names.index(".maps") if ".maps" in section_names else -1

    # Functions per section: (start, end, name), to place each relocation.
    functions: dict[int, list[tuple[int, int, str]]] = {}
    for st_name, info, _other, shndx, value, size in symbols:
        if info & 0xF == STT_FUNC:
            functions.setdefault(shndx, []).append((value, value + size, cstr(strings_at + st_name)))

    uses: dict[str, set[str]] = {name: set() for fns in functions.values() for _, _, name in fns}
    shared: set[str] = set()
    for header in sections:
        if header[1] != SHT_REL:
            continue
        target = header[7]  # sh_info: the section the relocations apply to
        for off in range(0, header[5], 16):
            r_offset, r_info = struct.unpack_from("<QQ", data, header[4] + off)
            sym = symbols[r_info >> 32]
            if sym[3] != maps_index:
                continue
            map_name = cstr(strings_at + sym[0])
            if section_names[target] == SHARED_SECTION:
                shared.add(map_name)
                continue
            for start, end, prog in functions.get(target, ()):
                if start <= r_offset < end:
                    uses[prog].add(map_name)
    return {prog: frozenset(found | shared) for prog, found in uses.items()}


def program_maps(path: Path | str) -> dict[str, frozenset[str]]:
    """Program name -> the ``.maps`` maps it uses (cached per file version).
    A file that cannot be read as an object raises NotAnObject."""
    p = Path(path)
    try:
        return maps_by_program(str(p), p.stat().st_mtime_ns)
    except NotAnObject:
        raise
    except (OSError, struct.error, IndexError, ValueError) as exc:
        raise NotAnObject(f"{p} cannot be read as a BPF object ({exc})") from None


def maps_used(path: Path | str, programs: tuple[str, ...] | list[str]) -> frozenset[str]:
    """The ``.maps`` maps that any of ``programs`` uses."""
    table = program_maps(path)
    out: set[str] = set()
    for name in programs:
        out |= table.get(name, frozenset())
    return frozenset(out)

