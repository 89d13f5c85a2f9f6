"""Explaining each EADDRINUSE the tracer sees, at the moment it is seen.

The inventory for the failed call's port is taken as soon as the event is
read, in the namespace of the socket, and run through the explainer. A storm
of identical failures must not become a storm of inventories: one answer per
distinct request is reused for ``TTL_S``, and the whole thing is loaded
lazily, on the first failure (the iterators are a second BPF object).
"""

from __future__ import annotations

import errno
import time
from dataclasses import dataclass

from .errors import PortscopeError, UsageError
from .events import CallEvent
from .text import printable

TTL_S = 1.0


@dataclass(frozen=True)
class BlockerSummary:
    pids: tuple[int, ...]
    comm: str | None
    state: str
    local: str
    rule: str
    overlap: str = ""  # how the addresses overlap (same_address, wildcard, dual_stack)
    why: str = ""  # the rule as a sentence

    def text(self) -> str:
        """One line for a terminal (the process name escaped)."""
        who = (f"{printable(self.comm)}[{','.join(map(str, self.pids))}]" if self.pids
               else "no visible process")
        return f"{who} {self.state} {self.local} ({self.rule})"

    def to_json(self) -> dict[str, object]:
        return {"pids": list(self.pids), "comm": self.comm, "state": self.state,
                "local": self.local, "rule": self.rule}


@dataclass(frozen=True)
class Finding:
    """The blockers of one failed call, or why they could not be found."""

    blockers: tuple[BlockerSummary, ...] = ()
    error: str | None = None
    fixes: tuple[str, ...] = ()  # changes the bind rules confirm would work
    notes: tuple[str, ...] = ()

    def text(self) -> str:
        if self.error:
            return f"unknown ({printable(self.error)})"
        return "; ".join(b.text() for b in self.blockers) or "nothing left by the time we looked"

    def to_json(self) -> object:
        if self.error:
            return {"error": self.error}
        return [b.to_json() for b in self.blockers]


class OnTheSpot:
    def __init__(self) -> None:
        self._iterators = None
        self._cache: dict[tuple[object, ...], tuple[float, Finding]] = {}
        self.failures = 0  # explanations that could not be made (counted, not raised)

    def blockers(self, ev: CallEvent) -> Finding | None:
        """Who blocks the failed call; None when it is not an EADDRINUSE of a
        bind or listen."""
        if ev.errno != errno.EADDRINUSE or ev.call not in ("bind", "listen") or not ev.port:
            return None
        key = (ev.netns, ev.protocol, ev.family, ev.addr, ev.port, ev.options, ev.sock_uid,
               ev.call, ev.inode if ev.call == "listen" else 0)
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit and now - hit[0] < TTL_S:
            return hit[1]
        try:
            found = self._explain(ev)
        except UsageError:  # explain() found no such namespace
            self.failures += 1
            found = Finding(error="the socket's network namespace is gone: its last process exited")
        except PortscopeError as exc:
            self.failures += 1
            found = Finding(error=str(exc))
        except OSError as exc:  # the namespace or a process vanished meanwhile
            self.failures += 1
            found = Finding(error=f"the socket's namespace or owner is gone ({exc.strerror})")
        self._cache = {k: v for k, v in self._cache.items() if now - v[0] < TTL_S}
        self._cache[key] = (now, found)
        return found

    def _explain(self, ev: CallEvent) -> Finding:
        from .explain import Request, explain
        from .inventory import take
        from .sockflags import SocketIterators

        if self._iterators is None:
            self._iterators = SocketIterators()
        req = Request(
            port=ev.port, protocol=ev.protocol, addr=ev.addr, family=ev.family,
            reuseaddr="reuseaddr" in ev.options.flags, reuseport="reuseport" in ev.options.flags,
            v6only="v6only" in ev.options.flags, bound_dev_if=ev.options.bound_dev_if,
            uid=ev.sock_uid, listen=ev.call == "listen",
            self_inode=ev.inode if ev.call == "listen" else 0,
        )
        inv = take(port=ev.port, protocols=(ev.protocol,), netns=str(ev.netns),
                   iterators=self._iterators)
        result = explain(req, netns=str(ev.netns), inventory=inv)
        blockers = tuple(
            BlockerSummary(tuple(o.pid for o in s.owners), s.owners[0].comm if s.owners else None,
                           s.diag.state, b["local"], b["rule"], b["overlap"], b["why"])
            for (_, s), b in zip(result.blockers, result.to_json()["blockers"]))
        return Finding(blockers, fixes=tuple(result.fixes), notes=tuple(result.notes))

    def close(self) -> None:
        if self._iterators is not None:
            self._iterators.close()
            self._iterators = None
