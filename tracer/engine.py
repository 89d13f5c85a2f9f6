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
import errno
import os
import re
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from . import closers, elfmaps, libbpf
from .errors import (
    NoBTF,
    ObjectInvalid,
    PermissionDenied,
    PlanUnavailable,
    ProbeError,
    Unsupported,
    UsageError,
    VerifierRejected,
)
from .events import Clock
from .layout import PsConfig, PsCounter, PsEvent, PsKind
from .plans import GROUP_PROGRAMS, PLAN_PROGRAMS, PREFERENCE, KernelFacts, Plan

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
    # Which program set each plan loads: PLAN_PROGRAMS (bind/listen/connect
    # events) or GROUP_PROGRAMS (reuseport group counters); the plan itself is
    # still chosen here, by open_engine, the same way for both.
    programs: dict[Plan, tuple[str, ...]] = field(default_factory=lambda: PLAN_PROGRAMS)
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


class Loaded(Protocol):
    """Programs loaded and attached by one loader (libbpf or bcc)."""

    def map(self, name: str) -> libbpf.Map | libbpf.FdMap: ...

    def program_fds(self) -> list[tuple[str, int]]: ...

    def close(self) -> None: ...


class LibbpfLoaded:
    def __init__(self, obj: libbpf.BpfObject, links: list[libbpf.Link]) -> None:
        self._obj = obj
        self._links = links

    def map(self, name: str) -> libbpf.Map:
        return self._obj.map(name)

    def program_fds(self) -> list[tuple[str, int]]:
        return [(p.name, p.fd) for p in self._obj.programs() if p.autoload]

    def close(self) -> None:
        for link in self._links:
            link.destroy()
        self._links = []
        self._obj.close()


class Engine:
    """One loaded and attached plan. Create with :func:`open_engine`."""

    def __init__(self, loaded: Loaded, plan: Plan, attempts: list[PlanAttempt],
                 facts: KernelFacts, engine: str = "libbpf") -> None:
        self._loaded: Loaded | None = loaded
        self.plan = plan
        self.engine = engine
        self.attempts = attempts
        self.facts = facts
        self._counters = loaded.map("ps_counters")
        self._ncpus = libbpf.possible_cpus()
        self._ring: libbpf.RingBuffer | None = None
        self._pending: list[bytes] = []
        self._ring = libbpf.RingBuffer(loaded.map("ps_events"), self._pending.append)
        self._closers = loaded.map("ps_closers")
        self._closer_args = loaded.map("ps_closer_args")
        self._closers_pin: str | None = None

    def publish_closers(self) -> None:
        """Pin the closers maps in bpffs (mounting it if need be) for other
        portscope processes (``portscope timewait``); withdrawn by close()."""
        if self._closers_pin is None:
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
        values = {}
        for idx in (PsCounter.EMITTED, PsCounter.LOST, PsCounter.INFLIGHT_FULL):
            raw = self._counters.lookup(struct.pack("I", idx), 8 * self._ncpus) or b""
            values[idx] = sum(struct.unpack(f"{len(raw) // 8}Q", raw))
        return Counters(
            emitted=values[PsCounter.EMITTED],
            lost=values[PsCounter.LOST],
            inflight_full=values[PsCounter.INFLIGHT_FULL],
        )

    def counter(self, idx: int) -> int:
        """One ps_counters slot, summed over CPUs."""
        raw = self._counters.lookup(struct.pack("I", idx), 8 * self._ncpus) or b""
        return sum(struct.unpack(f"{len(raw) // 8}Q", raw))

    def map(self, name: str) -> libbpf.Map | libbpf.FdMap:
        assert self._loaded is not None, "engine is closed"
        return self._loaded.map(name)

    def recursion_misses(self) -> int:
        """Runs the kernel skipped because the same program was already
        running on that CPU (a tracepoint hit from an interrupt)."""
        assert self._loaded is not None, "engine is closed"
        return sum(libbpf.recursion_misses(fd, name) for name, fd in self._loaded.program_fds())

    def program_types(self) -> dict[str, int]:
        """Each attached program, with the type the kernel loaded it as
        (BPF_PROG_TYPE_*: which hooks this plan really uses)."""
        assert self._loaded is not None, "engine is closed"
        return {name: libbpf.program_type(fd, name) for name, fd in self._loaded.program_fds()}

    def closers(self) -> dict[closers.ConnKey, closers.Closer]:
        """The closes this engine recorded (also readable by other processes
        through the pinned map: closers.read_pinned)."""
        return closers.read_fd(self._closers.fd, Clock(), self._closer_args.fd)

    def close(self) -> None:
        if self._loaded:
            closers.withdraw(self._closers, self._closers_pin, self._closer_args)
        if self._ring:
            self._ring.free()
            self._ring = None
        if self._loaded:
            self._loaded.close()
            self._loaded = None

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_libbpf_engine(config: EngineConfig, facts: KernelFacts) -> Engine:
    """Load and attach the requested plan from the CO-RE object, or the best
    plan the kernel allows (tracer/loader.py chooses between the engines)."""
    preflight(facts, config)
    requested = config.plan or forced_plan()

    def load(plan: Plan) -> Loaded:
        return LibbpfLoaded(*_load_plan(config, plan))

    return first_plan_that_runs([requested] if requested else list(PREFERENCE), requested,
                                facts, load, "libbpf", "on this kernel")


