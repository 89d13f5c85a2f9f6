"""The probe engine: the process's one loaded probe object, and how its
plans are chosen.

A command asks for the parts it reads (:class:`EngineConfig`: events,
reuseport counting, socket iterators); :func:`open_parts` tries the plans
in order of preference for each part, in one object, until a load carries
every part that can run here. The :class:`Engine` then hands out raw
events, counters and the maps; ``close()`` detaches everything and is safe
to call twice.

Two loaders fill the same :class:`Engine`: libbpf with the CO-RE object
(the default, tracer/coreobject.py), and bcc, which compiles the same
source against the running kernel's headers (tracer/bcc_engine.py);
tracer/loader.py chooses between them.
"""

from __future__ import annotations

import ctypes
import enum
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from . import closers, libbpf
from .errors import (
    NoBTF,
    ObjectInvalid,
    PermissionDenied,
    PlanUnavailable,
    PortscopeError,
    Unsupported,
    UsageError,
)
from .events import Clock
from .layout import PsCounter, PsEvent, PsKind
from .plans import (
    KernelFacts,
    Part,
    Plan,
    compat_callers,
    part_of,
)

DEFAULT_OBJECT = Path(__file__).resolve().parent.parent / "probes" / "portscope.bpf.o"
DEFAULT_RING_BYTES = 8 << 20
TIMEWAIT_CLOSERS = 65536  # 10 MiB: who left each of 60 s of TIME_WAITs at ~1,000 closes/s
UI_CLOSERS = 32768  # 5 MiB: the UI's TIME_WAIT screen, within its 20 MiB
EVENT_SIZE = ctypes.sizeof(PsEvent)


def object_path() -> Path:
    return Path(os.environ.get("PORTSCOPE_OBJECT", DEFAULT_OBJECT))


PLAN_VARIABLE = "PORTSCOPE_PLAN"


ENGINE_VARIABLE = "PORTSCOPE_ENGINE"
ENGINES = ("libbpf", "bcc")


_chosen_engine: str | None = None  # the command line's --engine (choose_engine)


def choose_engine(name: str | None) -> None:
    """The engine every probe of this process loads with (the command line's
    --engine), unless a configuration names its own. None: the default."""
    global _chosen_engine
    if name is not None and name not in ENGINES:
        raise UsageError(f"{name!r} is not an engine: use libbpf or bcc")
    _chosen_engine = name


def default_engine() -> str:
    """The command line's --engine, else $PORTSCOPE_ENGINE (how the kernel
    matrix runs a whole suite under bcc), else libbpf. The choice stays in
    this process: no child inherits it."""
    if _chosen_engine is not None:
        return _chosen_engine
    value = os.environ.get(ENGINE_VARIABLE, "").strip() or "libbpf"
    if value not in ENGINES:
        raise UsageError(f"{ENGINE_VARIABLE}={value!r} is not an engine: use libbpf or bcc")
    return value


def forced_plan() -> Plan | None:
    """The plan named by $PORTSCOPE_PLAN, which replaces the automatic choice
    (the kernel matrix runs the whole test suite once per plan with it)."""
    value = os.environ.get(PLAN_VARIABLE, "").strip()
    if not value:
        return None
    try:
        return Plan(value)
    except ValueError:
        names = ", ".join(p.value for p in Plan)
        raise UsageError(f"{PLAN_VARIABLE}={value!r} is not a probe plan: use one of {names}") from None


class Need(str, enum.Enum):
    """How much a command needs a part that may not load on every kernel."""

    OFF = "off"  # not loaded
    OPTIONAL = "optional"  # loaded if a plan allows it; else the engine says why not
    REQUIRED = "required"  # no plan for it: the command cannot run


