"""Errors that are decided before any probe loads, from the kernel's facts."""

import dataclasses

import pytest

from tracer.engine import EngineConfig, preflight, ring_size, summarize_verifier_log
from tracer.errors import ExitStatus, NoBTF, PermissionDenied, Unsupported
from tracer.plans import KernelFacts, Plan

GOOD = KernelFacts(release="6.18", arch="x86_64", privileged=True, btf="/sys/kernel/btf/vmlinux",
                   tracefs="/sys/kernel/tracing", syscall_tracepoints=True, kprobe_pmu=True,
                   lockdown="none")


def facts(**changes):
    return dataclasses.replace(GOOD, **changes)


@pytest.mark.parametrize(
    "changes,error,status,words",
    [
        ({"privileged": False}, PermissionDenied, ExitStatus.NO_PERMISSION, "needs root"),
        ({"btf": None}, NoBTF, ExitStatus.UNSUPPORTED, "exposes no BTF"),
        ({"lockdown": "confidentiality"}, PermissionDenied, ExitStatus.NO_PERMISSION, "lockdown"),
        ({"syscall_tracepoints": False, "tracefs": None}, Unsupported, ExitStatus.UNSUPPORTED,
         "tracefs"),
    ],
)
def test_preflight_refuses_with_one_sentence(changes, error, status, words):
    with pytest.raises(error) as exc:
        preflight(facts(**changes), EngineConfig())
    assert exc.value.status == status
    assert words in str(exc.value) and "\n" not in str(exc.value)


def test_preflight_accepts_a_capable_kernel():
    preflight(GOOD, EngineConfig())


def test_static_reasons_per_plan():
    assert facts(kprobe_pmu=False).static_reason_against(Plan.KPROBE)
    assert facts(kprobe_pmu=False).static_reason_against(Plan.TRACEPOINT) is None
    assert facts(btf=None).static_reason_against(Plan.FENTRY)


def testring_size_rounds_to_power_of_two_pages():
    assert ring_size(1) == 4096
    assert ring_size(5 << 20) == 8 << 20
    assert ring_size(8 << 20) == 8 << 20


def test_verifier_summary_is_the_last_complaint():
    # Shape of a real verifier log (recorded on 6.18), shortened.
    log = """\
func#0 @0
0: R1=ctx() R10=fp0
57: (85) call bpf_get_prandom_u32#7   ; R0=scalar() refs=4
61: (0f) r9 += r0
R9 unbounded memory access, make sure to bounds check any such access
processed 63 insns (limit 1000000) max_states_per_insn 0 total_states 4 peak_states 4 mark_read 2
"""
    assert summarize_verifier_log(log) == (
        "R9 unbounded memory access, make sure to bounds check any such access")


def test_which_plans_see_32bit_callers():
    from tracer.plans import COMPAT_KPROBES, OPTIONAL_PROGRAMS, PLAN_PROGRAMS, compat_callers

    assert compat_callers(Plan.FENTRY, {}, True) == "yes"
    assert compat_callers(Plan.KPROBE, {}, True) == "yes"
    # A compat entry the kernel does not have is said, with the error.
    missing = compat_callers(Plan.KPROBE, {COMPAT_KPROBES[0]: "No such file or directory"}, True)
    assert missing.startswith("no: ") and "No such file or directory" in missing
    # An optional program of another kind that failed does not count.
    assert compat_callers(Plan.KPROBE, {"ps_something_else": "gone"}, True) == "yes"
    assert compat_callers(Plan.TRACEPOINT, {}, True).startswith("no: ")
    assert compat_callers(None, {}, True).startswith("no: ")
    # A kernel without 32-bit programs misses nothing.
    assert all(compat_callers(p, {}, False).startswith("n/a: ") for p in Plan)
    # Only the kprobe plan carries them, and only they are optional.
    assert set(COMPAT_KPROBES) <= set(PLAN_PROGRAMS[Plan.KPROBE]) and OPTIONAL_PROGRAMS == set(COMPAT_KPROBES)
    assert not set(COMPAT_KPROBES) & set(PLAN_PROGRAMS[Plan.FENTRY] + PLAN_PROGRAMS[Plan.TRACEPOINT])
