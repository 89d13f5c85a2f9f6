"""Socket inventory from netlink ``sock_diag``: every TCP and UDP socket.

This is what ``ss`` reads, done the way ``ss`` does it, for the same reason:
hosts with 100,000+ TIME_WAIT sockets. Two things keep it fast:

* Filtering happens in the kernel. A port query sends ``inet_diag`` bytecode
  (``INET_DIAG_REQ_BYTECODE``) so that the kernel skips non-matching sockets
  while it walks its hash tables; only matching sockets cross into Python.
* Decoding is one ``struct.unpack_from`` per socket over the raw netlink
  buffer, with address strings cached (a TIME_WAIT storm repeats the same few
  addresses). No generic attribute parser sits in the per-socket path:
  attributes are skipped by length, because nothing here needs them.

``port`` matches the **local** port only (``ss sport = :P``), not the remote
one: a socket holds its local port, and that is what a bind() conflicts with
and what "who holds port P" asks. A client connected to some host's port P
holds an ephemeral port, not P; when the server is on this host its own
socket (listener, connection or TIME_WAIT) is the one on P and is reported.

Every socket the kernel reports is kept as it reports it, including the
ones that are not full sockets: SYN_RECV request sockets and TIME_WAIT
sockets have inode 0 and uid 0, and a TIME_WAIT socket whose peer has not yet
sent its FIN is reported in its sub-state FIN_WAIT2 (with the timewait
timer). TCP sockets that are bound but neither listening nor connected hold
a port too; the kernel (6.8+) lists them only when asked for the pseudo-state
``TCP_BOUND_INACTIVE``, and reports them in state CLOSE, like an unconnected
UDP socket. ``ss`` calls that state UNCONN; this module keeps the kernel's
state names (``tcp_states.h``): ESTABLISHED, TIME_WAIT, CLOSE, ...
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
import threading
from dataclasses import dataclass
from typing import Callable, Iterable

from .errors import PermissionDenied, Unsupported

# ---- kernel constants (linux/netlink.h, linux/sock_diag.h, linux/inet_diag.h)

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x01
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
INET_DIAG_REQ_BYTECODE = 1
INET_DIAG_BC_S_EQ = 11
CLONE_NEWNET = 0x40000000

PROTOCOLS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}
FAMILIES = {"ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}

# TCP states as the kernel numbers them (include/net/tcp_states.h). UDP uses
# two of them: ESTABLISHED (connected) and CLOSE (not connected).
STATE_NAMES = ("UNKNOWN_0", "ESTABLISHED", "SYN_SENT", "SYN_RECV", "FIN_WAIT1", "FIN_WAIT2",
               "TIME_WAIT", "CLOSE", "CLOSE_WAIT", "LAST_ACK", "LISTEN", "CLOSING")
STATE_CODES = {name: code for code, name in enumerate(STATE_NAMES) if code}
# Request-only pseudo-state: with it, the kernel also walks its bind table for
# TCP sockets that are bound but inactive (reported in state CLOSE).
TCP_BOUND_INACTIVE = 13
# A state byte beyond the known names still decodes (to "UNKNOWN_n").
_STATE_BY_CODE = STATE_NAMES + tuple(f"UNKNOWN_{code}" for code in range(len(STATE_NAMES), 256))

# idiag_timer, named as ss names them; 0 (no timer) is None.
TIMER_NAMES = {1: "on", 2: "keepalive", 3: "timewait", 4: "persist"}

# struct nlmsghdr, then struct inet_diag_msg: family, state, timer, retrans,
# then inet_diag_sockid (ports in network order, addresses as 16 raw bytes,
# interface, cookie as two host-order u32), then expires, rqueue, wqueue,
# uid, inode. Ports are unpacked natively and byte-swapped with ntohs so that
# one struct covers the whole message.
_NLMSGHDR = struct.Struct("=IHHII")
_DIAG_MSG = struct.Struct("=BBBBHH16s16sIIIIIIII")
_REQUEST = struct.Struct("=IHHII" "BBBBI" "HH16s16sIII")
_NLATTR = struct.Struct("=HH")

# The kernel fills one buffer of at most 32 KiB per recvmsg() of a dump
# (netlink caps its dump allocation there), so a bigger buffer does not cut
# the number of system calls; this one leaves room for any single message
# and MSG_TRUNC catches one that would not fit.
RECV_BUFFER = 256 * 1024


@dataclass(frozen=True, slots=True)
class SockRecord:
    """One socket as the kernel reported it, in one network namespace."""

    netns: int  # inode of the network namespace
    protocol: str  # "tcp" | "udp"
    family: str  # "ipv4" | "ipv6"
    state: str  # kernel state name: LISTEN, ESTABLISHED, TIME_WAIT, CLOSE, ...
    local_addr: str
    local_port: int
    remote_addr: str
    remote_port: int
    rqueue: int  # LISTEN: connections waiting in the accept queue
    wqueue: int  # LISTEN: the backlog given to listen() (capped by somaxconn)
    timer: str | None  # "on" (retransmit), "keepalive", "timewait", "persist"
    timer_ms: int  # time left on that timer
    uid: int
    inode: int  # 0 for TIME_WAIT, SYN_RECV and not yet accepted connections
    cookie: int  # the kernel's unique socket id (ss -e "sk:")
    bound_dev_if: int  # SO_BINDTODEVICE interface index, 0 if none


def dump(netns_fd: int | None = None, protocols: Iterable[str] = ("tcp", "udp"),
         families: Iterable[str] = ("ipv4", "ipv6"), states: Iterable[str] | None = None,
         port: int | None = None) -> list[SockRecord]:
    """Every socket of the given protocols and families, optionally only
    those in ``states`` (kernel state names) and on local ``port``.

    ``netns_fd`` is an open network-namespace file (``/proc/PID/ns/net``,
    ``/run/netns/NAME``); None means the calling thread's own namespace.
    """
    requests = [(PROTOCOLS[p], FAMILIES[f]) for p in protocols for f in families]
    mask = state_mask(states)
    bytecode = port_bytecode(port) if port is not None else b""
    if netns_fd is None:
        netns = os.stat("/proc/thread-self/ns/net").st_ino
        sock = _diag_socket()
    else:
        netns = os.fstat(netns_fd).st_ino
        sock = socket_in_netns(netns_fd, _diag_socket)
    with sock:
        records: list[SockRecord] = []
        for seq, (protocol, family) in enumerate(requests, start=1):
            sock.send(build_request(seq, protocol, family, mask, bytecode))
            records.extend(_receive(sock, netns, protocol, family))
        return records


def state_mask(states: Iterable[str] | None) -> int:
    """The idiag_states bit mask for state names (None: every state).

    Asking for CLOSE also asks for TCP_BOUND_INACTIVE, without which the
    kernel leaves out bound-only TCP sockets. Asking for SYN_RECV is enough
    for request sockets: the kernel adds TCP_NEW_SYN_RECV itself.
    """
    names = STATE_CODES if states is None else list(states)
    unknown = [name for name in names if name not in STATE_CODES]
    if unknown:
        raise ValueError(f"unknown socket state {unknown[0]!r}; known: {', '.join(STATE_CODES)}")
    mask = 0
    for name in names:
        mask |= 1 << STATE_CODES[name]
    if "CLOSE" in names:
        mask |= 1 << TCP_BOUND_INACTIVE
    return mask


def port_bytecode(port: int) -> bytes:
    """inet_diag bytecode that accepts a socket iff its local port is ``port``.

    Each op is (code, yes, no): the kernel jumps ``yes`` bytes forward when
    the condition holds, ``no`` bytes otherwise; landing exactly on the end
    accepts, jumping past it (end + 4) rejects. S_EQ carries its operand in
    the ``no`` field of a second op, which ``yes`` = 8 steps over.
    """
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port out of range: {port}")
    return struct.pack("=BBHBBH", INET_DIAG_BC_S_EQ, 8, 12, 0, 0, port)


def build_request(seq: int, protocol: int, family: int, states: int, bytecode: bytes) -> bytes:
    """One SOCK_DIAG_BY_FAMILY dump request (inet_diag_req_v2 + bytecode)."""
    attr = _NLATTR.pack(_NLATTR.size + len(bytecode), INET_DIAG_REQ_BYTECODE) + bytecode if bytecode else b""
    length = _REQUEST.size + len(attr)
    head = _REQUEST.pack(length, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, 0,
                         family, protocol, 0, 0, states, 0, 0, b"", b"", 0, 0, 0)
    return head + attr


def socket_in_netns(netns_fd: int, make: Callable[[], socket.socket]) -> socket.socket:
    """``make()`` a socket inside another network namespace.

    A socket belongs for life to the namespace of the thread that created it,
    and setns() moves only the calling thread. So a short-lived thread of our
    own enters the namespace, creates the socket and goes back; no other
    thread (which might be creating sockets of its own) ever changes
    namespace.
    """
    outcome: list[socket.socket | BaseException] = []

    def enter_and_make() -> None:
        try:
            outcome.append(_make_in(netns_fd, make))
        except BaseException as exc:  # handed to the caller's thread below
            outcome.append(exc)

    worker = threading.Thread(target=enter_and_make, name="portscope-setns")
    worker.start()
    worker.join()
    result = outcome[0]
    if isinstance(result, BaseException):
        raise result
    return result


def _make_in(netns_fd: int, make: Callable[[], socket.socket]) -> socket.socket:
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(netns_fd)
        try:
            return make()
        finally:
            _setns(home)
    finally:
        os.close(home)


_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    """setns(2) into a network namespace (os.setns exists only from 3.12)."""
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        if err == errno.EPERM:
            raise PermissionDenied("entering another network namespace needs CAP_SYS_ADMIN: run as root")
        raise OSError(err, f"setns: {os.strerror(err)}")


def _diag_socket() -> socket.socket:
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG)
    except OSError as exc:
        if exc.errno in (errno.EPROTONOSUPPORT, errno.EAFNOSUPPORT):
            raise Unsupported("the kernel has no netlink sock_diag (CONFIG_INET_DIAG)") from exc
        raise
    sock.bind((0, 0))
    return sock


def _receive(sock: socket.socket, netns: int, protocol: int, family: int) -> list[SockRecord]:
    """Read one dump to its end, decoding each inet_diag_msg.

    The inner loop is the cost of a 100k-socket dump, so it binds what it
    calls to locals and decodes with a single unpack per socket.
    """
    proto_name = "tcp" if protocol == socket.IPPROTO_TCP else "udp"
    family_name = "ipv4" if family == socket.AF_INET else "ipv6"
    addr_text = _address_formatter(family)
    unpack_header = _NLMSGHDR.unpack_from
    unpack_msg = _DIAG_MSG.unpack_from
    ntohs = socket.ntohs
    state_by_code = _STATE_BY_CODE
    timer_names = TIMER_NAMES
    record = SockRecord
    records: list[SockRecord] = []
    append = records.append
    buf = bytearray(RECV_BUFFER)
    while True:
        size = sock.recv_into(buf, RECV_BUFFER, socket.MSG_TRUNC)
        if size > RECV_BUFFER:
            raise OSError(errno.EMSGSIZE, f"sock_diag message of {size} bytes does not fit the buffer")
        offset = 0
        while offset < size:
            length, kind, _flags, _seq, _pid = unpack_header(buf, offset)
            if kind != SOCK_DIAG_BY_FAMILY:
                _check_end(kind, buf, offset, proto_name)
                return records
            (_fam, state, timer, _retrans, sport, dport, src, dst, ifindex,
             cookie_lo, cookie_hi, expires, rqueue, wqueue, uid, inode) = unpack_msg(buf, offset + 16)
            append(record(netns, proto_name, family_name, state_by_code[state],
                          addr_text(src), ntohs(sport), addr_text(dst), ntohs(dport),
                          rqueue, wqueue, timer_names.get(timer), expires,
                          uid, inode, cookie_lo | cookie_hi << 32, ifindex))
            offset += (length + 3) & ~3


def _check_end(kind: int, buf: bytearray, offset: int, proto_name: str) -> None:
    """A dump ends with NLMSG_DONE; NLMSG_ERROR carries a negative errno.
    Both carry an int status: non-zero means the dump failed."""
    if kind not in (NLMSG_DONE, NLMSG_ERROR):
        raise OSError(errno.EPROTO, f"unexpected netlink message type {kind} in a sock_diag dump")
    (status,) = struct.unpack_from("=i", buf, offset + _NLMSGHDR.size)
    if status == -errno.ENOENT:
        raise Unsupported(f"the kernel has no sock_diag support for {proto_name} "
                          f"(module {proto_name}_diag not available)")
    if status:
        raise OSError(-status, f"sock_diag {proto_name} dump: {os.strerror(-status)}")


def _address_formatter(family: int) -> Callable[[bytes], str]:
    """Raw 16-byte idiag_src/dst to text, memoised for this dump: a TIME_WAIT
    storm has 100,000 sockets but only a handful of distinct addresses."""
    width = 4 if family == socket.AF_INET else 16
    ntop = socket.inet_ntop
    cache: dict[bytes, str] = {}

    def text(raw: bytes) -> str:
        try:
            return cache[raw]
        except KeyError:
            cache[raw] = result = ntop(family, raw[:width])
            return result

    return text