@dataclass
class EngineConfig:
    plan: Plan | None = None  # None: the best one the kernel allows
    errors_only: bool = True  # False: successes of bind, listen and connect too
    # Overrides errors_only: whose successes to send, from "bind", "listen",
    # "connect", "get_port", "listen_close" (failures are always sent).
    successes: frozenset[str] | None = None
    pid: int = 0  # 0: every process
    port: int = 0  # 0: every port
    ring_bytes: int = DEFAULT_RING_BYTES
    # The preallocated maps, sized for what one host does at once (each map's
    # kernel memory is its entries times about the bytes noted; bench-memory
    # measures the total). A full one is never silent: a call beyond
    # inflight_entries is counted as untraced; the LRU maps forget their
    # oldest entry (a blocker whose binder or closer was forgotten is shown
    # as held by no visible process, or without "left by").
    inflight_entries: int = 4096  # calls in flight at once (~136 B each)
    get_port_entries: int = 4096  # port allocations in flight, kprobe plan (~88 B)
    binder_entries: int = 4096  # traced sockets whose binder is remembered (~104 B)
    closer_entries: int = 8192  # connections whose closer is remembered (~160 B)
    # (the commands whose purpose is who left the TIME_WAITs take more:
    # TIMEWAIT_CLOSERS for timewait --watch, UI_CLOSERS for the UI)
    closer_args_entries: int = 2048  # processes whose command line is kept (~210 B)
    btf_path: str | None = None  # a BTF file for kernels that expose none
    object_path: Path = field(default_factory=object_path)
    # The parts this process loads, all in one object (tracer/plans.Part):
    # each command asks for what it reads, once, when it starts.
    events: bool = True  # bind/listen/connect calls and TCP closes
    groups: Need = field(default_factory=lambda: Need.OFF)  # reuseport counting
    iterators: bool = True  # socket iterators (libbpf only; bcc has none)
    # "libbpf" (the CO-RE object) or "bcc" (the same source compiled here,
    # against this kernel's headers); None: $PORTSCOPE_ENGINE, else libbpf.
    engine: str | None = None


@dataclass
class Counters:
    """Kernel-side counters, summed over CPUs."""

    emitted: int = 0
    lost: int = 0  # ring buffer full
    inflight_full: int = 0  # calls not traced: too many in flight at once


@dataclass
class PlanAttempt:
    plan: Plan
    ok: bool
    reason: str
    part: Part = Part.EVENTS


class Loaded(Protocol):
    """Programs loaded and attached by one loader (libbpf or bcc)."""

    def map(self, name: str) -> libbpf.Map | libbpf.FdMap: ...

    def has_map(self, name: str) -> bool: ...

    def program_fds(self) -> list[tuple[str, int]]: ...

    def close(self) -> None: ...

    # Optional programs (plans.OPTIONAL_PROGRAMS) that did not attach: why.
    unattached: dict[str, str]


class Engine:
    """The process's one loaded object: its events (ring buffer, counters,
    closers), its reuseport counting and its socket iterators, each part
    with the plan that loaded it. Create with :func:`tracer.loader.open_engine`."""

    def __init__(self, loaded: Loaded, plans: "Plans", facts: KernelFacts,
                 engine: str = "libbpf") -> None:
        self._loaded: Loaded | None = loaded
        self.plan = plans.events  # None: no events loaded (portscope groups)
        self.group_plan = plans.groups  # None: groups not counted (see groups_problem)
        self.groups_problem = plans.groups_problem
        self.engine = engine
        self.attempts = plans.attempts  # the events' plans tried, in order
        self.group_attempts = plans.group_attempts
        self.carries_iterators = plans.iterators
        self.facts = facts
        self.iterators: "Closeable | None" = None  # the process's iterators, when they are ours
        self._counters = loaded.map("ps_counters") if loaded.has_map("ps_counters") else None
        self._ncpus = libbpf.possible_cpus()
        self._pending: list[bytes] = []
        self._ring: libbpf.RingBuffer | None = None
        self._closers = self._closer_args = None
        if self.plan is not None:
            self._ring = libbpf.RingBuffer(loaded.map("ps_events"), self._pending.append)
            self._closers = loaded.map("ps_closers")
            self._closer_args = loaded.map("ps_closer_args")
        self._closers_pin: str | None = None

    @property
    def compat_callers(self) -> str:
        """Whether 32-bit callers' calls are traced: "yes", or why not."""
        return compat_callers(self.plan, self.loaded.unattached, self.facts.compat_abi)

    @property
    def plan_name(self) -> str:
        """The events' plan, as commands show it ("none": no events loaded)."""
        return self.plan.value if self.plan else "none"

    @property
    def loaded(self) -> Loaded:
        assert self._loaded is not None, "engine is closed"
        return self._loaded

    @property
    def records_closes(self) -> bool:
        """Whether this engine's programs record who closes connections."""
        return self._closers is not None

    def publish_closers(self) -> None:
        """Pin the closers maps in bpffs (mounting it if need be) for other
        portscope processes (``portscope timewait``); withdrawn by close()."""
        if self._closers_pin is None and self._closers is not None:
            self._closers_pin = closers.publish(self._closers, self._closer_args)

    def poll(self, timeout_ms: int = 100) -> list[bytes]:
        """Raw ps_event records that arrived within ``timeout_ms``."""
        assert self._ring is not None, "engine is closed"
        self._ring.poll(timeout_ms)
        out, self._pending[:] = list(self._pending), []
        return out

    def drain(self) -> list[bytes]:
        """Every record still in the ring buffer, without waiting."""
        assert self._ring is not None, "engine is closed"
        self._ring.consume()
        out, self._pending[:] = list(self._pending), []
        return out

    def counters(self) -> Counters:
        return Counters(
            emitted=self.counter(PsCounter.EMITTED),
            lost=self.counter(PsCounter.LOST),
            inflight_full=self.counter(PsCounter.INFLIGHT_FULL),
        )

    def counter(self, idx: int) -> int:
        """One ps_counters slot, summed over CPUs."""
        if self._counters is None:
            return 0
        raw = self._counters.lookup(struct.pack("I", idx), 8 * self._ncpus) or b""
        return sum(struct.unpack(f"{len(raw) // 8}Q", raw))

    def map(self, name: str) -> libbpf.Map | libbpf.FdMap:
        assert self._loaded is not None, "engine is closed"
        return self._loaded.map(name)

    def recursion_misses(self, part: Part | None = None) -> int:
        """Runs the kernel skipped because the same program was already
        running on that CPU (a tracepoint hit from an interrupt), of one
        part's programs or of all."""
        assert self._loaded is not None, "engine is closed"
        return sum(libbpf.recursion_misses(fd, name) for name, fd in self._loaded.program_fds()
                   if part is None or part_of(name) is part)

    def program_types(self) -> dict[str, int]:
        """Each attached program, with the type the kernel loaded it as
        (BPF_PROG_TYPE_*: which hooks this plan really uses)."""
        assert self._loaded is not None, "engine is closed"
        return {name: libbpf.program_type(fd, name) for name, fd in self._loaded.program_fds()}

    def closers(self) -> dict[closers.ConnKey, closers.Closer]:
        """The closes this engine recorded (also readable by other processes
        through the pinned map: closers.read_pinned)."""
        if self._closers is None or self._closer_args is None:
            return {}
        return closers.read_fd(self._closers.fd, Clock(), self._closer_args.fd)

    def close(self) -> None:
        if self._loaded and self._closers is not None:
            closers.withdraw(self._closers, self._closers_pin, self._closer_args)
        if self._ring:
            self._ring.free()
            self._ring = None
        if self.iterators is not None:
            self.iterators.close()
            self.iterators = None
        if self._loaded:
            self._loaded.close()
            self._loaded = None

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Closeable(Protocol):
    def close(self) -> None: ...


