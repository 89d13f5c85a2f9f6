"""Explaining each failed call the tracer sees, at the moment it is seen.

The namespace's facts and the port's inventory are read as soon as the
event is read, in the namespace of the socket, and run through the
explainer: the same reasons, rules and fixes ``portscope why`` gives, for
every errno the explainer knows (EADDRINUSE, EACCES, EADDRNOTAVAIL, EINVAL,
ENODEV of bind() and listen(); EADDRNOTAVAIL and EADDRINUSE of connect(),
from the ephemeral ports in use towards the destination). The kernel's own
answer is the oracle: when the explainer would answer otherwise now, the
explanation says the namespace changed since the call.

A storm of identical failures must not become a storm of inventories: one
answer per distinct request is reused for ``TTL_S``, and the whole thing is
loaded lazily, on the first failure (the iterators are a second BPF object).
"""

from __future__ import annotations

import errno
import time

from .errors import PortscopeError, UsageError
from .records import (
    BlockerSummary,
    CallEvent,
    Capture,
    Captured,
    EventExplanation,
    format_addr,
)

TTL_S = 1.0
BIND_ERRNOS = frozenset({errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL, errno.EINVAL,
                         errno.ENODEV, errno.EPERM})
CONNECT_ERRNOS = frozenset({errno.EADDRNOTAVAIL, errno.EADDRINUSE})


def explainable(ev: CallEvent) -> bool:
    """Whether the explainer has something to say about this event."""
    if ev.call in ("bind", "listen"):
        return ev.errno in BIND_ERRNOS and (ev.errno != errno.EADDRINUSE or ev.call == "bind"
                                            or bool(ev.port))
    return ev.call == "connect" and ev.errno in CONNECT_ERRNOS


