"""The bcc engine: the same probes, compiled on this host against its kernel headers.

For hosts where the CO-RE object cannot load (no kernel BTF) but the kernel
headers are installed. bcc (Debian: python3-bpfcc) compiles
probes/portscope.bpf.c with PS_BCC defined (probes/compat.h says what
changes), creates its maps, loads and attaches the chosen plan's programs.
From there everything is shared with the libbpf engine: the same event
schema, ring buffer reader, counters and pinned closers map
(:class:`tracer.engine.Engine`).

What differs: the configuration (pid, port, successes, plan) is compiled in,
so each engine costs a compilation (seconds); fentry, tp_btf and the socket
iterators need BTF and do not exist here, so the plans are kprobe and
tracepoint, and `groups` runs with the kprobe plan only.
"""

from __future__ import annotations

import ctypes
import os
import re
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from . import libbpf
from .engine import (
    Engine,
    EngineConfig,
    about,
    forced_plan,
    open_parts,
    preflight,
    ring_size,
    success_mask,
    summarize_verifier_log,
)
from .errors import (
    ObjectInvalid,
    PermissionDenied,
    PlanUnavailable,
    PortscopeError,
    ProbeError,
    Unsupported,
    VerifierRejected,
)
from .plans import OPTIONAL_PROGRAMS, KernelFacts, Part, Plan, part_of, programs

SOURCE = Path(__file__).resolve().parent.parent / "probes" / "portscope.bpf.c"
# libbpf's CO-RE read macros, used by the source on both sides.
CORE_READ_HEADER = Path("/usr/include/bpf/bpf_core_read.h")
PLANS = (Plan.KPROBE, Plan.TRACEPOINT)  # in order of preference


def open_bcc_engine(config: EngineConfig, facts: KernelFacts) -> Engine:
    """Compile, load and attach the requested plan, or the best one bcc can run."""
    requested = config.plan or forced_plan()
    if requested is Plan.FENTRY:
        raise PlanUnavailable(
            "the bcc engine has no fentry plan (fentry needs the kernel's BTF, and bcc is for "
            "kernels without it): use --plan kprobe or tracepoint, or the libbpf engine")
    preflight(facts, config, need_btf=False)
    bcc = _import_bcc()
    _check_headers(facts.release)
    sections = _sections(config.object_path)

    def load(events: Plan | None, groups: Plan | None, _iterators: bool) -> "BccLoaded":
        # No iterators here (they need BTF): the process loads them on their own.
        return _load_plans(bcc, config, {Part.EVENTS: events, Part.GROUPS: groups}, sections,
                           facts.release)

    return open_parts(config, facts, list(PLANS), load, "bcc",
                      "with the bcc engine on this kernel")


# ---- what must be there -----------------------------------------------------


def availability(release: str) -> tuple[str | None, str | None]:
    """(bcc's version, None) when the engine could run here, else (version
    or None, the sentence that says what is missing)."""
    try:
        bcc = _import_bcc()
    except Unsupported as exc:
        return None, str(exc)
    version = getattr(getattr(bcc, "version", None), "__version__", None)
    try:
        _check_headers(release)
    except Unsupported as exc:
        return version, str(exc)
    return version, None


def _import_bcc() -> Any:
    try:
        import bcc  # type: ignore[import-not-found]
    except ImportError as exc:
        raise Unsupported(
            f"the bcc engine needs bcc's Python module, which {sys.executable} cannot import "
            f"({exc}): install python3-bpfcc (Debian, Ubuntu) and run portscope with that "
            "system Python, or use the default engine (--engine libbpf)") from None
    libbpf.reclaim_log()  # loading libbcc may have replaced libbpf's printer
    return bcc


def headers_dir(release: str) -> Path | None:
    """Where bcc will find this kernel's headers, or None."""
    build = Path(f"/lib/modules/{release}/build")
    if (build / "include").is_dir():
        return build
    kheaders = Path("/sys/kernel/kheaders.tar.xz")  # CONFIG_IKHEADERS
    if kheaders.exists():
        return kheaders
    return None


def _check_headers(release: str) -> None:
    if headers_dir(release) is None:
        raise Unsupported(
            f"the bcc engine compiles its probes against the running kernel's headers, and "
            f"none are installed for {release} (/lib/modules/{release}/build): install "
            f"linux-headers-{release} (Debian, Ubuntu), or use the default engine "
            "(--engine libbpf)")
    if not CORE_READ_HEADER.is_file():
        raise Unsupported(
            f"the bcc engine needs libbpf's headers ({CORE_READ_HEADER} is missing): "
            "install libbpf-dev (Debian, Ubuntu)")