@dataclass
class Plans:
    """The plan each part of one object was loaded with, and what was tried."""

    events: Plan | None
    groups: Plan | None
    groups_problem: str | None = None  # why groups are not counted, when asked for
    iterators: bool = False  # the object carries the socket iterators
    attempts: list[PlanAttempt] = field(default_factory=list)  # the events' plans
    group_attempts: list[PlanAttempt] = field(default_factory=list)


# A loader: load and attach the programs of these plans (None: the part is
# not loaded) in one object, iterators included or not.
Load = Callable[[Plan | None, Plan | None, bool], Loaded]


def open_parts(config: EngineConfig, facts: KernelFacts, candidates: list[Plan], load: Load,
               engine: str, where: str) -> Engine:
    """Try the candidates in order for each part, in one object, until one
    load carries every part that can run: a failing program names its part
    (tracer/plans.part_of), and only that part moves on to its next plan.
    A plan asked for by name that cannot run is an error for events and
    for required groups; optional groups and the iterators are dropped,
    with the reason kept (``Engine.groups_problem``)."""
    requested = config.plan or forced_plan()
    order = [requested] if requested else candidates
    events: list[Plan | None] = list(order) if config.events else [None]
    groups: list[Plan | None] = list(order) if config.groups is not Need.OFF else [None]
    iterators = config.iterators
    chosen = Plans(None, None)

    def give_up(part: Part, attempts: list[PlanAttempt], what: str) -> PortscopeError:
        if requested:
            return PlanUnavailable(f"the {requested.value} plan cannot {what} {where}: "
                                   f"{attempts[-1].reason}")
        tried = "; ".join(f"{a.plan.value}: {a.reason}" for a in attempts if a.part is part)
        return Unsupported(f"no probe plan can {what} {where} ({tried})")

    while True:
        ep, gp = events[0], (groups[0] if groups else None)
        tried = {Part.EVENTS: ep, Part.GROUPS: gp}
        refused: tuple[Part, Plan, str] | None = next(
            ((part, plan, why) for part, plan in tried.items()
             if plan is not None and (why := facts.static_reason_against(plan))), None)
        if refused is None:
            try:
                loaded = load(ep, gp, iterators)
            except PortscopeError as exc:
                part = part_of(exc.program)
                if part is Part.ITERATORS:
                    iterators = False  # they load on their own, where needed, and say why not
                    continue
                if tried[part] is None:  # no program named: the one part that is loaded
                    part = Part.GROUPS if ep is None else Part.EVENTS
                plan = tried[part]
                if plan is None or not isinstance(exc, PlanUnavailable) and (
                        part is Part.EVENTS or config.groups is Need.REQUIRED):
                    raise
                if not isinstance(exc, PlanUnavailable):
                    groups = [g for g in groups if g is None]  # other plans would fail alike
                refused = (part, plan, str(exc))
            else:
                if ep:
                    chosen.attempts.append(PlanAttempt(ep, True, f"loaded and attached ({engine})"))
                if gp:
                    chosen.group_attempts.append(
                        PlanAttempt(gp, True, f"loaded and attached ({engine})", Part.GROUPS))
                chosen.events, chosen.groups, chosen.iterators = ep, gp, iterators
                return Engine(loaded, chosen, facts, engine=engine)
            finally:
                libbpf.trim_heap()
        part, plan, why = refused
        if part is Part.GROUPS:
            chosen.group_attempts.append(PlanAttempt(plan, False, why, Part.GROUPS))
            groups = [g for g in groups[1:] if g is not None] if groups else []
            if not groups:
                error = give_up(Part.GROUPS, chosen.group_attempts, "count reuseport groups")
                if config.groups is Need.REQUIRED:
                    raise error
                chosen.groups_problem = str(error)
                groups = [None]
        else:
            chosen.attempts.append(PlanAttempt(plan, False, why))
            events = events[1:]
            if requested or not events:
                raise give_up(Part.EVENTS, chosen.attempts, "run")


