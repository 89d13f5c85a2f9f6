"""Socket inventory from netlink ``sock_diag``: every TCP and UDP socket.

This is what ``ss`` reads, done the way ``ss`` does it, for the same reason:
hosts with 100,000+ TIME_WAIT sockets. Three things keep it fast:

* Filtering happens in the kernel. A port query sends ``inet_diag`` bytecode
  (``INET_DIAG_REQ_BYTECODE``) so that the kernel skips non-matching sockets
  while it walks its hash tables; only matching sockets cross into Python.
* The kernel walks its tables as few times as it can: TCP for both families
  is one dump, not one per family (see ``dump_queries``).
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

import errno
import os
import socket
import struct
from dataclasses import dataclass, fields, make_dataclass
from typing import Iterable, Mapping

from .errors import Unsupported
from .nsenter import in_netns
from .records import TCP_STATES

# ---- kernel constants (linux/netlink.h, linux/sock_diag.h, linux/inet_diag.h)

NETLINK_SOCK_DIAG = 4
TCPDIAG_GETSOCK = 18
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x01
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
INET_DIAG_REQ_BYTECODE = 1
INET_DIAG_SKMEMINFO = 7  # reply attribute: u32 sk_meminfo[], SK_MEMINFO_DROPS at index 8
SK_MEMINFO_DROPS = 8
INET_DIAG_BC_S_EQ = 11
INET_DIAG_BC_D_EQ = 12

PROTOCOLS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}
FAMILIES = {"ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}
_FAMILY_NAMES = {code: name for name, code in FAMILIES.items()}

# The states a request can ask for, by the kernel's numbers (events.TCP_STATES).
# UDP uses two of them: ESTABLISHED (connected) and CLOSE (not connected).
# NEW_SYN_RECV is left out: sock_diag reports request sockets as SYN_RECV.
STATE_CODES = {name: code for code, name in TCP_STATES.items() if name != "NEW_SYN_RECV"}
# Request-only pseudo-state: with it, the kernel also walks its bind table for
# TCP sockets that are bound but inactive (reported in state CLOSE).
TCP_BOUND_INACTIVE = 13
# idiag_timer, named as ss names them; 0 (no timer) is None.
TIMER_NAMES = (None, "on", "keepalive", "timewait", "persist")

# Indexed by the raw byte, so that a value this module does not know (a
# newer kernel's) still decodes instead of raising.
_STATE_BY_CODE = tuple(TCP_STATES.get(code, f"UNKNOWN_{code}") for code in range(256))
_TIMER_BY_CODE = TIMER_NAMES + ("unknown",) * (256 - len(TIMER_NAMES))

# struct nlmsghdr, then struct inet_diag_msg: family, state, timer, retrans,
# then inet_diag_sockid (ports in network order, addresses as 16 raw bytes,
# interface, cookie as two host-order u32), then expires, rqueue, wqueue,
# uid, inode. Ports are unpacked natively and byte-swapped with ntohs so that
# one struct covers the whole message.
_NLMSGHDR = struct.Struct("=IHHII")
_DIAG_MSG = struct.Struct("=BBBBHH16s16sIIIIIIII")
_SOCKID = "HH16s16sIII"  # zero in a dump request: the bytecode does the choosing
_REQUEST_V2 = struct.Struct("=IHHII" "BBBBI" + _SOCKID)  # inet_diag_req_v2
_REQUEST_V1 = struct.Struct("=IHHII" "BBBB" + _SOCKID + "II")  # inet_diag_req
_NLATTR = struct.Struct("=HH")
_U32 = struct.Struct("=I")

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
    # sk_drops (ss -m's "d"), when the dump asked for it (``memory=True``):
    # for a listener, connections refused because its accept queue was full
    # (tcp_listendrop); for a UDP socket, datagrams its buffer could not take.
    # None for TIME_WAIT and request sockets: the kernel has none to send.
    drops: int | None = None


# The decoder builds each record as this mutable twin and then gives it the
# frozen class. A frozen dataclass's __init__ stores every field through
# object.__setattr__ (about 1.2 us for 16 fields); the twin's plain slot
# stores take 0.35 us, and at 100,000 sockets that is most of the decoding
# time. Assigning __class__ is allowed because both classes have exactly the
# same slots; the result is an ordinary, immutable SockRecord.
_SockRecordBuilder = make_dataclass(
    "_SockRecordBuilder", [(f.name, f.type) for f in fields(SockRecord)], slots=True)


# Which states to ask for: one filter for every protocol (None: every
# state), or one per protocol name (a protocol the mapping leaves out: every
# state). A group watcher wants TCP listeners but UDP sockets in any state.
StateFilter = Iterable[str] | Mapping[str, Iterable[str] | None] | None


def states_of(states: StateFilter, protocol: str) -> tuple[str, ...] | None:
    """The states ``states`` asks of ``protocol`` (None: every state)."""
    if isinstance(states, Mapping):
        states = states.get(protocol)
    return None if states is None else tuple(states)


def dump(netns_fd: int | None = None, protocols: Iterable[str] = ("tcp", "udp"),
         families: Iterable[str] = ("ipv4", "ipv6"), states: StateFilter = None,
         port: int | None = None, remote_port: int | None = None,
         memory: bool = False) -> list[SockRecord]:
    """Every socket of the given protocols and families, optionally only
    those in ``states`` (kernel state names), on local ``port`` and with
    ``remote_port``; ``memory``: with each socket's ``drops`` (the kernel
    then adds its memory counters to every message, which a big dump does
    not need).

    ``netns_fd`` is an open network-namespace file (``/proc/PID/ns/net``,
    ``/run/netns/NAME``); None means the calling thread's own namespace.
    """
    queries = dump_queries(tuple(protocols), tuple(families))
    masks = {name: state_mask(states_of(states, name)) for name in PROTOCOLS}
    bytecode = port_bytecode(port, remote_port)
    ext = 1 << (INET_DIAG_SKMEMINFO - 1) if memory else 0
    if netns_fd is None:
        netns = os.stat("/proc/thread-self/ns/net").st_ino
        sock = _diag_socket()
    else:
        netns = os.fstat(netns_fd).st_ino
        sock = in_netns(netns_fd, _diag_socket)
    with sock:
        records: list[SockRecord] = []
        for seq, (kind, protocol, family) in enumerate(queries, start=1):
            mask = masks["tcp" if protocol == socket.IPPROTO_TCP else "udp"]
            sock.send(build_request(seq, kind, protocol, family, mask, bytecode, ext))
            records.extend(_receive(sock, netns, kind, protocol, memory))
        return records


def dump_queries(protocols: tuple[str, ...], families: tuple[str, ...]) -> list[tuple[int, int, int]]:
    """The dumps to ask for: (message type, protocol, family).

    The kernel walks its whole hash tables for each dump, and on a big host
    that walk, not the matching sockets, is what a port query costs. TCP over
    both families is therefore one dump, through the original request
    TCPDIAG_GETSOCK, which the kernel serves for every family at once
    (SOCK_DIAG_BY_FAMILY needs one family per request). UDP has no such
    request; its table is small.
    """
    unknown = [name for name in protocols if name not in PROTOCOLS] + \
        [name for name in families if name not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown protocol or family {unknown[0]!r}")
    queries: list[tuple[int, int, int]] = []
    for protocol in protocols:
        if protocol == "tcp" and set(families) == set(FAMILIES):
            queries.append((TCPDIAG_GETSOCK, socket.IPPROTO_TCP, socket.AF_UNSPEC))
            continue
        queries.extend((SOCK_DIAG_BY_FAMILY, PROTOCOLS[protocol], FAMILIES[f]) for f in families)
    return queries


def state_mask(states: Iterable[str] | None) -> int:
    """The idiag_states bit mask for state names (None: every state).

    Asking for CLOSE also asks for TCP_BOUND_INACTIVE, without which the
    kernel leaves out bound-only TCP sockets. Asking for SYN_RECV is enough
    for request sockets: the kernel adds TCP_NEW_SYN_RECV itself.
    """
    names = list(STATE_CODES if states is None else states)
    unknown = [name for name in names if name not in STATE_CODES]
    if unknown:
        raise ValueError(f"unknown socket state {unknown[0]!r}; known: {', '.join(STATE_CODES)}")
    mask = 0
    for name in names:
        mask |= 1 << STATE_CODES[name]
    if "CLOSE" in names:
        mask |= 1 << TCP_BOUND_INACTIVE
    return mask


def port_bytecode(port: int | None, remote_port: int | None = None) -> bytes:
    """inet_diag bytecode that accepts a socket iff its local port is
    ``port`` and its remote port is ``remote_port`` (None: any).

    Each op is (code, yes, no): the kernel jumps ``yes`` bytes forward when
    the condition holds, ``no`` bytes otherwise; landing exactly on the end
    accepts, jumping past it (end + 4) rejects. S_EQ and D_EQ carry their
    operand in the ``no`` field of a second op, which ``yes`` = 8 steps over.
    """
    tests = [(code, p) for code, p in ((INET_DIAG_BC_S_EQ, port), (INET_DIAG_BC_D_EQ, remote_port))
             if p is not None]
    out = b""
    for i, (code, p) in enumerate(tests):
        if not 0 <= p <= 0xFFFF:
            raise ValueError(f"port out of range: {p}")
        left = 8 * (len(tests) - i)  # bytes from this op to the end
        out += struct.pack("=BBHBBH", code, 8, left + 4, 0, 0, p)
    return out


def build_request(seq: int, kind: int, protocol: int, family: int, states: int, bytecode: bytes,
                  ext: int = 0) -> bytes:
    """One dump request: inet_diag_req_v2 (SOCK_DIAG_BY_FAMILY) or the
    original inet_diag_req (TCPDIAG_GETSOCK, protocol implied), then the
    bytecode as an INET_DIAG_REQ_BYTECODE attribute; ``ext``: the reply
    attributes asked for (bit N-1 asks for attribute N)."""
    attr = _NLATTR.pack(_NLATTR.size + len(bytecode), INET_DIAG_REQ_BYTECODE) + bytecode if bytecode else b""
    flags = NLM_F_REQUEST | NLM_F_DUMP
    sockid = (0, 0, b"", b"", 0, 0, 0)
    if kind == TCPDIAG_GETSOCK:
        length = _REQUEST_V1.size + len(attr)
        head = _REQUEST_V1.pack(length, kind, flags, seq, 0, family, 0, 0, ext, *sockid, states, 0)
    else:
        length = _REQUEST_V2.size + len(attr)
        head = _REQUEST_V2.pack(length, kind, flags, seq, 0, family, protocol, ext, 0, states,
                                *sockid)
    return head + attr


def _diag_socket() -> socket.socket:
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG)
    except OSError as exc:
        if exc.errno in (errno.EPROTONOSUPPORT, errno.EAFNOSUPPORT):
            raise Unsupported("the kernel has no netlink sock_diag (CONFIG_INET_DIAG)") from exc
        raise
    sock.bind((0, 0))
    return sock


def _receive(sock: socket.socket, netns: int, kind: int, protocol: int,
             memory: bool = False) -> list[SockRecord]:
    """Read one dump to its end, decoding each inet_diag_msg."""
    parser = DumpParser(netns, kind, protocol, memory)
    buf = bytearray(RECV_BUFFER)
    while True:
        size = sock.recv_into(buf, RECV_BUFFER, socket.MSG_TRUNC)
        if size > RECV_BUFFER:
            raise OSError(errno.EMSGSIZE, f"sock_diag message of {size} bytes does not fit the buffer")
        if parser.feed(buf, size):
            return parser.records


class DumpParser:
    """Decodes the messages of one sock_diag dump, one recv() buffer at a
    time. A message that does not parse (cut short, a family or length that
    cannot be) is OSError(EPROTO), never a decoding exception.

    ``feed`` is the cost of a 100k-socket dump, so it binds what it calls to
    locals, decodes with a single unpack per socket, and formats each
    distinct address once. ``memory``: the dump asked for SK_MEMINFO, whose
    drops counter each record gets (the only attribute read)."""

    def __init__(self, netns: int, kind: int, protocol: int, memory: bool = False) -> None:
        self.netns, self.kind, self.memory = netns, kind, memory
        self.proto_name = "tcp" if protocol == socket.IPPROTO_TCP else "udp"
        self.records: list[SockRecord] = []
        self._addresses: dict[int, dict[bytes, str]] = {socket.AF_INET: {}, socket.AF_INET6: {}}

    def feed(self, buf: bytearray | bytes, size: int) -> bool:
        """Decode ``buf[:size]``; True when the dump ended in it."""
        try:
            return self._feed(buf, size)
        except (struct.error, KeyError, ValueError) as exc:
            raise OSError(errno.EPROTO, f"malformed sock_diag message ({exc})") from None

    def _feed(self, buf: bytearray | bytes, size: int) -> bool:
        unpack_header = _NLMSGHDR.unpack_from
        header_size = _NLMSGHDR.size
        msg_size = header_size + _DIAG_MSG.size
        unpack_msg = _DIAG_MSG.unpack_from
        ntohs = socket.ntohs
        state_by_code, timer_by_code, family_names = _STATE_BY_CODE, _TIMER_BY_CODE, _FAMILY_NAMES
        addresses = self._addresses
        builder, frozen = _SockRecordBuilder, SockRecord
        netns, kind, proto_name, memory = self.netns, self.kind, self.proto_name, self.memory
        append = self.records.append
        offset = 0
        while offset < size:
            length, msg_kind, _flags, _seq, _pid = unpack_header(buf, offset)
            if length < header_size or offset + length > size:
                raise ValueError(f"message length {length} at offset {offset} of {size}")
            if msg_kind != kind:
                _check_end(msg_kind, buf, offset, proto_name)
                return True
            if length < msg_size:
                raise ValueError(f"inet_diag_msg of {length} bytes")
            (family, state, timer, _retrans, sport, dport, src, dst, ifindex,
             cookie_lo, cookie_hi, expires, rqueue, wqueue, uid, inode) = unpack_msg(buf, offset + header_size)
            known = addresses[family]
            record = builder(netns, proto_name, family_names[family], state_by_code[state],
                             known.get(src) or _learn(known, family, src), ntohs(sport),
                             known.get(dst) or _learn(known, family, dst), ntohs(dport),
                             rqueue, wqueue, timer_by_code[timer], expires,
                             uid, inode, cookie_lo | cookie_hi << 32, ifindex,
                             _drops(buf, offset + msg_size, offset + length) if memory else None)
            record.__class__ = frozen
            append(record)
            offset += (length + 3) & ~3
        return False


def _drops(buf: bytearray | bytes, at: int, end: int) -> int | None:
    """sk_drops from the SK_MEMINFO attribute among a message's attributes
    (``buf[at:end]``); None when the kernel sent none."""
    while at + _NLATTR.size <= end:
        attr_len, attr_type = _NLATTR.unpack_from(buf, at)
        if attr_len < _NLATTR.size:
            raise ValueError(f"attribute of {attr_len} bytes")
        if attr_type == INET_DIAG_SKMEMINFO and attr_len >= _NLATTR.size + 4 * (SK_MEMINFO_DROPS + 1):
            return _U32.unpack_from(buf, at + _NLATTR.size + 4 * SK_MEMINFO_DROPS)[0]
        at += (attr_len + 3) & ~3
    return None


def _learn(known: dict[bytes, str], family: int, raw: bytes) -> str:
    """Format a raw idiag_src/dst (16 bytes; IPv4 uses the first 4) and
    remember it for the rest of the dump."""
    known[raw] = text = socket.inet_ntop(family, raw[:4] if family == socket.AF_INET else raw)
    return text


def _check_end(kind: int, buf: bytearray | bytes, offset: int, proto_name: str) -> None:
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
