"""``portscope record``: write every traced event and a periodic inventory
snapshot to the journal, headless (a systemd service: deploy/).

Three activities, two threads:

* the main thread polls the probes (failures of bind/listen/connect,
  successes of bind and listen, listener closes), decodes each event, adds
  who the caller is (executable, cgroup, command line, read now, while the
  process still exists) and, for an EADDRINUSE, the blocking sockets
  explained on the spot; it is the only thread that writes to the journal,
  and it commits at least every ``journal.COMMIT_S`` seconds;
* a snapshot thread takes the inventory of listeners, UDP sockets and bound
  sockets, and of the BPF programs that steer traffic (sk_lookup programs of
  every network namespace, cgroup sock_addr programs of every cgroup, with
  the processes holding their file descriptors), every
  ``--snapshot-interval`` seconds, and soon after any bind,
  listen or listener close (at most one such extra snapshot per
  ``MIN_GAP_S``), so that short-lived ownership is seen too; the main thread
  writes what it took;
* rotation (age and size limits) runs between batches, a bounded slice at a
  time, so that it never holds events back for long.

SIGINT and SIGTERM stop cleanly: the ring buffer is drained, the snapshots
already taken are written, the session is marked as ended, everything is
committed. A second signal while stopping gives up at once.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import threading
import time

from . import journal as jr
from . import netprogs
from .cgroups import CgroupIdentities
from .engine import Engine, EngineConfig
from .errors import ExitStatus, OutputFailed, PortscopeError
from .events import Clock, decode
from .inventory import take
from .journal.programs import ProgramHolder, ProgramsSeen, SeenProgram
from .loader import open_engine
from .onthespot import OnTheSpot, explainable
from .owners import Owner, OwnerCache
from .plans import Plan
from .records import CallEvent, EventExplanation, RecordedSnapshot
from .runtime import POLL_MS, Output, StopSignal, say
from .sockflags import SharedIterators

TRIGGER_DELAY_S = 0.2  # let a bind become a listen before looking
MIN_GAP_S = 0.5  # at most two event-triggered snapshots a second
EXPLAIN_SHARE = 0.25  # of each second, at most this much explaining EADDRINUSE on the spot
IDENTITY_TTL_S = 2.0
SNAPSHOT_STATES = ("LISTEN", "CLOSE")  # listeners; unconnected UDP; bound-only TCP
SUCCESSES = frozenset({"bind", "listen", "listen_close"})
CHUNK = 1000  # events decoded and written between two looks at the commit clock


def run(args: argparse.Namespace) -> ExitStatus:
    # A bad journal is a usage error whatever the kernel allows, so it is
    # checked first; but nothing is created before the probes load, so that
    # a run without privileges leaves no empty journal behind.
    jr.check_target(args.output)
    stop = StopSignal()
    engine = open_engine(EngineConfig(
        plan=None if args.plan == "auto" else Plan(args.plan),
        successes=SUCCESSES,
        ring_bytes=args.ring_size,
        btf_path=args.btf,
    ))
    jsonl = None
    try:
        writer = jr.JournalWriter(args.output, max_size=args.max_size, retain=args.retain)
        try:
            jsonl = Output(args.jsonl) if getattr(args, "jsonl", None) else None
            recorder = Recorder(engine, writer, args.snapshot_interval, explain=not args.no_explain,
                                jsonl=jsonl)
            say(f"recording to {args.output} with the {engine.plan_name} plan"
                f"{' (bcc)' if engine.engine == 'bcc' else ''} "
                f"(snapshot every {args.snapshot_interval:g}s{_limits(args)}); "
                "SIGTERM or Ctrl-C to stop")
            recorder.run(stop)
        finally:
            writer.close()
    except BaseException:
        if jsonl is not None:
            jsonl.close_quietly()
        raise
    finally:
        engine.close()
    if jsonl is not None:
        if recorder.jsonl_failed:
            jsonl.close_quietly()
            return ExitStatus.ERROR  # said once already, when the first line failed
        jsonl.close()
    return ExitStatus.OK


def _limits(args: argparse.Namespace) -> str:
    parts = []
    if args.max_size:
        parts.append(f"max {args.max_size >> 20} MiB" if args.max_size >= 1 << 20
                     else f"max {args.max_size} bytes")
    if args.retain:
        parts.append(f"kept {_span(args.retain)}")
    return "; " + ", ".join(parts) if parts else ""


def _span(seconds: float) -> str:
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


class Identities:
    """Who a pid is, read with psutil, remembered for IDENTITY_TTL_S (a storm
    of events from one process reads /proc once)."""

    def __init__(self) -> None:
        self._cache: dict[int, tuple[float, Owner]] = {}
        self._pruned = time.monotonic()

    def get(self, pid: int, comm: str) -> Owner:
        now = time.monotonic()
        hit = self._cache.get(pid)
        if hit and now - hit[0] < (IDENTITY_TTL_S if hit[1].readable else 0.2):
            return hit[1]
        owner = OwnerCache().get(pid, comm)
        self._cache[pid] = (now, owner)
        if now - self._pruned > 10 * IDENTITY_TTL_S:
            self._cache = {p: v for p, v in self._cache.items() if now - v[0] < IDENTITY_TTL_S}
            self._pruned = now
        return owner


class Snapshotter:
    """The inventory thread. ``trigger()`` asks for a snapshot soon; results
    (RecordedSnapshot, or an exception to report) arrive on ``results``."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.results: queue.Queue[tuple[RecordedSnapshot, ProgramsSeen | None] | BaseException] = \
            queue.Queue()
        self.holders = ProgramHolders()
        self._cond = threading.Condition()
        self._trigger_at: float | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._main, name="portscope-snapshots", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def trigger(self) -> None:
        with self._cond:
            if self._trigger_at is None:
                self._trigger_at = time.monotonic() + TRIGGER_DELAY_S
                self._cond.notify()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    def _main(self) -> None:
        try:
            iterators = SharedIterators()
        except (PortscopeError, OSError) as exc:
            self.results.put(exc)
            return
        try:
            next_periodic = time.monotonic()
            last_end = -1e9
            gap = MIN_GAP_S
            while True:
                reason = self._wait(next_periodic, last_end + gap)
                if reason is None:
                    return
                started, wall = time.monotonic(), time.time()
                try:
                    snap = self._take(iterators, wall, reason)
                except (PortscopeError, OSError) as exc:
                    self.results.put(exc)
                    snap = None
                programs = scan_programs(self.holders) if snap is not None else None
                last_end = time.monotonic()
                # A slow inventory (a huge host) must not run back to back.
                gap = max(MIN_GAP_S, 4 * (last_end - started))
                if snap is not None:
                    snap.duration = last_end - started
                    self.results.put((snap, programs))
                if reason == "periodic":
                    next_periodic = max(started + self.interval, last_end + gap)
        finally:
            iterators.close()

    def _wait(self, next_periodic: float, earliest_trigger: float) -> str | None:
        with self._cond:
            while True:
                if self._stopping:
                    return None
                now = time.monotonic()
                due, reason = next_periodic, "periodic"
                if self._trigger_at is not None:
                    at = max(self._trigger_at, earliest_trigger)
                    if at < due:
                        due, reason = at, "event"
                if now >= due:
                    # Any snapshot answers a pending trigger.
                    if self._trigger_at is not None and self._trigger_at <= now:
                        self._trigger_at = None
                    return reason
                self._cond.wait(due - now)

    @staticmethod
    def _take(iterators: SharedIterators, wall: float, reason: str) -> RecordedSnapshot:
        inv = take(states=SNAPSHOT_STATES, iterators=iterators)
        sockets = [s.record() for s in inv.sockets
                   if s.diag.local_port and not (s.diag.protocol == "udp" and s.diag.remote_port)]
        return RecordedSnapshot(wall, 0.0, reason, sockets, inv.health())


