"""Typed errors: every failure a user can hit, each with one clear sentence.

The command line prints ``str(error)`` and exits with ``error.status``; a
traceback is shown only with ``--debug``.
"""

from __future__ import annotations

import enum


class ExitStatus(enum.IntEnum):
    """What portscope's exit code means, for scripts."""

    OK = 0
    ERROR = 1  # the command ran and failed (I/O error, probe failure)
    USAGE = 2  # bad arguments or bad input file
    NO_PERMISSION = 3  # not root, lockdown, BPF refused by policy
    UNSUPPORTED = 4  # the kernel lacks what the command needs (BTF, plan)
    CONFLICT = 5  # portscope why: the bind would fail
    INTERRUPTED = 130  # stopped by a signal before finishing its work


class PortscopeError(Exception):
    """Base class: ``str()`` is the one sentence shown to the user."""

    status = ExitStatus.ERROR
    # The BPF program a loading or attaching error is about, when one is:
    # the engine loads several parts in one object and must know whose it is.
    program: str | None = None


class UsageError(PortscopeError):
    status = ExitStatus.USAGE


class PermissionDenied(PortscopeError):
    status = ExitStatus.NO_PERMISSION


class Unsupported(PortscopeError):
    status = ExitStatus.UNSUPPORTED


class LibbpfMissing(Unsupported):
    """libbpf.so.1 cannot be loaded."""


class NoBTF(Unsupported):
    """The kernel (or the path given) has no usable BTF for CO-RE."""


class PlanUnavailable(Unsupported):
    """The requested probe plan cannot run on this kernel."""


class ObjectInvalid(PortscopeError):
    """The compiled probe object is missing or malformed."""

    status = ExitStatus.USAGE


class ProbeError(PortscopeError):
    """libbpf failed to load or attach; carries libbpf's own log."""

    def __init__(self, message: str, log: str = "") -> None:
        super().__init__(message)
        self.log = log


class VerifierRejected(ProbeError):
    """The kernel verifier refused a program. ``summary`` is the line that
    matters; ``log`` the whole verifier log (shown with ``-v``)."""

    def __init__(self, program: str, summary: str, log: str) -> None:
        super().__init__(
            f"the kernel verifier rejected probe program {program}: {summary}", log
        )
        self.program = program
        self.summary = summary


class OutputFailed(PortscopeError):
    """Writing the output failed (a full disk, a read-only file system)."""
