"""Probe plans against the running kernel: what loads, what attaches, and
that the automatic choice is the best plan that really works."""

from __future__ import annotations

import os

import pytest

from tests.needs import need_root
from tracer.coreobject import verify_plan
from tracer.engine import EngineConfig
from tracer.errors import PlanUnavailable, UsageError
from tracer.loader import open_engine
from tracer.plans import PREFERENCE, Plan, kernel_facts

pytestmark = pytest.mark.kernel


@pytest.fixture(autouse=True)
def _root() -> None:
    need_root()


@pytest.mark.parametrize("plan", [Plan.KPROBE, Plan.TRACEPOINT])
def test_plan_programs_pass_the_verifier(plan):
    """kprobe programs load (the verifier accepts them) even where kprobes
    cannot attach, such as a kernel without CONFIG_KPROBES."""
    verify_plan(EngineConfig(), plan)


def attaches(plan: Plan) -> bool:
    try:
        engine = open_engine(EngineConfig(plan=plan))
    except PlanUnavailable:
        return False
    engine.close()
    return True


def test_automatic_choice_is_the_first_plan_that_attaches(monkeypatch):
    monkeypatch.delenv("PORTSCOPE_PLAN", raising=False)  # set by scripts/kernel-matrix
    working = [plan for plan in PREFERENCE if attaches(plan)]
    assert working, "no plan attaches on this kernel"
    with open_engine(EngineConfig()) as engine:
        assert engine.plan == working[0]
        refused = [a.plan for a in engine.attempts if not a.ok]
        assert refused == list(PREFERENCE[: PREFERENCE.index(working[0])])


def test_portscope_plan_variable_replaces_the_automatic_choice(monkeypatch):
    """PORTSCOPE_PLAN forces a plan where none is configured (the tracepoint
    plan runs on every supported kernel); an explicit plan still wins."""
    monkeypatch.setenv("PORTSCOPE_PLAN", "tracepoint")
    with open_engine(EngineConfig()) as engine:
        assert engine.plan is Plan.TRACEPOINT
        assert [a.plan for a in engine.attempts] == [Plan.TRACEPOINT]
    monkeypatch.setenv("PORTSCOPE_PLAN", "fentry")
    with open_engine(EngineConfig(plan=Plan.TRACEPOINT)) as engine:
        assert engine.plan is Plan.TRACEPOINT


def test_portscope_plan_variable_rejects_unknown_plans(monkeypatch):
    monkeypatch.setenv("PORTSCOPE_PLAN", "bpftrace")
    with pytest.raises(UsageError, match="PORTSCOPE_PLAN='bpftrace' is not a probe plan"):
        open_engine(EngineConfig())


def test_kprobe_plan_refusal_matches_kernel_facts():
    """Where the kernel has no kprobe PMU, the kprobe plan must be refused
    with that reason; where it has one, it must attach."""
    facts = kernel_facts()
    if facts.kprobe_pmu:
        assert attaches(Plan.KPROBE)
    else:
        with pytest.raises(PlanUnavailable, match="kprobes are not available"):
            open_engine(EngineConfig(plan=Plan.KPROBE))


def bpf_fds() -> list[str]:
    """Kinds of BPF objects this process holds: 'bpf-prog', 'bpf-map',
    'bpf_link'..., and '[perf_event]': a kprobe attached the way kernels
    before 5.15 allow (perf_event_open and PERF_EVENT_IOC_SET_BPF, no BPF
    link; libbpf falls back to it there)."""
    kinds = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("anon_inode:bpf") or target == "anon_inode:[perf_event]":
            kinds.append(target.split(":", 1)[1])
    return kinds


def test_close_detaches_every_program():
    """While open, the engine holds programs and links; after close() this
    process holds no BPF object at all (programs detach when their last fd
    closes; other tracers on the host are not ours to count)."""
    before = bpf_fds()
    with open_engine(EngineConfig()):
        held = bpf_fds()
        assert held.count("bpf-prog") >= 6, held  # the six syscall programs at least
        attached = held.count("bpf_link") + held.count("[perf_event]")
        assert attached >= 6, held  # each attached
    assert bpf_fds() == before
