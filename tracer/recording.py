"""A recording: JSON lines, each an event as ``portscope trace --json``
prints it (with optional ``fixes`` and ``notes``) or a ``ports``, ``groups``,
``timewait`` or ``health`` record, played into a state model (the UI's tests,
``portscope ui --replay FILE``). The journal's replay is tracer/replay.py."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from .errors import UsageError
from .records import CallEvent, EventExplanation, Owner, reading_from_json
from .state import (
    Health,
    SocketRow,
    StateModel,
)
from .views import GroupViews, sort_rows, timewait_from_json

# ---- replay ----------------------------------------------------------------------


class Replay:
    """Fills a model from a recording: JSON lines, each either an event as
    ``portscope trace --json`` prints it (optionally with ``fixes`` and
    ``notes``), or ``{"record": "ports"|"groups"|"timewait"|"health", ...}``.

    :meth:`load` applies everything at once (tests); :meth:`play` keeps the
    recording's pace in a thread (``portscope ui --replay``)."""

    def __init__(self, model: StateModel, path: str | Path) -> None:
        self.model = model
        self.path = Path(path)
        self.lines = _read_recording(self.path)
        self._groups = GroupViews()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.model.update_health(source="replay", plan=self._plan(), started=self._first_time())

    def _plan(self) -> str | None:
        return next((d["plan"] for d in self.lines if "call" in d), None)

    def _first_time(self) -> float:
        return next((float(d["time"]) for d in self.lines if "time" in d), 0.0)

    def apply(self, doc: dict) -> None:
        kind = doc.get("record", "event")
        if kind == "event":
            ev = CallEvent.from_json(doc)
            caller = Owner.from_json(doc["caller"]) if doc.get("caller") is not None else None
            self.model.add_conflict(ev, EventExplanation.from_event_json(doc), caller=caller)
        elif kind == "ports":
            # The namespaces' labels as the recorder read them (netns_name).
            names = {s["netns"]: s["netns_name"] for s in doc["sockets"]
                     if isinstance(s.get("netns_name"), str) and isinstance(s.get("netns"), int)}
            self.model.set_ports(sort_rows([SocketRow.from_json(s) for s in doc["sockets"]]),
                                 doc.get("time"), names)
            health = doc.get("health") or {}
            self.model.update_health(**{k: v for k, v in health.items()
                                        if k in Health.__dataclass_fields__})
        elif kind == "groups":
            self.model.set_groups(self._groups.update(reading_from_json(doc)))
        elif kind == "timewait":
            self.model.set_timewait(timewait_from_json(doc))
        elif kind == "health":
            self.model.update_health(**{k: (tuple(v) if isinstance(v, list) else v)
                                        for k, v in doc.items()
                                        if k in Health.__dataclass_fields__})

    def load(self) -> StateModel:
        for doc in self.lines:
            self.apply(doc)
        return self.model

    def check(self) -> None:
        """Apply every line to a scratch model, so that a damaged or forged
        recording is one sentence (UsageError) before any screen opens,
        never an exception in the replay thread under the UI."""
        scratch = Replay.__new__(Replay)
        scratch.model, scratch.path, scratch.lines = StateModel(), self.path, self.lines
        scratch._groups = GroupViews()
        for number, doc in enumerate(self.lines, 1):
            try:
                scratch.apply(doc)
            except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
                raise UsageError(f"cannot replay {self.path}: line {number} is not a portscope "
                                 f"recording line ({type(exc).__name__}: {exc})") from None

    def play(self, speed: float = 1.0, loop: bool = False) -> None:
        def run() -> None:
            while not self._stop.is_set():
                t0, start = None, time.monotonic()
                for doc in self.lines:
                    t = doc.get("time")
                    if t is not None:
                        t0 = t if t0 is None else t0
                        delay = (t - t0) / speed - (time.monotonic() - start)
                        if delay > 0 and self._stop.wait(min(delay, 5.0)):
                            return
                    self.apply(doc)
                if not loop:
                    return
        self._thread = threading.Thread(target=run, name="portscope-replay", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(2)


def _read_recording(path: Path) -> list[dict]:
    """The JSON objects of a recording, one per line; one sentence when the
    file cannot be read or a line is not a JSON object."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise UsageError(f"cannot replay {path}: {reason}") from None
    docs = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except (ValueError, RecursionError):
            doc = None
        if not isinstance(doc, dict):
            raise UsageError(f"cannot replay {path}: line {number} is not a JSON object")
        docs.append(doc)
    return docs


def load_recording(path: str | Path, model: StateModel | None = None) -> StateModel:
    """A model filled with everything a recording holds."""
    return Replay(model or StateModel(), path).load()
