"""Probe plans and what the running kernel allows.

A plan is a set of programs from probes/portscope.bpf.o that fill the one
event schema. ``kernel_facts()`` reads what can be read without loading
anything; whether fentry or kprobes really work is only known by trying,
which the engine does (``engine.open_parts``), falling back plan by plan
for each part a process loads (:class:`Part`).
"""

from __future__ import annotations

import enum
import os
import platform
import subprocess
from dataclasses import dataclass, field

from .layout import PsPlan


class Plan(str, enum.Enum):
    FENTRY = "fentry"
    KPROBE = "kprobe"
    TRACEPOINT = "tracepoint"

    @property
    def code(self) -> PsPlan:
        return PsPlan[self.name]


# bind(), listen() and connect(), at the system call tracepoints. Attaching
# any syscall tracepoint puts every task of the host on the slow system-call
# path (all syscalls pay), so the fentry plan uses trampolines on the kernel
# functions instead; kprobes keep the tracepoints (a kretprobe's pool of
# return instances would run dry under blocking connect() calls).
SYSCALL_TRACEPOINTS = (
    "ps_enter_bind",
    "ps_exit_bind",
    "ps_enter_listen",
    "ps_exit_listen",
    "ps_enter_connect",
    "ps_exit_connect",
)
SYSCALL_TRAMPOLINES = (
    "ps_fentry_bind",
    "ps_fexit_bind",
    "ps_fentry_listen",
    "ps_fexit_listen",
    "ps_fentry_connect",
    "ps_fexit_connect",
)
# 32-bit callers (x86): the system-call tracepoints do not fire for compat
# system calls, so the kprobe plan also probes the compat entry points, which
# only 32-bit callers reach. The fentry plan sees them at __sys_bind and the
# others already; the tracepoint plan cannot (raw_syscalls would run a program
# on every system call of the host): 32-bit callers are invisible there.
COMPAT_KPROBES = (
    "ps_kprobe_compat_bind",
    "ps_kretprobe_compat_bind",
    "ps_kprobe_compat_listen",
    "ps_kretprobe_compat_listen",
    "ps_kprobe_compat_connect",
    "ps_kretprobe_compat_connect",
    "ps_kprobe_compat_socketcall",
    "ps_kretprobe_compat_socketcall",
)
# Programs a plan attaches where the kernel has their hook and goes on
# without where it has not (a kernel without IA32 emulation has no compat
# entries): what did not attach is kept and shown (Engine.unattached,
# portscope doctor), never raised.
OPTIONAL_PROGRAMS = frozenset(COMPAT_KPROBES)

# Not a system call, but in every plan: who closes TCP connections first
# (sock:inet_sock_set_state), for the TIME_WAIT holders.
STATE_PROGRAMS = ("ps_state_change",)

# Socket iterators work the same under every plan.
ITERATOR_PROGRAMS = ("ps_iter_tcp", "ps_iter_udp", "ps_iter_task_file")

PLAN_PROGRAMS: dict[Plan, tuple[str, ...]] = {
    Plan.FENTRY: SYSCALL_TRAMPOLINES + STATE_PROGRAMS + ("ps_fexit_get_port",),
    Plan.KPROBE: SYSCALL_TRACEPOINTS + STATE_PROGRAMS
    + ("ps_kprobe_get_port", "ps_kretprobe_get_port") + COMPAT_KPROBES,
    Plan.TRACEPOINT: SYSCALL_TRACEPOINTS + STATE_PROGRAMS,
}

# Reuseport group counters (portscope groups, the UI, export): per-member
# deliveries in the ps_group_counts map, one schema, each plan with its own
# hook. Loaded beside PLAN_PROGRAMS, in the same object, when a command asks
# for the groups part (EngineConfig.groups), with a plan of its own.
GROUP_PROGRAMS: dict[Plan, tuple[str, ...]] = {
    Plan.FENTRY: ("ps_fexit_reuseport_select",),
    Plan.KPROBE: ("ps_kprobe_reuseport_select", "ps_kretprobe_reuseport_select"),
    # tp_btf/sk_data_ready: kernel 6.6 and later.
    Plan.TRACEPOINT: ("ps_group_data_ready",),
}



def compat_callers(plan: Plan | None, unattached: dict[str, str], compat_abi: bool) -> str:
    """Whether 32-bit callers' bind/listen/connect are traced under ``plan``:
    "yes"; "n/a: ..." on a kernel that runs no 32-bit programs (``compat_abi``
    false); else "no: " and why (``unattached``: optional programs that did
    not attach)."""
    if not compat_abi:
        return "n/a: this kernel runs no 32-bit programs (no IA32 emulation)"
    if plan is Plan.FENTRY:
        return "yes"
    if plan is Plan.KPROBE:
        missing = {name: why for name, why in unattached.items() if name in COMPAT_KPROBES}
        if not missing:
            return "yes"
        name, why = next(iter(missing.items()))
        return f"no: {len(missing)} compat entry probe(s) did not attach ({name}: {why})"
    if plan is Plan.TRACEPOINT:
        return "no: system-call tracepoints do not fire for 32-bit system calls"
    return "no: no events loaded"


