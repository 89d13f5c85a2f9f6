"""Can this kernel destroy a socket that no process holds? Asked of the kernel.

When every socket blocking a bind is one the kernel is closing on its own (a
TIME_WAIT socket, or an orphan still sending its FIN), the explainer offers
"wait", and "destroy it now with ``ss -K``" (netlink ``SOCK_DESTROY``). That
second fix is true only where the kernel can do it, and kernels differ:
Debian 11's 5.10 acknowledges the request and keeps both kinds of socket
(its ``tcp_abort`` refuses sockets that are not full sockets, and does not
finish orphans), 6.1 destroys both, and a kernel built without
CONFIG_INET_DIAG_DESTROY destroys none.

No version number or kernel symbol tells which, so the kernel is asked: in a
private network namespace, on a thread of its own, one TIME_WAIT socket and
one orphaned FIN_WAIT1 socket are made on loopback, ``SOCK_DESTROY`` is sent
for each, and a dump shows which are gone. It costs a few milliseconds, once
per process; the namespace and its sockets vanish with the thread. Without
the privileges for it (a new namespace needs CAP_SYS_ADMIN) the answer is
unknown, and the fix is offered as before, with its condition.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable

from . import sockdiag
from .nsenter import CLONE_NEWNET, setns_net

SOCK_DESTROY = 21  # linux/sock_diag.h
NLM_F_ACK = 0x04
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
_IFREQ_FLAGS = struct.Struct("16sH14x")
INET_DIAG_NOCOOKIE = 0xFFFFFFFF
SETTLE_S = 5.0  # how long loopback may take to reach a state (software emulation)
# The kernel destroys the socket before it replies; a socket still listed
# this long after the reply was kept.
GONE_S = 0.2

_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class Destroyable:
    """What SOCK_DESTROY frees on this kernel, by the kind of socket that
    holds the port (``explain.holding``): ``time_wait`` (TIME_WAIT, and a
    FIN_WAIT2 that the kernel keeps as a TIME_WAIT socket) and ``orphan``
    (a full socket whose process closed it: FIN_WAIT1, CLOSING, LAST_ACK)."""

    time_wait: bool
    orphan: bool

    def frees(self, held: str) -> bool:
        return self.orphan if held == "orphan" else self.time_wait


@functools.cache
def destroyable() -> Destroyable | None:
    """This kernel's answer, or None when it cannot be asked here."""
    outcome: list[Destroyable | None] = []
    worker = threading.Thread(target=lambda: outcome.append(_ask_in_private_namespace()),
                              name="portscope-sockdestroy")
    worker.start()
    worker.join()
    return outcome[0] if outcome else None


def _ask_in_private_namespace() -> Destroyable | None:
    try:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if _libc.unshare(CLONE_NEWNET) != 0:
            return None  # no privilege for a namespace of our own: unknown
        try:
            _loopback_up()
            return Destroyable(time_wait=_frees(_time_wait), orphan=_frees(_orphan))
        except OSError:
            return None
        finally:
            setns_net(home)
    finally:
        os.close(home)


def _loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        raw = fcntl.ioctl(s, SIOCGIFFLAGS, _IFREQ_FLAGS.pack(b"lo", 0))
        flags = _IFREQ_FLAGS.unpack(raw)[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, _IFREQ_FLAGS.pack(b"lo", flags | IFF_UP))


def _connection() -> tuple[socket.socket, socket.socket, int]:
    """An accepted loopback connection: (server side, client side, server port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(("127.0.0.1", port))
        server, _ = listener.accept()
    return server, client, port


def _time_wait() -> tuple[int, int, list[socket.socket]]:
    """A TIME_WAIT socket: the server closes first, then its client."""
    server, client, port = _connection()
    client_port = client.getsockname()[1]
    server.close()
    client.close()
    return port, client_port, []


def _orphan() -> tuple[int, int, list[socket.socket]]:
    """An orphaned full socket: the server closes with data its client does
    not read, so its FIN waits behind that data (FIN_WAIT1)."""
    server, client, port = _connection()
    server.setblocking(False)
    try:
        while True:
            server.send(b"x" * 65536)
    except BlockingIOError:
        pass
    server.close()
    return port, client.getsockname()[1], [client]  # the client stays open


def _frees(make: Callable[[], tuple[int, int, list[socket.socket]]]) -> bool:
    port, client_port, keep = make()
    try:
        if _the_socket(port, client_port) is None:
            raise OSError(errno.EAGAIN, "the socket to destroy did not appear")
        _send_destroy(port, client_port)  # done when the kernel replies
        deadline = time.monotonic() + GONE_S
        while _the_socket(port, client_port) is not None:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True
    finally:
        for s in keep:
            s.close()


def _the_socket(port: int, client_port: int) -> sockdiag.SockRecord | None:
    """The server side of the connection, once it has left the states a
    close passes through on its way (FIN_WAIT2 before TIME_WAIT)."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        found = sockdiag.dump(protocols=("tcp",), families=("ipv4",),
                              port=port, remote_port=client_port)
        if not found or found[0].state in ("TIME_WAIT", "FIN_WAIT1") \
                or time.monotonic() > deadline:
            return found[0] if found else None
        time.sleep(0.01)


def _send_destroy(port: int, client_port: int) -> None:
    """SOCK_DESTROY for the TCP socket 127.0.0.1:port <-> 127.0.0.1:client_port,
    in the inet_diag_req_v2 layout a dump request uses (sockdiag), with the
    exact socket id instead of bytecode. The kernel's reply is read but not
    trusted: 5.10 acknowledges an orphan it then keeps. The dump after it
    says what happened."""
    loopback = socket.inet_aton("127.0.0.1") + bytes(12)
    request = sockdiag._REQUEST_V2.pack(
        sockdiag._REQUEST_V2.size, SOCK_DESTROY, sockdiag.NLM_F_REQUEST | NLM_F_ACK, 1, 0,
        socket.AF_INET, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF,
        socket.htons(port), socket.htons(client_port), loopback, loopback, 0,
        INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE)
    with sockdiag._diag_socket() as nl:
        nl.send(request)
        nl.settimeout(SETTLE_S)
        nl.recv(4096)