def _sections(object_path: Path) -> dict[str, str]:
    """Program name -> section (its hook), read from the CO-RE object built
    from the same source: the one place the hooks are written."""
    if not object_path.is_file():
        raise ObjectInvalid(f"the probe object {object_path} is missing: run scripts/build-probes")
    try:
        obj = libbpf.BpfObject(str(object_path))
    except OSError as exc:
        raise ObjectInvalid(f"{object_path} is not a valid BPF object "
                            f"({libbpf.strerror(exc.errno)}): rebuild it with "
                            "scripts/build-probes") from None
    try:
        return {p.name: p.section for p in obj.programs()}
    finally:
        obj.close()


# ---- compile, load, attach ------------------------------------------------


_MAP_OPS = re.compile(r"\bPS_(LOOKUP|UPDATE|INSERT|DELETE)\((\w+),\s*")
_RESERVE = re.compile(r"\bPS_RESERVE\((\w+),\s*")
_SUBMIT = re.compile(r"\bPS_SUBMIT\((\w+),\s*(\w+)\)")
_OUTPUT = re.compile(r"\bPS_OUTPUT\((\w+),\s*(\w+),\s*(\w+)\)")


def bcc_source(text: str) -> str:
    """The source with its map operations spelt as bcc's method calls
    (bcc rewrites those in the source text, so they cannot stay macros)."""
    text = _MAP_OPS.sub(lambda m: f"{m[2]}.{m[1].lower()}(", text)
    text = _RESERVE.sub(r"\1.ringbuf_reserve(", text)
    text = _SUBMIT.sub(r"\1.ringbuf_submit(\2, 0)", text)
    text = _OUTPUT.sub(r"\1.ringbuf_output(\2, \3, 0)", text)
    left = re.search(r"\bPS_(LOOKUP|UPDATE|INSERT|DELETE|RESERVE|SUBMIT|OUTPUT)\(", text)
    if left:
        raise ObjectInvalid(f"{SOURCE}: a {left[0]}...) the bcc engine cannot spell out")
    return text


def cflags(config: EngineConfig, plan: Plan) -> list[str]:
    page = os.sysconf("SC_PAGE_SIZE")
    return [
        "-DPS_BCC",
        f"-I{SOURCE.parent}",
        "-idirafter", "/usr/include",  # bpf/bpf_core_read.h, after the kernel's own
        f"-DPS_CFG_target_tgid={config.pid}",
        f"-DPS_CFG_target_port={config.port}",
        f"-DPS_CFG_success_kinds={success_mask(config)}",
        f"-DPS_CFG_plan={int(plan.code)}",
        f"-DPS_RING_PAGES={ring_size(config.ring_bytes) // page}",
        f"-DPS_INFLIGHT_ENTRIES={config.inflight_entries}",
        f"-DPS_GET_PORT_ENTRIES={config.get_port_entries}",
        f"-DPS_BINDER_ENTRIES={config.binder_entries}",
        f"-DPS_CLOSER_ENTRIES={config.closer_entries}",
        f"-DPS_CLOSER_ARGS_ENTRIES={config.closer_args_entries}",
        "-w",  # the kernel's headers warn; the libbpf build is the -Werror one
    ]


def _load_plans(bcc: Any, config: EngineConfig, plans: dict[Part, Plan | None],
                sections: dict[str, str], release: str) -> "BccLoaded":
    """Compile the source once and load and attach each part's programs."""
    names = programs(plans.get(Part.EVENTS), plans.get(Part.GROUPS), False)
    hooks = {}
    for name in names:
        hook = _hook(sections.get(name, ""))
        if hook is None:
            raise about(name, PlanUnavailable(
                f"{name} ({sections.get(name, 'unknown hook')}) needs the kernel's BTF, which "
                "the bcc engine does not use"))
        hooks[name] = hook
    text = bcc_source(SOURCE.read_text())
    plan = plans.get(Part.EVENTS) or plans.get(Part.GROUPS) or Plan.KPROBE
    with _stderr_captured() as log:
        try:
            bpf = bcc.BPF(text=text.encode(), cflags=cflags(config, plan))
        except Exception:
            raise ProbeError(
                f"bcc could not compile {SOURCE.name} against the headers of {release}: "
                f"{_first_error(log())}", log()) from None
    loaded = BccLoaded(bpf)
    try:
        for name, (kind, target) in hooks.items():
            part_plan = plans.get(part_of(name)) or plan
            try:
                _attach(bpf, bcc, name, kind, target, part_plan)
            except PortscopeError as exc:
                if name not in OPTIONAL_PROGRAMS:
                    raise
                loaded.unattached[name] = str(exc)
    except BaseException:
        loaded.close()
        raise
    return loaded


