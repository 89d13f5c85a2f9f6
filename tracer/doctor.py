"""``portscope doctor``: what the running kernel allows, and which plan wins.

Static facts come from files (plans.kernel_facts); whether a plan really works
is learnt by loading it, then attaching it, and detaching at once.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

from . import libbpf
from .colour import PLAIN, Palette, palette
from .coreobject import verify_plan
from .engine import (
    EngineConfig,
    Need,
    default_engine,
    forced_plan,
    preflight,
)
from .errors import ExitStatus, PlanUnavailable, PortscopeError
from .loader import open_engine
from .plans import PREFERENCE, KernelFacts, Plan, kernel_facts


@dataclass
class PlanReport:
    plan: str
    verifier: str  # "passed" or why not
    attach: str  # "ok" or why not
    groups: str = "not tried"  # reuseport counting with this plan: "ok" or why not
    compat: str = "not tried"  # 32-bit callers traced: "yes" or why not


def check_plan(config: EngineConfig, facts: KernelFacts, plan: Plan) -> PlanReport:
    try:
        verify_plan(config, plan)
        verifier = "passed"
    except PortscopeError as exc:
        return PlanReport(plan.value, str(exc), "not tried: the programs do not load")
    groups, _ = _try(EngineConfig(plan=plan, btf_path=config.btf_path, engine="libbpf",
                                  events=False, groups=Need.REQUIRED, iterators=False), facts)
    reason = facts.static_reason_against(plan)
    if reason:
        return PlanReport(plan.value, verifier, reason, groups, f"no: {reason}")
    attach, compat = _try(EngineConfig(plan=plan, btf_path=config.btf_path, engine="libbpf",
                                       iterators=False), facts)
    return PlanReport(plan.value, verifier, attach, groups, compat)


def _try(config: EngineConfig, facts: KernelFacts) -> tuple[str, str]:
    """"ok" when the configuration's parts load and attach, else why not;
    and whether 32-bit callers are traced then."""
    try:
        engine = open_engine(config, facts)
    except PlanUnavailable as exc:
        why = str(exc).split(": ", 1)[-1]
        return why, f"no: {why}"
    except PortscopeError as exc:
        return str(exc), f"no: {exc}"
    compat = engine.compat_callers
    engine.close()
    return "ok", compat


@dataclass
class BccReport:
    version: str | None
    problem: str | None  # None: bcc and the headers are there
    plans: list[PlanReport]  # with --engine bcc: each plan compiled, loaded, attached


def check_bcc(facts: KernelFacts, try_plans: bool) -> BccReport:
    from .bcc_engine import PLANS, availability

    version, problem = availability(facts.release)
    plans = []
    if problem is None and try_plans:
        for plan in PLANS:
            try:
                open_engine(EngineConfig(plan=plan, engine="bcc"), facts).close()
                plans.append(PlanReport(plan.value, "passed", "ok"))
            except PortscopeError as exc:
                verifier = "passed" if isinstance(exc, PlanUnavailable) else str(exc)
                plans.append(PlanReport(plan.value, verifier, str(exc).split(": ", 1)[-1]))
    return BccReport(version, problem, plans)


def run(args: argparse.Namespace) -> ExitStatus:
    # A bad $PORTSCOPE_PLAN or $PORTSCOPE_ENGINE would break every other
    # command: say so here too (exit status 2), before any report.
    forced_plan()
    default_engine()
    config = EngineConfig(btf_path=args.btf, engine="libbpf")
    facts = kernel_facts(args.btf, mount_tracefs=True)
    report: dict[str, object] = {"kernel": asdict(facts), "libbpf": libbpf.version()}
    blocker = None
    try:
        preflight(facts, config)
    except PortscopeError as exc:
        blocker = exc
    plans = [] if blocker else [check_plan(config, facts, p) for p in PREFERENCE]
    chosen = next((p for p in plans if p.attach == "ok"), None)
    report["plans"] = [asdict(p) for p in plans]
    report["chosen"] = chosen.plan if chosen else None
    report["problem"] = str(blocker) if blocker else None
    bcc = check_bcc(facts, args.engine == "bcc")
    report["bcc"] = asdict(bcc)
    from . import hooks

    bind_hooks = hooks.everywhere() if facts.privileged else []
    report["bind_hooks"] = [h.to_json() for h in bind_hooks]

    if args.json:
        print(json.dumps(report, indent=2))
    else:
        pal = palette(args)
        _print_human(facts, plans, chosen, blocker, pal)
        _print_bcc(bcc, args.engine == "bcc", pal)
        _print_hooks(bind_hooks, pal)
    if blocker:
        return blocker.status
    if args.engine == "bcc":
        return ExitStatus.OK if any(p.attach == "ok" for p in bcc.plans) else ExitStatus.UNSUPPORTED
    return ExitStatus.OK if chosen else ExitStatus.UNSUPPORTED


def _out(line: str = "", role: str | None = None, pal: Palette = PLAIN) -> None:
    """One line of the report, escaped (kernel and library messages are
    quoted), in the colour of ``role`` when ``pal`` colours."""
    for part in line.split("\n"):
        print(pal.paint(part, role))


def _yes(flag: object) -> str:
    return "yes" if flag else "no"


def _print_human(facts: KernelFacts, plans: list[PlanReport], chosen: PlanReport | None,
                 blocker: PortscopeError | None, pal: Palette = PLAIN) -> None:
    rows = [
        ("kernel", f"{facts.release} ({facts.arch})"),
        ("libbpf", libbpf.version()),
        ("privileged", _yes(facts.privileged)),
        ("kernel BTF", facts.btf or "missing"),
        ("tracefs", facts.tracefs or "not mounted"),
        ("syscall tracepoints", _yes(facts.syscall_tracepoints)),
        ("kprobes", _yes(facts.kprobe_pmu)),
        ("lockdown", facts.lockdown or "unknown (securityfs not mounted)"),
    ]
    for name, value in rows:
        _out(f"{name:20} {value}")
    for note in facts.notes:
        _out(f"{'note':20} {note}")
    if blocker:
        _out(f"\nportscope cannot trace here: {blocker}", "bad", pal)
        return
    _out(f"\n{'plan':11} {'loads':6} {'attaches':9} {'groups':7} {'32-bit':7} why not", "head", pal)
    for p in plans:
        loads = p.verifier == "passed"
        attaches = p.attach == "ok"
        counts = p.groups == "ok"
        compat = p.compat == "yes"
        why = "" if attaches else (p.attach if loads else p.verifier)
        if loads and not counts and p.groups != p.attach:
            why = "; ".join(filter(None, (why, f"groups: {p.groups}")))
        shown = _yes(compat) if attaches and not p.compat.startswith("n/a") else "-"
        if attaches and p.compat.startswith("no: "):
            why = "; ".join(filter(None, (why, f"32-bit callers: {p.compat.removeprefix('no: ')}")))
        _out(f"{p.plan:11} {_yes(loads):6} {_yes(attaches) if loads else '-':9} "
             f"{_yes(counts) if loads else '-':7} {shown:7} "
             f"{why}".rstrip())
    if chosen:
        _out(f"\nportscope will use the {chosen.plan} plan: the first of "
             f"{', '.join(p.value for p in PREFERENCE)} that attaches here.", "good", pal)
    else:
        _out("\nno plan attaches on this kernel.", "bad", pal)


def _print_bcc(bcc: BccReport, tried: bool, pal: Palette = PLAIN) -> None:
    if bcc.problem:
        _out(f"\nbcc engine: not available: {bcc.problem}", "warn", pal)
        return
    _out(f"\nbcc engine: available (bcc {bcc.version or 'unknown version'}, kernel headers "
          "installed)" + ("" if tried else "; 'portscope doctor --engine bcc' tries its plans"))
    for p in bcc.plans:
        _out(f"  {p.plan:11} {'ok' if p.attach == 'ok' else p.attach}")


def _print_hooks(found: list, pal: Palette = PLAIN) -> None:  # type: ignore[type-arg]
    """BPF programs that act on bind() (they can refuse it, or rewrite it)."""
    if not found:
        _out("\nbind programs: none attached (cgroup/bind4, bind6, post_bind4, post_bind6)")
        return
    _out("\nbind programs (they may refuse a bind with EPERM, or rewrite its address and port):",
         "warn", pal)
    for h in found:
        _out(f"  {h.name or 'unnamed':16} id {h.program_id:<6} cgroup/{h.hook:11} on {h.cgroup}")