class OnTheSpot:
    def __init__(self) -> None:
        from .cgroups import CgroupPaths

        self._iterators = None
        self._cgroups = CgroupPaths()
        self._cache: dict[tuple[object, ...], tuple[float, EventExplanation]] = {}
        self.failures = 0  # explanations that could not be made (counted, not raised)

    def explain(self, ev: CallEvent) -> EventExplanation | None:
        """The explanation of a failed call; None when there is nothing to explain."""
        if not explainable(ev):
            return None
        key = (ev.netns, ev.protocol, ev.family, ev.addr, ev.port, ev.options, ev.sock_uid,
               ev.call, ev.errno, ev.inode if ev.call == "listen" else 0,
               ev.bound_port if ev.call == "connect" else 0, ev.capture)
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit and now - hit[0] < TTL_S:
            return hit[1]
        try:
            found = self._explain(ev)
        except UsageError:  # explain() found no such namespace
            self.failures += 1
            found = EventExplanation(
                error="the socket's network namespace is gone: its last process exited")
        except PortscopeError as exc:
            self.failures += 1
            found = EventExplanation(error=str(exc))
        except OSError as exc:  # the namespace or a process vanished meanwhile
            self.failures += 1
            found = EventExplanation(error=f"the socket's namespace or owner is gone "
                                           f"({exc.strerror or exc})")
        self._cache = {k: v for k, v in self._cache.items() if now - v[0] < TTL_S}
        self._cache[key] = (now, found)
        return found

    def _iterators_(self):  # type: ignore[no-untyped-def]
        from .sockflags import SharedIterators

        if self._iterators is None:
            self._iterators = SharedIterators()
        return self._iterators

    def _explain(self, ev: CallEvent) -> EventExplanation:
        if ev.call == "connect":
            from .connects import explain_connect

            return explain_connect(ev, self._iterators_())
        from .explain import Fix, Note, Reason, explain, explain_captured
        from .inventory import Inventory, take

        req = request_of(ev, self._cgroups.path_of(ev.cgroup_id))
        try:
            inv = take(port=ev.port or None, protocols=(ev.protocol,), netns=str(ev.netns),
                       iterators=self._iterators_())
            result = explain(req, netns=str(ev.netns), inventory=with_capture(inv, ev.capture))
        except UsageError:  # the namespace is gone: its last process exited
            if not (ev.capture and ev.capture.sockets and ev.errno == errno.EADDRINUSE):
                raise
            # What the probe read at the refusal is all there is left.
            result = explain_captured(req, with_capture(Inventory([]), ev.capture))
        notes = list(result.notes)
        observed = ev.errno_name
        if observed == "EPERM":  # no rule gives it: a program or a security module does
            hooks = [n for n in notes if n.kind == "bind_hook"]
            result.reasons = [Reason("EPERM", "bind_hook", hooks[0].params) if hooks else
                              Reason("EPERM", "eperm_unexplained", {})]
            result.fixes = []
        elif result.blockers and all(s.gone for _, s in result.blockers):
            result.fixes.insert(0, Fix("retry", "kernel", {"for": "conflict"}))
        elif result.errno != observed:
            if observed == "EADDRINUSE" and result.verdict == "free":
                notes.append(_no_blocker_note(ev.capture))
            else:
                notes.append(Note("answer_changed", {"observed": observed,
                                                     "now": result.errno or "success"}))
        blockers = tuple(
            BlockerSummary(tuple(o.pid for o in s.owners), s.owners[0].comm if s.owners else None,
                           s.diag.state, b["local"], b["rule"], b["overlap"], b["why"],
                           b["held"], b["remote"],
                           b["closed_by"]["label"] if b.get("closed_by") else "",
                           tuple(o.kept() for o in s.owners))
            for (_, s), b in zip(result.blockers, result.to_json()["blockers"]))
        return EventExplanation(blockers, reasons=tuple(result.reasons),
                                fixes=tuple(result.fixes), notes=tuple(notes))

    def close(self) -> None:
        """Give back the shared iterators (safe twice)."""
        if self._iterators is not None:
            self._iterators.close()
            self._iterators = None

    def __enter__(self) -> "OnTheSpot":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _no_blocker_note(capture: Capture | None):  # type: ignore[no-untyped-def]
    """Why an EADDRINUSE has no blocker now: it closed before anyone looked
    (nothing was read at the refusal), the probe did not keep it (a crowded
    port), or, when the probe kept every socket there was, the rules miss a
    case."""
    from .explain import Note

    if capture is None or not capture.sockets:
        return Note("blocker_gone", {})
    if not capture.complete or capture.seen > len(capture.sockets):
        return Note("blocker_not_kept", {"seen": capture.seen, "kept": len(capture.sockets),
                                         "complete": capture.complete})
    return Note("rules_disagree", {"sockets": len(capture.sockets)})


def with_capture(inv, capture: Capture | None):  # type: ignore[no-untyped-def]
    """The inventory taken now, plus the sockets the probe found on the port
    at the refusal that are gone since (marked ``gone``), so that a blocker
    that lived for a millisecond is still named, with the process that bound
    it when a traced call did."""
    from dataclasses import replace

    from .owners import OwnerCache

    if capture is None or not capture.sockets:
        return inv
    captured = {c: _identities(c.protocol, c.cookie, c.inode, c.family, c.addr, c.port,
                               c.remote_addr, c.remote_port, c.state) for c in capture.sockets}
    live: set[tuple] = set()
    owners = OwnerCache()
    sockets = []
    for s in inv.sockets:
        ids = _identities(s.diag.protocol, s.diag.cookie, s.diag.inode, s.diag.family,
                          s.diag.local_addr, s.diag.local_port, s.diag.remote_addr,
                          s.diag.remote_port, s.diag.state)
        live |= ids
        if not s.owners and s.diag.inode:
            # Still there but held by no process now: it closed between the
            # inventory's two reads (sockets, then who holds them), or its
            # holder cannot be read. Who bound it, as the probe knew, says more.
            binder = next((c for c, cids in captured.items() if c.binder_pid and ids & cids), None)
            if binder is not None:
                s = replace(s, owners=_gone_socket(binder, owners).owners)
        sockets.append(s)
    gone = [_gone_socket(c, owners) for c, cids in captured.items() if not live & cids]
    return replace(inv, sockets=sockets + gone)


