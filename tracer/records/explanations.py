"""What is said about a failed call: the reasons the kernel refused it
(:class:`Reason`, an errno and a rule), the fixes the rules confirm
(:class:`Fix`), what cannot be decided (:class:`Note`), the sockets that
block it (:class:`BlockerSummary`), and all of it for one event
(:class:`EventExplanation`), each with its JSON codec.

The explainer (tracer/explain.py, tracer/onthespot.py, tracer/connects.py)
makes them; trace's lines and JSON, the journal, the state model and the
terminal UI read them. Each carries data for scripts and a sentence for
people (tracer/sentences.py); a record read back from a recording keeps the
sentence it was written with."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..sentences import FIX_TEXT, NOTE_TEXT, REASON_TEXT
from ..text import printable
from .sockets import Owner

# Who holds a blocker no visible process holds, by how it is held (explain.holding).
HELD_WHO = {"time_wait": "no process (TIME_WAIT)", "orphan": "no process (closing)",
            "hidden": "an unseen process", "unaccepted": "its listener's queue",
            "gone": "an unknown process"}


def _sentence(table: dict, key: str, params: dict[str, object], said: str | None) -> str:
    if said is not None:
        return said
    try:
        return table[key](params)
    except (KeyError, IndexError, TypeError, ValueError):  # a kind or shape this version lacks
        return key.replace("_", " ")


@dataclass(frozen=True)
class Reason:
    """Why the kernel refuses: the errno it returns and the rule that gives it."""

    errno: str  # EADDRINUSE, EACCES, EADDRNOTAVAIL, EINVAL, ENODEV, EPERM
    rule: str  # conflict, ports_exhausted, privileged_port, address_not_local, ...
    facts: dict[str, object] = field(default_factory=dict)
    said: str | None = field(default=None, compare=False)  # the sentence, when read back

    @property
    def text(self) -> str:
        return _sentence(REASON_TEXT, self.rule, self.facts, self.said)

    def to_json(self) -> dict[str, object]:
        return {"errno": self.errno, "rule": self.rule, "facts": self.facts, "text": self.text}

    @classmethod
    def from_json(cls, d: object) -> "Reason":
        d = _record(d, ("errno", "rule"), "facts")
        return cls(d["errno"], d["rule"], d.get("facts") or {}, d["text"])


@dataclass(frozen=True)
class Fix:
    """A change that the rules confirm removes one reason (``params["for"]``)."""

    kind: str  # see sentences.FIX_TEXT
    target: str  # new_socket | process | namespace | holder | peer | kernel
    params: dict[str, object] = field(default_factory=dict)
    said: str | None = field(default=None, compare=False)

    @property
    def text(self) -> str:
        return _sentence(FIX_TEXT, self.kind, self.params, self.said)

    def to_json(self) -> dict[str, object]:
        return {"kind": self.kind, "target": self.target, "params": self.params, "text": self.text}

    @classmethod
    def from_json(cls, d: object) -> "Fix":
        d = _record(d, ("kind", "target"), "params")
        return cls(d["kind"], d["target"], d.get("params") or {}, d["text"])


@dataclass(frozen=True)
class Note:
    """What the rules cannot decide, or what could not be seen."""

    kind: str  # see sentences.NOTE_TEXT
    params: dict[str, object] = field(default_factory=dict)
    said: str | None = field(default=None, compare=False)

    @property
    def text(self) -> str:
        return _sentence(NOTE_TEXT, self.kind, self.params, self.said)

    def to_json(self) -> dict[str, object]:
        return {"kind": self.kind, "params": self.params, "text": self.text}

    @classmethod
    def from_json(cls, d: object) -> "Note":
        d = _record(d, ("kind",), "params")
        return cls(d["kind"], d.get("params") or {}, d["text"])


def _record(d: object, names: tuple[str, ...], data: str) -> dict:
    """A reason, fix or note as JSON, checked; a recording written before
    records had kinds (a bare sentence) reads as a kind-less record."""
    if isinstance(d, str):
        d = {n: "" for n in names} | {"text": d}
    if not isinstance(d, dict) or not isinstance(d.get("text"), str) \
            or not all(isinstance(d.get(n, ""), str) for n in names) \
            or not isinstance(d.get(data) or {}, dict):
        raise ValueError("an explanation's reasons, fixes and notes must be lists of records")
    return {n: d.get(n, "") for n in names} | {data: d.get(data) or {}, "text": d["text"]}


@dataclass(frozen=True, slots=True)
class BlockerSummary:
    """One socket that blocks a failed call, and why."""

    pids: tuple[int, ...]
    comm: str | None
    state: str
    local: str
    rule: str
    overlap: str = ""  # how the addresses overlap (same_address, wildcard, dual_stack)
    why: str = ""  # the rule as a sentence
    held: str = "owners"  # owners | time_wait | orphan | hidden | unaccepted | gone
    remote: str = ""
    closed_by: str = ""  # who closed it, when no process holds it and that is known
    # Who they are (unit or container, command line), as read with the
    # inventory; () when not read (an older journal, a captured socket).
    owners: tuple[Owner, ...] = ()

    @property
    def who(self) -> str:
        """Who holds it, not escaped (the surface that shows it escapes)."""
        gone = ", closed since" if self.held == "gone" else ""
        if self.pids:
            return f"{self.comm}[{','.join(map(str, self.pids))}]{gone}"
        if self.closed_by:
            return f"left by {self.closed_by}"
        return HELD_WHO.get(self.held, "no visible process") + gone

    def text(self) -> str:
        """One line for a terminal (the names escaped)."""
        who = (f"{printable(self.comm)}[{','.join(map(str, self.pids))}]" if self.pids
               else HELD_WHO.get(self.held, "no visible process"))
        left = f", left by {printable(self.closed_by)}" if self.closed_by else ""
        gone = ", closed since" if self.held == "gone" else ""
        return f"{who} {self.state} {self.local} ({self.rule}){left}{gone}"

    def to_json(self) -> dict[str, object]:
        """The ``blockers`` items of trace --json and the journal."""
        out: dict[str, object] = {"pids": list(self.pids), "comm": self.comm,
                                  "state": self.state, "local": self.local,
                                  "remote": self.remote, "rule": self.rule, "held": self.held}
        if self.closed_by:
            out["closed_by"] = self.closed_by
        # How the addresses overlap and the rule as a sentence: what a
        # recording replayed in the UI shows under each blocker.
        if self.overlap:
            out["overlap"] = self.overlap
        if self.why:
            out["why"] = self.why
        if self.owners:
            out["owners"] = [o.journal_json() for o in self.owners]
        return out

    @classmethod
    def from_json(cls, d: object) -> "BlockerSummary":
        """ValueError when ``d`` is not a blocker as portscope writes it."""
        if not isinstance(d, dict):
            raise ValueError("a blocker is not a JSON object")
        pids = d.get("pids") or []
        texts = [d.get(k) for k in ("comm", "state", "local", "rule", "overlap", "why",
                                    "closed_by", "held", "remote")]
        if not isinstance(pids, list) or not all(type(p) is int for p in pids) \
                or not all(t is None or isinstance(t, str) for t in texts):
            raise ValueError("a blocker's pids or names have the wrong type")
        owners = d.get("owners") or []
        if not isinstance(owners, list):
            raise ValueError("a blocker's owners are not a list")
        # An owner that cannot be read back is left out, the blocker kept.
        read = tuple(o for o in map(Owner.from_journal, owners) if o is not None)
        return cls(tuple(pids), d.get("comm"), d.get("state") or "?", d.get("local") or "?",
                   d.get("rule") or "?", d.get("overlap") or "", d.get("why") or "",
                   d.get("held") or "owners", d.get("remote") or "", d.get("closed_by") or "",
                   read)


@dataclass(frozen=True)
class EventExplanation:
    """What the explainer says about one failed call, or why it could not
    say anything (``error``)."""

    blockers: tuple[BlockerSummary, ...] = ()
    error: str | None = None
    reasons: tuple[Reason, ...] = ()
    fixes: tuple[Fix, ...] = ()
    notes: tuple[Note, ...] = ()

    @property
    def rule(self) -> str:
        """The first reason's rule (conflict, privileged_port, ...), or ''."""
        return self.reasons[0].rule if self.reasons else ""

    @property
    def reason_texts(self) -> tuple[str, ...]:
        return tuple(r.text for r in self.reasons)

    @property
    def fix_texts(self) -> tuple[str, ...]:
        return tuple(f.text for f in self.fixes)

    @property
    def note_texts(self) -> tuple[str, ...]:
        return tuple(n.text for n in self.notes)

    def text(self) -> str:
        """One line for a terminal: the blockers of a conflict, else the first reason."""
        if self.error:
            return f"unknown ({printable(self.error)})"
        if self.blockers:
            return "; ".join(b.text() for b in self.blockers)
        if self.reasons and self.reasons[0].rule != "conflict":
            return printable(self.reasons[0].text)
        gone = [n for n in self.notes if n.kind == "blocker_gone"]
        return "nothing left by the time we looked" if gone or not self.notes else \
            printable(self.notes[0].text)

    def summary(self) -> str:
        """A table cell's worth (the UI's BLOCKED BY), not escaped."""
        if self.error:
            return f"? {self.error}"
        if not self.blockers and self.rule and self.rule != "conflict":
            return self.rule.replace("_", " ")
        if not self.blockers:
            return "nothing left by the time we looked"
        if all(b.state == "TIME_WAIT" for b in self.blockers):
            return f"{len(self.blockers)} TIME_WAIT ({self.blockers[0].rule})"
        first = self.blockers[0]
        more = f" +{len(self.blockers) - 1}" if len(self.blockers) > 1 else ""
        # The rule names the state for listeners; other states are worth saying.
        state = "" if first.rule == "listener" else f" ({first.state})"
        return f"{first.who} {first.rule}{state}{more}"

    # -- the JSON codec: the ``blockers`` and ``explanation`` keys of an event

    def blockers_json(self) -> object:
        """The ``blockers`` key of trace --json (a list, or {"error": ...})."""
        if self.error:
            return {"error": self.error}
        return [b.to_json() for b in self.blockers]

    def to_json(self) -> dict[str, object]:
        """The ``explanation`` key of trace --json and the journal."""
        if self.error:
            return {"error": self.error}
        return {"errno": self.reasons[0].errno if self.reasons else None,
                "reasons": [r.to_json() for r in self.reasons],
                "fixes": [f.to_json() for f in self.fixes],
                "notes": [n.to_json() for n in self.notes]}

    @classmethod
    def from_json(cls, blockers: object, explanation: object = None, fixes: object = None,
                  notes: object = None) -> "EventExplanation | None":
        """From an event's ``blockers`` and ``explanation`` keys (or, from a
        recording older than structured explanations, its ``fixes`` and
        ``notes`` sentences); None when it has neither; ValueError when they
        are not what portscope writes (a damaged or forged recording or
        journal)."""
        if blockers is None and explanation is None:
            return None
        if isinstance(blockers, dict):
            error = blockers.get("error")
            if not isinstance(error, str):
                raise ValueError("'blockers' is neither a list nor an error")
            return cls(error=error)
        if blockers is not None and not isinstance(blockers, list):
            raise ValueError("'blockers' is neither a list nor an error")
        found = tuple(BlockerSummary.from_json(b) for b in blockers or ())
        if explanation is None:
            return cls(found, fixes=tuple(Fix.from_json(t) for t in _list(fixes)),
                       notes=tuple(Note.from_json(t) for t in _list(notes)))
        if not isinstance(explanation, dict):
            raise ValueError("'explanation' is not an object")
        if "error" in explanation:
            if not isinstance(explanation["error"], str):
                raise ValueError("an explanation's error is not a sentence")
            return cls(error=explanation["error"])
        return cls(found,
                   reasons=tuple(Reason.from_json(r) for r in _list(explanation.get("reasons"))),
                   fixes=tuple(Fix.from_json(f) for f in _list(explanation.get("fixes"))),
                   notes=tuple(Note.from_json(n) for n in _list(explanation.get("notes"))))

    @classmethod
    def from_event_json(cls, doc: dict) -> "EventExplanation | None":
        """The explanation in one line of ``trace --json`` (or a recording)."""
        return cls.from_json(doc.get("blockers"), doc.get("explanation"), doc.get("fixes"),
                             doc.get("notes"))


def _list(value: object) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError("an explanation's reasons, fixes and notes must be lists")
    return value