def first_plan_that_runs(candidates: list[Plan], requested: Plan | None, facts: KernelFacts,
                         load: Callable[[Plan], Loaded], engine: str, where: str) -> Engine:
    """The first of ``candidates`` that ``load`` loads and attaches; a plan
    that cannot run is an error only when it was asked for by name."""
    attempts: list[PlanAttempt] = []
    for plan in candidates:
        reason = facts.static_reason_against(plan)
        if reason is None:
            try:
                loaded = load(plan)
            except PlanUnavailable as exc:
                reason = str(exc)
            else:
                attempts.append(PlanAttempt(plan, True, f"loaded and attached ({engine})"))
                return Engine(loaded, plan, attempts, facts, engine=engine)
            finally:
                libbpf.trim_heap()
        attempts.append(PlanAttempt(plan, False, reason))
        if requested:
            raise PlanUnavailable(f"the {plan.value} plan cannot run {where}: {reason}")
    tried = "; ".join(f"{a.plan.value}: {a.reason}" for a in attempts)
    raise Unsupported(f"no probe plan can run {where} ({tried})")


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


def verify_plan(config: EngineConfig, plan: Plan) -> None:
    """Load the plan's programs (the verifier runs) without attaching them.

    This is how a plan that cannot attach here (kprobes without
    CONFIG_KPROBES) is still proven to pass this kernel's verifier."""
    obj, _ = _load_plan(config, plan, attach=False)
    obj.close()


def _load_plan(config: EngineConfig, plan: Plan,
               attach: bool = True) -> tuple[libbpf.BpfObject, list[libbpf.Link]]:
    obj = load_programs(config, plan, config.programs[plan])
    links: list[libbpf.Link] = []
    try:
        for prog in obj.programs():
            if attach and prog.autoload:
                links.append(_attach(prog, plan))
        return obj, links
    except BaseException:
        for link in links:
            link.destroy()
        obj.close()
        raise


def load_programs(config: EngineConfig, plan: Plan, names: tuple[str, ...]) -> libbpf.BpfObject:
    """Open the object, configure it, and load only the programs ``names``."""
    obj = _open(config)
    try:
        _configure(obj, config, plan, names)
        for prog in obj.programs():
            prog.set_autoload(prog.name in names)
        _load(obj, plan)
        return obj
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


def _size_maps(obj: libbpf.BpfObject, config: EngineConfig, programs: tuple[str, ...]) -> None:
    """Every map at its configured size, and every map none of ``programs``
    uses (tracer/elfmaps.py) at the smallest the kernel allows: one entry,
    one page for a ring buffer. The maps still exist (the engine reads a
    few by name), but cost the kernel next to nothing."""
    sizes = map_sizes(config)
    try:
        by_program = elfmaps.program_maps(config.object_path)
    except elfmaps.NotAnObject as exc:
        raise ObjectInvalid(f"{exc}; rebuild it with scripts/build-probes") from None
    used = elfmaps.maps_used(config.object_path, programs)
    for name in sorted(set().union(*by_program.values())):
        m = obj.map(name)
        if name not in used:
            m.set_max_entries(os.sysconf("SC_PAGE_SIZE") if m.type == libbpf.BPF_MAP_TYPE_RINGBUF else 1)
        elif name in sizes:
            m.set_max_entries(sizes[name])


def _configure(obj: libbpf.BpfObject, config: EngineConfig, plan: Plan,
               programs: tuple[str, ...]) -> None:
    _size_maps(obj, config, programs)
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


def _load(obj: libbpf.BpfObject, plan: Plan) -> None:
    try:
        obj.load()
    except OSError as exc:
        log = libbpf.take_log()
        raise _load_error(exc, log, plan) from _Log(log)


def _attach(prog: libbpf.Program, plan: Plan) -> libbpf.Link:
    try:
        return prog.attach()
    except OSError as exc:
        log = libbpf.take_log()
        if exc.errno in (errno.ENOENT, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL) and plan is not Plan.TRACEPOINT:
            raise PlanUnavailable(
                f"attaching {prog.name} ({prog.section}) failed: {libbpf.strerror(exc.errno)}"
            ) from _Log(log)
        if "tracepoint" in prog.section and exc.errno == errno.ENOENT:
            raise Unsupported(
                f"the tracepoint {prog.section.split('/', 1)[1]} does not exist on this kernel"
            ) from _Log(log)
        raise ProbeError(
            f"attaching probe {prog.name} ({prog.section}) failed: {libbpf.strerror(exc.errno)}", log
        ) from _Log(log)


_VERIFIER_LOG = re.compile(r"-- BEGIN PROG LOAD LOG --\n(.*?)-- END PROG LOAD LOG --", re.S)
_MISSING_HOOK = re.compile(r"failed to find kernel BTF type ID of '([^']+)'")
_FAILED_PROG = re.compile(r"prog '([^']+)': (?:BPF program load failed|failed to load)")


def _load_error(exc: OSError, log: str, plan: Plan) -> Exception:
    """Turn a failed bpf_object__load into the one error that explains it."""
    prog_match = _FAILED_PROG.search(log)
    prog = prog_match.group(1) if prog_match else None
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