def scan_programs(holders: "ProgramHolders") -> ProgramsSeen | None:
    """The sk_lookup and cgroup sock_addr programs attached now. A class is
    ``scanned`` only when the kernel has it and the scan had no problem, so
    that a program missed by a failed scan is never taken for a new one."""
    seen = ProgramsSeen(())
    scanned = []
    found: list[netprogs.NetProgram] = []
    for cls, scan in (("sk_lookup", netprogs.sk_lookup_programs),
                      ("sock_addr", netprogs.sock_addr_programs)):
        try:
            result = scan()
        except Exception as exc:  # noqa: BLE001 - never the snapshot thread's end: a problem
            seen.problems.append((cls, f"{type(exc).__name__}: {exc}"))
            continue
        seen.problems += result.problems
        if result.supported and not result.problems:
            scanned.append(cls)
        found += result.programs
    known = holders.of(found)
    seen.programs = [SeenProgram(p, known[(p.prog_id, p.link_id)]) for p in found]
    seen.scanned = tuple(scanned)
    return seen if scanned or seen.programs or seen.problems else None


class ProgramHolders:
    """Who holds each program's file descriptor or its link's (from
    /proc/PID/fdinfo: prog_id, link_id), looked up when a program first
    appears: one walk of /proc for all the new ones, none while nothing
    changes (the holders seen then are kept: who attached it)."""

    def __init__(self, proc: str = "/proc") -> None:
        self.proc = proc
        self._known: dict[tuple[int, int | None], tuple[ProgramHolder, ...]] = {}

    def of(self, programs: list["netprogs.NetProgram"]
           ) -> dict[tuple[int, int | None], tuple[ProgramHolder, ...]]:
        keys = {(p.prog_id, p.link_id) for p in programs}
        new = keys - self._known.keys()
        if new:
            found: dict[tuple[int, int | None], set[int]] = {k: set() for k in new}
            for name in os.listdir(self.proc):
                if not name.isdigit():
                    continue
                for prog_id, link_id in self._bpf_fds(name):
                    for key in new:
                        # A link's fd names its link; a program's fd its program.
                        if (link_id is not None and link_id == key[1]) \
                                or (link_id is None and prog_id == key[0]):
                            found[key].add(int(name))
            for key, pids in found.items():
                self._known[key] = tuple(self._holder(pid) for pid in sorted(pids))
        self._known = {k: v for k, v in self._known.items() if k in keys}
        return self._known

    def _bpf_fds(self, pid: str) -> list[tuple[int | None, int | None]]:
        """(prog_id, link_id) of the BPF program and link fds of a process
        (a program fd has no link_id)."""
        out = []
        fd_dir = f"{self.proc}/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            return out
        for fd in fds:
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
                if target not in ("anon_inode:bpf-link", "anon_inode:bpf-prog"):
                    continue
                with open(f"{self.proc}/{pid}/fdinfo/{fd}") as f:
                    info = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
            except OSError:
                continue
            ids = [int(v) if v.strip().isdigit() else None
                   for v in (info.get("prog_id", ""), info.get("link_id", ""))]
            out.append((ids[0], ids[1] if target == "anon_inode:bpf-link" else None))
        return out

    def _holder(self, pid: int) -> ProgramHolder:
        try:
            with open(f"{self.proc}/{pid}/comm", errors="replace") as f:
                comm = f.read().strip()
        except OSError:
            comm = "?"
        try:
            exe: str | None = os.readlink(f"{self.proc}/{pid}/exe")
        except OSError:
            exe = None
        return ProgramHolder(pid, comm, exe)


