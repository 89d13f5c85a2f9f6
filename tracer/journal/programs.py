"""The BPF programs a snapshot saw, as the journal keeps them (schema 3).

A snapshot looks for the programs that can send traffic elsewhere than the
kernel's socket tables say (tracer.netprogs): sk_lookup programs of every
network namespace, cgroup sock_addr programs of every cgroup. What it looked
for goes in ``snapshots.programs`` (``{"scanned": [...], "problems": [...]}``;
NULL: nothing was looked for, as in every journal older than schema 3),
each program it saw in ``snapshot_programs``, run-length encoded like the
sockets: one row per program state, valid from ``first_snapshot`` to
``last_snapshot``. A program is new in a snapshot only when the snapshot
before it looked for its class too (``scanned``), so that a journal that
starts keeping programs, or a scan that failed once, names nothing as
attached.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from ..netprogs import NetProgram

CLASSES = ("sk_lookup", "sock_addr")  # what a snapshot may have looked for


def program_class(kind: str) -> str:
    return "sk_lookup" if kind == "sk_lookup" else "sock_addr"


@dataclass(frozen=True, slots=True)
class ProgramHolder:
    """A process holding a file descriptor of the program or of its link."""

    pid: int
    comm: str
    exe: str | None

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "comm": self.comm, "exe": self.exe}

    @classmethod
    def from_json(cls, d: object) -> "ProgramHolder":
        if not isinstance(d, dict) or type(d.get("pid")) is not int or not isinstance(d.get("comm"), str) \
                or not (d.get("exe") is None or isinstance(d.get("exe"), str)):
            raise ValueError("not a program holder")
        return cls(d["pid"], d["comm"], d.get("exe"))


@dataclass(frozen=True, slots=True)
class SeenProgram:
    """One program state: the program where it is attached, and who holds it.
    Hashable: equal states are one, written once for as long as it lasts."""

    program: NetProgram
    holders: tuple[ProgramHolder, ...] = ()

    def to_row(self, dumps: Callable[[object], str]) -> tuple[Any, ...]:
        """kind, prog_id, program, holders."""
        return (self.program.kind, self.program.prog_id, dumps(self.program.to_json()),
                dumps([h.to_json() for h in self.holders]))

    @classmethod
    def from_row(cls, r: Mapping[str, Any]) -> "SeenProgram | None":
        """From a row the reader typed (JSON decoded); None when damaged."""
        try:
            program = NetProgram.from_json(r["program"])
            holders = tuple(ProgramHolder.from_json(h) for h in r["holders"])
        except (ValueError, TypeError):
            return None
        if program.kind != r["kind"] or program.prog_id != r["prog_id"]:
            return None
        return cls(program, holders)


@dataclass
class ProgramsSeen:
    """What one snapshot looked for and saw."""

    scanned: tuple[str, ...]  # of CLASSES: looked for completely
    programs: list[SeenProgram] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (what, why)

    def snapshot_json(self) -> dict[str, Any]:
        return {"scanned": list(self.scanned), "problems": [list(p) for p in self.problems]}


def scanned_classes(doc: object) -> frozenset[str] | None:
    """The classes a snapshot's ``programs`` column says it looked for; None
    when it looked for none (NULL, an older journal) or the value is damaged."""
    if not isinstance(doc, dict) or not isinstance(doc.get("scanned"), list):
        return None
    got = frozenset(c for c in doc["scanned"] if c in CLASSES)
    return got if len(got) == len(doc["scanned"]) else None