def _identities(protocol: str, cookie: int, inode: int, family: str, addr: str, port: int,
                raddr: str, rport: int, state: str) -> set[tuple]:
    """What names one socket across two looks: its cookie (when it had one),
    its inode, or for a socket with neither its connection (a TIME_WAIT keeps
    the 4-tuple of the socket it was) or its address and state."""
    out: set[tuple] = set()
    if cookie:
        out.add(("cookie", cookie))
    if inode:
        out.add(("inode", protocol, inode))
    elif rport:
        out.add(("conn", protocol, family, addr, port, raddr, rport))
    else:
        out.add(("unconnected", protocol, family, addr, port, state))
    return out


def _gone_socket(c: Captured, owners):  # type: ignore[no-untyped-def]
    from .inventory import Socket
    from .owners import Owner
    from .sockdiag import SockRecord
    from .sockflags import SockFlags

    rec = SockRecord(netns=c.netns, protocol=c.protocol, family=c.family, state=c.state,
                     local_addr=c.addr, local_port=c.port, remote_addr=c.remote_addr,
                     remote_port=c.remote_port, rqueue=0, wqueue=0,
                     timer="timewait" if c.timewait else None, timer_ms=0,
                     uid=c.uid, inode=c.inode, cookie=c.cookie, bound_dev_if=c.bound_dev_if)
    flags = SockFlags(netns=c.netns, protocol=c.protocol, family=c.family, state=c.state,
                      addr=c.addr, port=c.port, cookie=c.cookie, inode=c.inode, sock_uid=c.uid,
                      options=c.options, bound_dev_if=c.bound_dev_if, group=0, group_size=0,
                      group_bpf_prog=False, group_has_conns=False)
    who: tuple = ()
    if c.binder_pid:
        # The binder may still run (its socket closed, not the process); a
        # pid reused by another program since is not it.
        now = owners.get(c.binder_pid, c.binder_comm)
        who = (now if now.readable and now.comm.startswith(c.binder_comm) else
               Owner(pid=c.binder_pid, comm=c.binder_comm, readable=False, problem="gone"),)
    return Socket(rec, flags, who, gone=True)


def request_of(ev: CallEvent, cgroup: str | None = None):  # type: ignore[no-untyped-def]
    """The explainer's question for a traced bind() or listen(), asked by a
    process in ``cgroup``. The kernel already answered the capability check:
    a call refused after it (any errno but EACCES) passed it."""
    from .explain import Request

    flags = ev.options.flags
    addr = ev.addr if ev.addr_family in ("ipv4", "ipv6") else None
    if addr is not None and ev.family == "ipv6" and ev.addr_family == "ipv4":
        addr = f"::ffff:{addr}"
    return Request(
        port=ev.port, protocol=ev.protocol, addr=addr, family=ev.family,
        reuseaddr="reuseaddr" in flags, reuseport="reuseport" in flags,
        v6only="v6only" in flags, bound_dev_if=ev.options.bound_dev_if,
        uid=ev.sock_uid, listen=ev.call == "listen",
        self_inode=ev.inode if ev.call == "listen" else 0,
        freebind="freebind" in flags, transparent="transparent" in flags,
        bind_address_no_port="bind_address_no_port" in flags,
        cap_net_bind_service=ev.errno != errno.EACCES,
        cgroup=cgroup or "/",
    )


def endpoint_of(ev: CallEvent) -> str:
    return format_addr(ev.addr_family if ev.addr_family != "unspec" else ev.family, ev.addr,
                       ev.port)