class Recorder:
    def __init__(self, engine: Engine, writer: jr.JournalWriter, interval: float,
                 explain: bool = True, jsonl: Output | None = None) -> None:
        self.engine = engine
        self.jsonl = jsonl  # every event also as a JSON line (trace --json's form)
        self.jsonl_failed = False
        self.writer = writer
        self.clock = Clock()
        self.identities = Identities()
        self.cgroups = CgroupIdentities()
        self.explainer = OnTheSpot() if explain else None
        self.snapshots = Snapshotter(interval)
        self.interval = interval
        self.unexplained = 0
        self.recorded = 0
        self._window_end = 0.0
        self._explaining = 0.0
        self._warned: set[str] = set()
        self._last_commit = time.monotonic()
        self._lost = 0

    def run(self, stop: StopSignal) -> None:
        self.writer.start_session(self.engine.plan_name, self.interval)
        self.snapshots.start()
        self._last_commit = time.monotonic()
        next_rotate = self._last_commit
        try:
            self.writer.rotate()
            while not stop.requested:
                self._record(self.engine.poll(POLL_MS))
                self._write_snapshots()
                self._maybe_commit()
                if time.monotonic() >= next_rotate:
                    self.writer.rotate()
                    next_rotate = time.monotonic() + jr.COMMIT_S
            # What is in the ring buffer happened: keep it.
            self._record(self.engine.drain())
        except BaseException:
            self._shutdown(failing=True)
            raise
        self._shutdown(failing=False)

    def _shutdown(self, failing: bool) -> None:
        """Stop the snapshots, write what is left, end the session. When
        already failing (the journal's disk is full), do what can be done
        without hiding the first error."""
        self.snapshots.stop()
        if self.explainer:
            self.explainer.close()
        try:
            self._write_snapshots()
            self._commit()
            self.writer.end_session()
        except jr.JournalIOError:
            if not failing:
                raise
        counters = self.engine.counters()
        say(f"{self.recorded} events recorded, {counters.lost} lost, "
            f"{counters.inflight_full} calls untraced")

    def _record(self, raws: list[bytes]) -> None:
        """Decode, enrich and write; a long batch (a storm) is committed as it
        goes, so that a crash loses at most COMMIT_S of what was read."""
        for i in range(0, len(raws), CHUNK):
            self._record_chunk(raws[i:i + CHUNK])
            self._maybe_commit()

    def _record_chunk(self, raws: list[bytes]) -> None:
        calls = []
        trigger = False
        for raw in raws:
            ev = decode(raw, self.clock)
            owner = self.identities.get(ev.pid, ev.comm)
            explained = self._explain(ev)
            calls.append((ev, owner, explained))
            if self.jsonl is not None:
                self._write_jsonl(ev, owner, explained)
            if ev.call in SUCCESSES and (ev.port or ev.bound_port):
                trigger = True
        self.writer.add_calls(calls)
        self.recorded += len(calls)
        if trigger:
            self.snapshots.trigger()

    def _write_jsonl(self, ev: CallEvent, owner: Owner, explained: EventExplanation | None) -> None:
        assert self.jsonl is not None
        doc = ev.to_json()
        # From the event's cgroup id: still known when the process is gone.
        doc.update(self.cgroups.get(ev.pid, ev.cgroup_id, ev.comm))
        if explained is not None:
            doc["blockers"] = explained.blockers_json()
            doc["explanation"] = explained.to_json()
        if self.jsonl_failed:
            return
        try:
            self.jsonl.write(json.dumps(doc, separators=(",", ":")) + "\n")
        except OutputFailed as exc:
            # The journal is the main record: keep it going, say this once,
            # and end with exit status 1.
            self.jsonl_failed = True
            self._warn(f"{exc}; the JSON lines stop here, the journal goes on")

    def _explain(self, ev: CallEvent) -> EventExplanation | None:
        """The on-the-spot explanation of a failure, within a time budget: a
        storm of distinct failures must not stall recording."""
        if self.explainer is None or not explainable(ev):
            return None
        now = time.monotonic()
        if now >= self._window_end:
            self._window_end, self._explaining = now + 1.0, 0.0
        if self._explaining >= EXPLAIN_SHARE:
            self.unexplained += 1
            return EventExplanation(error="not explained: too many failures at once (see the "
                                          "snapshots)")
        found = self.explainer.explain(ev)
        self._explaining += time.monotonic() - now
        return found

    def _write_snapshots(self) -> None:
        while True:
            try:
                item = self.snapshots.results.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, BaseException):
                self._warn(f"snapshot failed: {item}")
            else:
                self.writer.add_snapshot(*item)

    def _maybe_commit(self) -> None:
        if time.monotonic() - self._last_commit >= jr.COMMIT_S:
            self._commit()

    def _commit(self) -> None:
        c = self.engine.counters()
        if c.lost > self._lost:
            say(f"{c.lost - self._lost} events lost: the ring buffer was full (raise --ring-size)")
            self._lost = c.lost
        self.writer.heartbeat(c.emitted, c.lost, c.inflight_full, self.unexplained)
        self.writer.commit()
        self._last_commit = time.monotonic()

    def _warn(self, text: str) -> None:
        if text not in self._warned:
            self._warned.add(text)
            say(text)
