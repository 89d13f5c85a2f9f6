"""The probe engine: load a plan from probes/portscope.bpf.o, attach it, and
hand out raw events and counters.

Lifecycle, each phase with its own error: open the object, configure its
read-only data, choose the plan's programs, load (the verifier runs here),
attach, then poll. ``close()`` detaches everything and is safe to call twice.

Two loaders fill the same :class:`Engine`: libbpf with the CO-RE object
(the default, :func:`open_libbpf_engine`), and bcc, which compiles the same
source against the running kernel's headers (tracer/bcc_engine.py);
tracer/loader.py chooses between them.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import os
import re
import stat
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from . import closers, elfmaps, libbpf
from .errors import (
    NoBTF,
    ObjectInvalid,
    PermissionDenied,
    PlanUnavailable,
    PortscopeError,
    ProbeError,
    Unsupported,
    UsageError,
    VerifierRejected,
)
from .events import Clock
from .layout import PsConfig, PsCounter, PsEvent, PsKind
from .plans import (
    GROUP_PROGRAMS,
    PLAN_PROGRAMS,
    PREFERENCE,
    KernelFacts,
    Part,
    Plan,
    part_of,
    programs,
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


class LibbpfLoaded:
    """One loaded object and the links that attach its programs to hooks.

    Shared by the engine and the socket iterators of the same process
    (tracer/sockflags.py): :meth:`retain` takes a share, and each
    :meth:`close` gives one back; the object goes with the last. The engine's
    own links are destroyed at its close (tracing stops then), whoever still
    reads the iterators."""

    def __init__(self, obj: libbpf.BpfObject, links: list[libbpf.Link],
                 created: frozenset[str]) -> None:
        self._obj: libbpf.BpfObject | None = obj
        self._links = links
        self._created = created  # the maps the kernel was asked to create
        self._shares = 1
        self._lock = threading.Lock()

    def map(self, name: str) -> libbpf.Map:
        assert self._obj is not None, "object is closed"
        return self._obj.map(name)

    def has_map(self, name: str) -> bool:
        return name in self._created

    def program(self, name: str) -> libbpf.Program:
        assert self._obj is not None, "object is closed"
        return next(p for p in self._obj.programs() if p.name == name)

    def program_fds(self) -> list[tuple[str, int]]:
        assert self._obj is not None, "object is closed"
        return [(p.name, p.fd) for p in self._obj.programs() if p.autoload]

    def retain(self) -> "LibbpfLoaded":
        with self._lock:
            assert self._shares > 0, "object is closed"
            self._shares += 1
        return self

    def detach(self) -> None:
        """Destroy the hook links (tracing stops); the object stays loaded."""
        for link in self._links:
            link.destroy()
        self._links = []

    def close(self) -> None:
        """Give one share back (the engine's also detaches its links)."""
        self.detach()
        with self._lock:
            self._shares -= 1
            last = self._shares == 0
        if last and self._obj is not None:
            self._obj.close()
            self._obj = None


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


def open_libbpf_engine(config: EngineConfig, facts: KernelFacts) -> Engine:
    """Load and attach, in one object, the parts the configuration asks for,
    each with the requested plan or the best one the kernel allows
    (tracer/loader.py chooses between the engines)."""
    preflight(facts, config)

    def load(events: Plan | None, groups: Plan | None, iterators: bool) -> Loaded:
        return LibbpfLoaded(*load_object(config, {Part.EVENTS: events, Part.GROUPS: groups},
                                        iterators))

    return open_parts(config, facts, list(PREFERENCE), load, "libbpf", "on this kernel")


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
            "portscope needs root (or CAP_BPF and CAP_PERFMON) to load its probes: run it with sudo"
        )
    if config.btf_path:
        _btf_is_a_file(config.btf_path)
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


def verify_plan(config: EngineConfig, plan: Plan, part: Part = Part.EVENTS) -> None:
    """Load one part's programs of ``plan`` (the verifier runs) without
    attaching them.

    This is how a plan that cannot attach here (kprobes without
    CONFIG_KPROBES) is still proven to pass this kernel's verifier."""
    plans: dict[Part, Plan | None] = {part: plan}
    obj, _, _ = load_object(config, plans, attach=False)
    obj.close()


