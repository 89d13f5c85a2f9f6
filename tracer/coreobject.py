"""The CO-RE object under libbpf: open probes/portscope.bpf.o, configure its
read-only data, size the maps the chosen programs use and leave the others
uncreated, load (the verifier runs here), attach, and turn every failure
into the one error that explains it, marked with the program it is about.
tracer/engine.py chooses the plans; this is how one is loaded."""

from __future__ import annotations

import ctypes
import errno
import re
import threading

from . import elfmaps, libbpf
from .engine import (
    Engine,
    EngineConfig,
    about,
    btf_is_a_file,
    open_parts,
    preflight,
    ring_size,
    success_mask,
    summarize_verifier_log,
)
from .errors import (
    NoBTF,
    ObjectInvalid,
    PermissionDenied,
    PlanUnavailable,
    PortscopeError,
    ProbeError,
    Unsupported,
    VerifierRejected,
)
from .layout import PsConfig
from .plans import (
    GROUP_PROGRAMS,
    PLAN_PROGRAMS,
    OPTIONAL_PROGRAMS,
    PREFERENCE,
    KernelFacts,
    Part,
    Plan,
    part_of,
    programs,
)


class LibbpfLoaded:
    """One loaded object and the links that attach its programs to hooks.

    Shared by the engine and the socket iterators of the same process
    (tracer/sockflags.py): :meth:`retain` takes a share, and each
    :meth:`close` gives one back; the object goes with the last. The engine's
    own links are destroyed at its close (tracing stops then), whoever still
    reads the iterators."""

    def __init__(self, obj: libbpf.BpfObject, links: list[libbpf.Link],
                 created: frozenset[str], unattached: dict[str, str] | None = None) -> None:
        self._obj: libbpf.BpfObject | None = obj
        self._links = links
        self._created = created  # the maps the kernel was asked to create
        self.unattached = unattached or {}  # optional programs that did not attach: why
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



def open_libbpf_engine(config: EngineConfig, facts: KernelFacts) -> Engine:
    """Load and attach, in one object, the parts the configuration asks for,
    each with the requested plan or the best one the kernel allows
    (tracer/loader.py chooses between the engines)."""
    preflight(facts, config)

    def load(events: Plan | None, groups: Plan | None, iterators: bool) -> LibbpfLoaded:
        return LibbpfLoaded(*load_object(config, {Part.EVENTS: events, Part.GROUPS: groups},
                                        iterators))

    return open_parts(config, facts, list(PREFERENCE), load, "libbpf", "on this kernel")



def verify_plan(config: EngineConfig, plan: Plan, part: Part = Part.EVENTS) -> None:
    """Load one part's programs of ``plan`` (the verifier runs) without
    attaching them.

    This is how a plan that cannot attach here (kprobes without
    CONFIG_KPROBES) is still proven to pass this kernel's verifier."""
    plans: dict[Part, Plan | None] = {part: plan}
    obj, _, _, _ = load_object(config, plans, attach=False)
    obj.close()


def load_object(config: EngineConfig, plans: dict[Part, Plan | None], iterators: bool = False,
               attach: bool = True,
               ) -> tuple[libbpf.BpfObject, list[libbpf.Link], frozenset[str], dict[str, str]]:
    """Load the programs of each part's plan in one object, attach them to
    their hooks (the iterators are attached by whoever walks them); the
    object, its links, the maps it created, and the optional programs that
    did not attach, with why (plans.OPTIONAL_PROGRAMS)."""
    names = programs(plans.get(Part.EVENTS), plans.get(Part.GROUPS), iterators)
    obj, created = load_programs(config, plans, names)
    links: list[libbpf.Link] = []
    unattached: dict[str, str] = {}
    try:
        for prog in obj.programs():
            if not (attach and prog.autoload and part_of(prog.name) is not Part.ITERATORS):
                continue
            if prog.name in OPTIONAL_PROGRAMS:
                try:
                    links.append(prog.attach())
                except OSError as exc:
                    libbpf.take_log()
                    unattached[prog.name] = libbpf.strerror(exc.errno or 0)
                continue
            links.append(_attach(prog, plans[part_of(prog.name)]))
        return obj, links, created, unattached
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



def _check_btf_file(path: str) -> None:
    btf_is_a_file(path)
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



_VERIFIER_LOG = re.compile(r"-- BEGIN PROG LOAD LOG --\n(.*?)-- END PROG LOAD LOG --", re.S)
_MISSING_HOOK = re.compile(r"failed to find kernel BTF type ID of '([^']+)'")
_UNKNOWN_HELPER = re.compile(r"^unknown func (\w+)#\d+$", re.M)
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
    helper = _UNKNOWN_HELPER.search(verifier.group(1)) if verifier else None
    if helper and prog:
        # The verifier's own answer that this kernel does not give the helper
        # to this kind of program (5.10: bpf_get_socket_cookie in fentry
        # programs): the plan cannot run here, another may.
        return PlanUnavailable(f"{prog} calls the BPF helper {helper.group(1)}, which this "
                               f"kernel does not offer to {plan.value} programs")
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


class _Log(Exception):
    """libbpf's log, chained under a user-facing error for --debug."""