def preflight(facts: KernelFacts, config: EngineConfig, need_btf: bool = True) -> None:
    """The failures that need no probe loaded to be explained (the bcc
    engine, which compiles against headers, needs no BTF)."""
    if not facts.privileged:
        raise PermissionDenied(
            "portscope needs root (or CAP_SYS_ADMIN, or CAP_BPF and CAP_PERFMON) to load its probes: "
            "run it with sudo"
        )
    if config.btf_path:
        btf_is_a_file(config.btf_path)
    if need_btf and not facts.btf:
        raise NoBTF(
            "this kernel exposes no BTF (/sys/kernel/btf/vmlinux, CONFIG_DEBUG_INFO_BTF=y): "
            "pass --btf FILE with a BTF file for this kernel (for example from btfhub)"
        )
    if facts.lockdown == "confidentiality":
        raise PermissionDenied(
            "kernel lockdown is in confidentiality mode, which forbids BPF programs from "
            "reading kernel memory: portscope cannot trace on this boot"
        )
    if not facts.syscall_tracepoints:
        raise Unsupported(
            "the syscalls tracepoints are missing: mount tracefs "
            "(mount -t tracefs nodev /sys/kernel/tracing) on a kernel built with CONFIG_FTRACE_SYSCALLS"
        )
    if not config.object_path.is_file():
        raise ObjectInvalid(
            f"the probe object {config.object_path} is missing: run scripts/build-probes"
        )


def btf_is_a_file(path: str) -> None:
    """A --btf path must be a regular file: libbpf would block for ever on a
    FIFO and read a device without end."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise NoBTF(f"the BTF file {path} does not exist") from None
    except OSError as exc:
        raise NoBTF(f"the BTF file {path} cannot be read: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        raise NoBTF(f"the BTF file {path} is not a regular file")


def success_mask(config: EngineConfig) -> int:
    """The kinds of call whose successes the probes send (ps_config.success_kinds)."""
    names = config.successes
    if names is None:
        names = frozenset() if config.errors_only else frozenset({"bind", "listen", "connect"})
    mask = 0
    for name in names:
        mask |= 1 << PsKind[name.upper()]
    return mask


RING_MAX = 1 << 30  # what --ring-size accepts (tracer/arguments.py)


def ring_size(requested: int) -> int:
    """Ring buffers must be a power of two pages; round up."""
    size = max(requested, os.sysconf("SC_PAGE_SIZE"))
    if size > RING_MAX:
        raise UsageError(f"a ring buffer of {requested} bytes is too large: at most 1G")
    return 1 << (size - 1).bit_length()


def about(program: str | None, error: PortscopeError) -> PortscopeError:
    """The error, marked with the program it is about (see plans.part_of)."""
    error.program = program
    return error


def summarize_verifier_log(log: str) -> str:
    """The verifier's last complaint, which is the reason it gave up."""
    lines = [ln.strip() for ln in log.strip().splitlines() if ln.strip()]
    skip = ("processed ", "verification time", "stack depth", "-- ", "mark_precise")
    reasons = [ln for ln in lines if not ln.startswith(skip) and not ln[:1].isdigit()]
    return reasons[-1] if reasons else (lines[-1] if lines else "no log")
