"""The records that cross from one part of portscope to another.

An explanation of a failed call is made in one place (tracer/onthespot.py
for bind() and listen(), tracer/connects.py for connect()) and read in
many (trace's lines and JSON, the journal, the UI's state): its shape lives
here, apart from the code that makes it, so that its makers and its
readers need not import each other.
"""

from __future__ import annotations

from dataclasses import dataclass

from .state import HELD_WHO
from .text import printable


@dataclass(frozen=True)
class BlockerSummary:
    pids: tuple[int, ...]
    comm: str | None
    state: str
    local: str
    rule: str
    overlap: str = ""  # how the addresses overlap (same_address, wildcard, dual_stack)
    why: str = ""  # the rule as a sentence
    held: str = "owners"  # owners | time_wait | orphan | hidden | unaccepted (explain.holding)
    remote: str = ""
    closed_by: str = ""  # who closed it, when no process holds it and that is known

    def text(self) -> str:
        """One line for a terminal (the process name escaped)."""
        who = (f"{printable(self.comm)}[{','.join(map(str, self.pids))}]" if self.pids
               else HELD_WHO.get(self.held, "no visible process"))
        left = f", left by {printable(self.closed_by)}" if self.closed_by else ""
        gone = ", closed since" if self.held == "gone" else ""
        return f"{who} {self.state} {self.local} ({self.rule}){left}{gone}"

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"pids": list(self.pids), "comm": self.comm,
                                  "state": self.state, "local": self.local,
                                  "remote": self.remote, "rule": self.rule, "held": self.held}
        if self.closed_by:
            out["closed_by"] = self.closed_by
        return out


@dataclass(frozen=True)
class EventExplanation:
    """What the explainer says about one failed call, or why it could not
    say anything. ``reasons``, ``fixes`` and ``notes`` are the explainer's
    structured records (their JSON form: kind, parameters, sentence)."""

    blockers: tuple[BlockerSummary, ...] = ()
    error: str | None = None
    reasons: tuple[dict, ...] = ()
    fixes: tuple[dict, ...] = ()
    notes: tuple[dict, ...] = ()

    @property
    def fix_texts(self) -> tuple[str, ...]:
        return tuple(str(f["text"]) for f in self.fixes)

    @property
    def note_texts(self) -> tuple[str, ...]:
        return tuple(str(n["text"]) for n in self.notes)

    def text(self) -> str:
        """One line: the blockers of a conflict, else the first reason."""
        if self.error:
            return f"unknown ({printable(self.error)})"
        if self.blockers:
            return "; ".join(b.text() for b in self.blockers)
        if self.reasons and self.reasons[0]["rule"] != "conflict":
            return printable(self.reasons[0]["text"])
        gone = [n for n in self.notes if n["kind"] == "blocker_gone"]
        return "nothing left by the time we looked" if gone or not self.notes else \
            printable(self.notes[0]["text"])

    def blockers_json(self) -> object:
        """The ``blockers`` key of trace --json (a list, or {"error": ...})."""
        if self.error:
            return {"error": self.error}
        return [b.to_json() for b in self.blockers]

    def to_json(self) -> dict[str, object]:
        """The ``explanation`` key of trace --json and the journal."""
        if self.error:
            return {"error": self.error}
        return {"errno": self.reasons[0]["errno"] if self.reasons else None,
                "reasons": list(self.reasons), "fixes": list(self.fixes),
                "notes": list(self.notes)}