def load_object(config: EngineConfig, plans: dict[Part, Plan | None], iterators: bool = False,
               attach: bool = True) -> tuple[libbpf.BpfObject, list[libbpf.Link], frozenset[str]]:
    """Load the programs of each part's plan in one object, attach them to
    their hooks (the iterators are attached by whoever walks them); the
    object, its links and the maps it created."""
    names = programs(plans.get(Part.EVENTS), plans.get(Part.GROUPS), iterators)
    obj, created = load_programs(config, plans, names)
    links: list[libbpf.Link] = []
    try:
        for prog in obj.programs():
            if attach and prog.autoload and part_of(prog.name) is not Part.ITERATORS:
                links.append(_attach(prog, plans[part_of(prog.name)]))
        return obj, links, created
    except BaseException:
        for link in links:
            link.destroy()
        obj.close()
        raise


def load_programs(config: EngineConfig, plans: dict[Part, Plan | None],
                  names: tuple[str, ...]) -> tuple[libbpf.BpfObject, frozenset[str]]:
    """Open the object, configure it, and load only the programs ``names``;
    the object and the maps the kernel created for them."""
    obj = _open(config)
    try:
        created = _configure(obj, config, plans.get(Part.EVENTS) or Plan.TRACEPOINT, names)
        for prog in obj.programs():
            prog.set_autoload(prog.name in names)
        _load(obj, plans)
        return obj, created
    except BaseException:
        obj.close()
        raise


def _open(config: EngineConfig) -> libbpf.BpfObject:
    if config.btf_path:
        _check_btf_file(config.btf_path)
    try:
        return libbpf.BpfObject(str(config.object_path), config.btf_path)
    except OSError as exc:
        log = libbpf.take_log()
        raise ObjectInvalid(
            f"{config.object_path} is not a valid BPF object ({libbpf.strerror(exc.errno)}); "
            "rebuild it with scripts/build-probes"
        ) from _Log(log)


def _btf_is_a_file(path: str) -> None:
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


def _check_btf_file(path: str) -> None:
    _btf_is_a_file(path)
    try:
        libbpf.Btf.parse(path).close()
    except OSError as exc:
        raise NoBTF(f"{path} is not a usable BTF file ({libbpf.strerror(exc.errno)})") from _Log(libbpf.take_log())


def map_sizes(config: EngineConfig) -> dict[str, int]:
    """The sizes the configuration gives the maps it sizes (max_entries;
    bytes for the ring buffer); the others keep the object's own."""
    return {
        "ps_events": ring_size(config.ring_bytes),
        "ps_inflight": config.inflight_entries,
        "ps_get_port_args": config.get_port_entries,
        "ps_binders": config.binder_entries,
        "ps_closers": config.closer_entries,
        "ps_closer_args": config.closer_args_entries,
    }


def _size_maps(obj: libbpf.BpfObject, config: EngineConfig,
               programs: tuple[str, ...]) -> frozenset[str]:
    """Every map the loaded programs use at its configured size; every other
    map not created at all (it costs the kernel nothing). Which program uses
    which map is read from the object itself (tracer/elfmaps.py). Returns
    the maps that will exist."""
    sizes = map_sizes(config)
    try:
        by_program = elfmaps.program_maps(config.object_path)
    except elfmaps.NotAnObject as exc:
        raise ObjectInvalid(f"{exc}; rebuild it with scripts/build-probes") from None
    used = elfmaps.maps_used(config.object_path, programs)
    for name in sorted(set().union(*by_program.values())):
        m = obj.map(name)
        if name not in used:
            m.set_autocreate(False)
        elif name in sizes:
            m.set_max_entries(sizes[name])
    return frozenset(used)


def _configure(obj: libbpf.BpfObject, config: EngineConfig, plan: Plan,
               programs: tuple[str, ...]) -> frozenset[str]:
    created = _size_maps(obj, config, programs)
    cfg = PsConfig(
        target_tgid=config.pid,
        target_port=config.port,
        success_kinds=success_mask(config),
        plan=plan.code,
    )
    rodata = obj.map(".rodata")
    addr, size = rodata.initial_value()
    offset, var_size = _var_offset(obj, ".rodata", "ps_config")
    if var_size != ctypes.sizeof(cfg) or offset + var_size > size:
        raise ObjectInvalid(f"{obj.path}: ps_config in .rodata does not match tracer/layout.py")
    ctypes.memmove(addr + offset, ctypes.addressof(cfg), var_size)
    return created


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


def _var_offset(obj: libbpf.BpfObject, section: str, var: str) -> tuple[int, int]:
    btf = obj.btf()
    try:
        sec = btf.find(section, libbpf.BtfKind.DATASEC)
        return btf.datasec_vars(sec)[var]
    except KeyError:
        raise ObjectInvalid(f"{obj.path} has no {var} in {section}: rebuild it") from None


def _load(obj: libbpf.BpfObject, plans: dict[Part, Plan | None]) -> None:
    try:
        obj.load()
    except OSError as exc:
        log = libbpf.take_log()
        raise _load_error(exc, log, plans) from _Log(log)