class Part(str, enum.Enum):
    """What a process may load, all from one object (tracer/engine.py)."""

    EVENTS = "events"  # bind/listen/connect calls and TCP closes: PLAN_PROGRAMS
    GROUPS = "groups"  # reuseport deliveries: GROUP_PROGRAMS
    ITERATORS = "iterators"  # socket and file tables, read on demand: ITERATOR_PROGRAMS


def programs(events: Plan | None, groups: Plan | None, iterators: bool) -> tuple[str, ...]:
    """The programs one object loads: the events of one plan, the group
    counting of one plan (which may differ: tp_btf counting needs 6.6), the
    iterators (no plan: they attach to no hook)."""
    return ((PLAN_PROGRAMS[events] if events else ())
            + (GROUP_PROGRAMS[groups] if groups else ())
            + (ITERATOR_PROGRAMS if iterators else ()))


def part_of(program: str | None) -> Part:
    """Which part a program belongs to (names are unique across parts)."""
    if program in ITERATOR_PROGRAMS:
        return Part.ITERATORS
    if any(program in names for names in GROUP_PROGRAMS.values()):
        return Part.GROUPS
    return Part.EVENTS


# Preference order when the plan is chosen automatically: fentry is the
# cheapest and sees arguments at exit; kprobes next; syscall tracepoints
# alone miss refusals outside system calls (io_uring, kernel sockets).
PREFERENCE = (Plan.FENTRY, Plan.KPROBE, Plan.TRACEPOINT)

BTF_PATH = "/sys/kernel/btf/vmlinux"
TRACEFS_CANDIDATES = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
KPROBE_PMU = "/sys/bus/event_source/devices/kprobe/type"
LOCKDOWN = "/sys/kernel/security/lockdown"

# Capability bits (include/uapi/linux/capability.h).
CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39


@dataclass
class KernelFacts:
    """What can be learnt about the kernel without loading a program."""

    release: str
    arch: str
    privileged: bool
    btf: str | None
    tracefs: str | None
    syscall_tracepoints: bool
    kprobe_pmu: bool
    lockdown: str | None
    notes: list[str] = field(default_factory=list)
    # 32-bit programs can run (x86's IA32 emulation: /proc/sys/abi/vsyscall32).
    compat_abi: bool = False

    def static_reason_against(self, plan: Plan) -> str | None:
        """Why ``plan`` cannot work, as far as files tell; None if it might."""
        if not self.syscall_tracepoints:
            return "the syscalls tracepoints (CONFIG_FTRACE_SYSCALLS) are not available"
        if plan is Plan.KPROBE and not self.kprobe_pmu:
            return "kprobes are not available (CONFIG_KPROBES is off or perf kprobes are disabled)"
        if plan is Plan.FENTRY and not self.btf:
            return "fentry needs the kernel's BTF, which this kernel does not expose"
        return None


def kernel_facts(btf_path: str | None = None, mount_tracefs: bool = False) -> KernelFacts:
    tracefs = find_tracefs()
    notes: list[str] = []
    if tracefs is None and mount_tracefs and _privileged():
        tracefs = _mount_tracefs(notes)
    btf = btf_path or BTF_PATH
    return KernelFacts(
        release=platform.release(),
        arch=platform.machine(),
        privileged=_privileged(),
        btf=btf if os.path.exists(btf) else None,
        tracefs=tracefs,
        syscall_tracepoints=bool(tracefs)
        and os.path.exists(f"{tracefs}/events/syscalls/sys_enter_bind/id"),
        kprobe_pmu=os.path.exists(KPROBE_PMU),
        lockdown=_lockdown(),
        notes=notes,
        compat_abi=os.path.exists("/proc/sys/abi/vsyscall32"),
    )


def find_tracefs() -> str | None:
    for path in TRACEFS_CANDIDATES:
        if os.path.isdir(f"{path}/events"):
            return path
    return None


def _mount_tracefs(notes: list[str]) -> str | None:
    # libbpf attaches tracepoints through their ids in tracefs; mounting it is
    # harmless and is what the user would otherwise be told to do.
    path = TRACEFS_CANDIDATES[0]
    result = subprocess.run(
        ["mount", "-t", "tracefs", "nodev", path], capture_output=True, text=True
    )
    if result.returncode == 0 and os.path.isdir(f"{path}/events"):
        notes.append(f"mounted tracefs at {path}")
        return path
    return None


def _privileged() -> bool:
    """Root, or the capabilities that loading tracing programs needs."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    caps = int(line.split()[1], 16)
                    admin = bool(caps & (1 << CAP_SYS_ADMIN))
                    bpf = bool(caps & (1 << CAP_BPF)) and bool(caps & (1 << CAP_PERFMON))
                    return admin or bpf
    except OSError:
        pass
    return os.geteuid() == 0


def _lockdown() -> str | None:
    try:
        with open(LOCKDOWN) as f:
            text = f.read()
    except OSError:
        return None
    # "none [integrity] confidentiality": the bracketed word is in force.
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None