def _hook(section: str) -> tuple[str, str] | None:
    """(kind, target) for the hooks bcc attaches; None for BTF-based ones."""
    kind, _, target = section.partition("/")
    if kind == "tracepoint":
        return kind, target.replace("/", ":", 1)
    if kind in ("kprobe", "kretprobe"):
        return kind, target
    return None


def _attach(bpf: Any, bcc: Any, name: str, kind: str, target: str, plan: Plan) -> None:
    prog_type = bcc.BPF.TRACEPOINT if kind == "tracepoint" else bcc.BPF.KPROBE
    with _stderr_captured() as log:
        try:
            bpf.load_func(name.encode(), prog_type)
        except Exception as exc:
            raise about(name, _load_error(name, str(exc), log(), plan)) from None
        try:
            if kind == "tracepoint":
                bpf.attach_tracepoint(tp=target.encode(), fn_name=name.encode())
            elif kind == "kprobe":
                bpf.attach_kprobe(event=target.encode(), fn_name=name.encode())
            else:
                bpf.attach_kretprobe(event=target.encode(), fn_name=name.encode())
        except Exception:
            if kind == "tracepoint":
                raise about(name, Unsupported(
                    f"the tracepoint {target} does not exist on this kernel")) from None
            raise about(name, PlanUnavailable(
                f"attaching {name} ({kind} on {target}) failed")) from None


def _load_error(name: str, message: str, log: str, plan: Plan) -> PortscopeError:
    if "processed " in log or "R1 " in log or re.search(r"^\d+: \(", log, re.M):
        return VerifierRejected(name, summarize_verifier_log(log), log)
    if "super-user" in message:
        return PermissionDenied(
            f"the kernel refused to load probe {name} (EPERM): run as root, and check "
            "kernel.unprivileged_bpf_disabled, lockdown and any BPF LSM policy")
    if plan is Plan.KPROBE and "kprobe" in name:  # the plan's own programs
        return PlanUnavailable(f"loading {name} failed: {message}")
    return ProbeError(f"loading probe {name} with bcc failed: {message}", log)


def _first_error(log: str) -> str:
    for line in log.splitlines():
        if "error:" in line:
            return line.split("error:", 1)[1].strip()
    lines = [ln for ln in log.splitlines() if ln.strip()]
    return lines[-1].strip() if lines else "no compiler output"


@contextmanager
def _stderr_captured() -> Iterator[Any]:
    """bcc, clang and the verifier write to file descriptor 2: keep that
    for the error (shown with --debug), not on the user's terminal. bcc also
    takes over libbpf's log printer (one libbpf per process): give it back."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)

        def read() -> str:
            tmp.flush()
            tmp.seek(0)
            return tmp.read().decode(errors="replace")

        try:
            yield read
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            libbpf.reclaim_log()


class BccLoaded:
    """A compiled bcc module with its programs attached (tracer.engine.Loaded)."""

    def __init__(self, bpf: Any) -> None:
        self._bpf: Any = bpf
        self._maps: dict[str, libbpf.FdMap] = {}
        self.unattached: dict[str, str] = {}  # optional programs that did not attach: why

    def has_map(self, name: str) -> bool:
        return True  # bcc creates every map of the source

    def map(self, name: str) -> libbpf.FdMap:
        if name not in self._maps:
            table = self._bpf.get_table(name.encode())
            self._maps[name] = libbpf.FdMap(
                table.map_fd, name, ctypes.sizeof(table.Key), ctypes.sizeof(table.Leaf),
                int(table.max_entries))
        return self._maps[name]

    def program_fds(self) -> list[tuple[str, int]]:
        return [(name.decode(), fn.fd) for name, fn in self._bpf.funcs.items()]

    def close(self) -> None:
        if self._bpf is not None:
            with _stderr_captured():
                self._bpf.cleanup()
            self._bpf = None
