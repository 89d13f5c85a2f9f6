"""How a failed object load becomes one error (tracer/coreobject.py). The
kernel-side proof is the kernel matrix: on 5.10 the fentry plan's group
program meets ``unknown func bpf_get_socket_cookie#46`` for real, and
``portscope doctor`` and the group tests there see the plan unavailable."""

from __future__ import annotations

import errno

from tracer.coreobject import _load_error_of
from tracer.errors import PlanUnavailable, VerifierRejected
from tracer.plans import Plan


def log_with(verifier: str) -> str:
    return ("libbpf: prog 'ps_fexit_reuseport_select': BPF program load failed: Invalid argument\n"
            f"libbpf: -- BEGIN PROG LOAD LOG --\n{verifier}\n-- END PROG LOAD LOG --\n")


def test_a_helper_the_kernel_does_not_offer_makes_the_plan_unavailable() -> None:
    log = log_with("0: R1=ctx() R10=fp0\n12: (85) call bpf_get_socket_cookie#46\n"
                   "unknown func bpf_get_socket_cookie#46\nprocessed 12 insns")
    error = _load_error_of(OSError(errno.EINVAL, "x"), log, "ps_fexit_reuseport_select",
                           Plan.FENTRY)
    assert isinstance(error, PlanUnavailable)
    assert str(error) == ("ps_fexit_reuseport_select calls the BPF helper "
                          "bpf_get_socket_cookie, which this kernel does not offer to fentry "
                          "programs")


def test_any_other_rejection_stays_a_verifier_rejection() -> None:
    log = log_with("12: (61) r0 = *(u32 *)(r1 +0)\ninvalid mem access 'scalar'")
    error = _load_error_of(OSError(errno.EACCES, "x"), log, "ps_fexit_reuseport_select",
                           Plan.FENTRY)
    assert isinstance(error, VerifierRejected) and error.summary == "invalid mem access 'scalar'"
