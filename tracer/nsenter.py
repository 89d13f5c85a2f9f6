"""Run a function inside another network namespace, on a thread of its own.

A socket (or a BPF iterator over sockets) belongs for life to the network
namespace of the thread that created it, and setns() moves only the calling
thread. So a short-lived thread enters the namespace, runs the function and
returns; no other thread, which might be creating sockets of its own, ever
changes namespace.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from typing import Callable, TypeVar

from .errors import PermissionDenied

CLONE_NEWNET = 0x40000000
T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int


def in_netns(netns_fd: int, fn: Callable[[], T]) -> T:
    """``fn()`` run inside the network namespace open on ``netns_fd``."""
    outcome: list[T | BaseException] = []

    def enter_and_run() -> None:
        try:
            outcome.append(_run_in(netns_fd, fn))
        except BaseException as exc:  # handed to the caller's thread below
            outcome.append(exc)

    worker = threading.Thread(target=enter_and_run, name="portscope-setns")
    worker.start()
    worker.join()
    result = outcome[0]
    if isinstance(result, BaseException):
        raise result
    return result


def _run_in(netns_fd: int, fn: Callable[[], T]) -> T:
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns_net(netns_fd)
        try:
            return fn()
        finally:
            setns_net(home)
    finally:
        os.close(home)


def setns_net(fd: int) -> None:
    """Move the calling thread into the network namespace open on ``fd``
    (setns(2); os.setns exists only from Python 3.12). Only for a thread of
    its own, or a forked child before exec."""
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        if err == errno.EPERM:
            raise PermissionDenied(
                "entering another network namespace needs CAP_SYS_ADMIN: run as root")
        raise OSError(err, f"setns: {os.strerror(err)}")