def _attach(prog: libbpf.Program, plan: Plan | None) -> libbpf.Link:
    try:
        return prog.attach()
    except OSError as exc:
        log = libbpf.take_log()
        raise about(prog.name, _attach_error(prog, plan, exc.errno, log)) from _Log(log)


def _attach_error(prog: libbpf.Program, plan: Plan | None, err: int | None,
                  log: str) -> PortscopeError:
    if err in (errno.ENOENT, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL) \
            and plan is not Plan.TRACEPOINT:
        return PlanUnavailable(f"attaching {prog.name} ({prog.section}) failed: "
                               f"{libbpf.strerror(err or 0)}")
    if "tracepoint" in prog.section and err == errno.ENOENT:
        return Unsupported(
            f"the tracepoint {prog.section.split('/', 1)[1]} does not exist on this kernel")
    return ProbeError(
        f"attaching probe {prog.name} ({prog.section}) failed: {libbpf.strerror(err or 0)}", log)


def about(program: str | None, error: PortscopeError) -> PortscopeError:
    """The error, marked with the program it is about (see plans.part_of)."""
    error.program = program
    return error


_VERIFIER_LOG = re.compile(r"-- BEGIN PROG LOAD LOG --\n(.*?)-- END PROG LOAD LOG --", re.S)
_MISSING_HOOK = re.compile(r"failed to find kernel BTF type ID of '([^']+)'")
_FAILED_PROG = re.compile(r"prog '([^']+)': (?:BPF program load failed|failed to load)")


def _load_error(exc: OSError, log: str, plans: dict[Part, Plan | None]) -> PortscopeError:
    """Turn a failed bpf_object__load into the one error that explains it,
    marked with the program that failed."""
    prog_match = _FAILED_PROG.search(log)
    prog = prog_match.group(1) if prog_match else None
    plan = plans.get(part_of(prog)) or Plan.TRACEPOINT
    return about(prog, _load_error_of(exc, log, prog, plan))


def _load_error_of(exc: OSError, log: str, prog: str | None, plan: Plan) -> PortscopeError:
    what = f"probe {prog}" if prog else "portscope's BPF programs"
    verifier = _VERIFIER_LOG.search(log)
    if verifier and verifier.group(1).strip():
        return VerifierRejected(prog or "(unnamed)", summarize_verifier_log(verifier.group(1)),
                                verifier.group(1))
    if "failed to find valid kernel BTF" in log or "vmlinux BTF" in log and exc.errno == errno.ESRCH:
        return NoBTF("libbpf found no usable kernel BTF for CO-RE relocations")
    missing_hook = _MISSING_HOOK.search(log)
    if missing_hook:
        # tp_btf/fexit/fentry name a kernel type or function this kernel lacks
        # (sk_data_ready is a tracepoint since 6.6): the plan cannot run here.
        return PlanUnavailable(
            f"{prog} needs the kernel hook {missing_hook.group(1)}, which this kernel lacks"
        )
    if exc.errno == errno.EPERM and plan is Plan.FENTRY and prog:
        return PlanUnavailable(
            f"the kernel refused the fentry program {prog} (EPERM): BPF trampolines are not allowed here"
        )
    if plan is not Plan.TRACEPOINT and prog in _plan_only(plan):
        return PlanUnavailable(f"loading {prog} failed: {libbpf.strerror(exc.errno)}")
    if exc.errno == errno.EPERM:
        return PermissionDenied(
            f"the kernel refused to load {what} (EPERM): run as root, and check "
            "kernel.unprivileged_bpf_disabled, lockdown and any BPF LSM policy"
        )
    return ProbeError(f"loading {what} failed: {libbpf.strerror(exc.errno)}", log)


def _plan_only(plan: Plan) -> set[str]:
    tracepoint = set(PLAN_PROGRAMS[Plan.TRACEPOINT]) | set(GROUP_PROGRAMS[Plan.TRACEPOINT])
    return (set(PLAN_PROGRAMS[plan]) | set(GROUP_PROGRAMS[plan])) - tracepoint


def summarize_verifier_log(log: str) -> str:
    """The verifier's last complaint, which is the reason it gave up."""
    lines = [ln.strip() for ln in log.strip().splitlines() if ln.strip()]
    skip = ("processed ", "verification time", "stack depth", "-- ", "mark_precise")
    reasons = [ln for ln in lines if not ln.startswith(skip) and not ln[:1].isdigit()]
    return reasons[-1] if reasons else (lines[-1] if lines else "no log")


class _Log(Exception):
    """libbpf's log, chained under a user-facing error for --debug."""


