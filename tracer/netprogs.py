"""The BPF programs that decide where traffic goes, found and run.

Two kinds of program can send a connection or datagram elsewhere than the
socket the kernel's own tables name:

* ``sk_lookup`` programs (kernel 5.9+), attached to a network namespace
  (only with a bpf_link): for every new TCP connection and every UDP
  datagram, before the kernel's listener / socket lookup, each program of
  the namespace runs and may select any socket (bpf_sk_assign), or drop.
* cgroup ``sock_addr`` programs (and ``post_bind``, a cgroup sock program),
  attached to a cgroup: they run inside bind(), connect(), sendmsg(),
  recvmsg(), getpeername() and getsockname() of the cgroup's processes and
  may rewrite the address and port, or refuse (EPERM).

:func:`sk_lookup_programs` and :func:`sock_addr_programs` find them;
:func:`run_sk_lookup` runs one sk_lookup program on a given 4-tuple with
BPF_PROG_TEST_RUN (the kernel runs the real program; nothing is emulated);
:func:`combine` applies the kernel's rule for several programs of one
namespace. sock_addr programs cannot be test-run (the kernel has no test run
for them): they are named, not evaluated (see tracer.hooks for bind).

Everything here needs CAP_SYS_ADMIN (listing links and programs): without it
the answer is empty with the reason in ``problems``, never an exception.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from dataclasses import dataclass, field
from typing import Iterable

from . import libbpf
from .cgroups import cgroup2_root
from .hooks import HOOKS as _BIND_HOOKS

SOCK_ADDR_KINDS: tuple[str, ...] = (
    "bind4", "bind6", "post_bind4", "post_bind6", "connect4", "connect6",
    "sendmsg4", "sendmsg6", "recvmsg4", "recvmsg6", "getpeername4", "getpeername6",
    "getsockname4", "getsockname6")

# enum bpf_attach_type (include/uapi/linux/bpf.h); the bind ones are
# tracer.hooks' (the `why` caveats), one table for both.
ATTACH_TYPES: dict[str, int] = {
    **_BIND_HOOKS,
    "connect4": 10, "connect6": 11, "sendmsg4": 14, "sendmsg6": 15,
    "recvmsg4": 19, "recvmsg6": 20, "getpeername4": 29, "getpeername6": 30,
    "getsockname4": 31, "getsockname6": 32,
}
BPF_SK_LOOKUP = 36
_KINDS = frozenset(SOCK_ADDR_KINDS) | {"sk_lookup"}

ENOTSUPP = 524  # the kernel's internal "not supported", seen by user space


@dataclass(frozen=True, slots=True)
class NetProgram:
    kind: str  # "sk_lookup" or one of SOCK_ADDR_KINDS
    prog_id: int
    name: str  # bpf_prog_info.name: untrusted text (print through tracer.text.printable)
    tag: str  # bpf_prog_info.tag, 16 hex digits (same program loaded again: same tag)
    netns: int | None  # sk_lookup: the namespace's inode; None for sock_addr
    cgroup: str | None  # sock_addr: cgroup2 path below the mount ("/" the root); None for sk_lookup
    link_id: int | None  # the bpf_link holding it; None when attached with BPF_PROG_ATTACH
    order: int  # place in the run order of its namespace / cgroup+kind (0 runs first)

    def to_json(self) -> dict[str, object]:
        return {"kind": self.kind, "prog_id": self.prog_id, "name": self.name, "tag": self.tag,
                "netns": self.netns, "cgroup": self.cgroup, "link_id": self.link_id,
                "order": self.order}

    @classmethod
    def from_json(cls, d: dict) -> "NetProgram":
        """The inverse of to_json; ValueError on anything damaged (a journal
        record is untrusted input)."""
        if not isinstance(d, dict):
            raise ValueError(f"a program is a JSON object, not {type(d).__name__}")
        try:
            kind, prog_id, name, tag = d["kind"], d["prog_id"], d["name"], d["tag"]
            netns, cgroup, link_id, order = d["netns"], d["cgroup"], d["link_id"], d["order"]
        except KeyError as exc:
            raise ValueError(f"a program lacks {exc.args[0]!r}") from None
        if kind not in _KINDS:
            raise ValueError(f"unknown program kind {kind!r}")
        if not _count(prog_id) or prog_id == 0 or not _count(order):
            raise ValueError("prog_id and order must be counts (prog_id > 0)")
        if not isinstance(name, str) or len(name) > 64:
            raise ValueError("name must be text of at most 64 characters")
        if not isinstance(tag, str) or len(tag) != 16 or any(c not in "0123456789abcdef"
                                                             for c in tag):
            raise ValueError(f"tag must be 16 hex digits, not {tag!r}")
        if not (netns is None or _count(netns)) or not (link_id is None or _count(link_id)):
            raise ValueError("netns and link_id must be counts or null")
        if not (cgroup is None or (isinstance(cgroup, str) and cgroup.startswith("/"))):
            raise ValueError("cgroup must be a path from / or null")
        if (kind == "sk_lookup") != (netns is not None) or (kind == "sk_lookup") == (
                cgroup is not None):
            raise ValueError("sk_lookup has a netns and no cgroup; sock_addr the reverse")
        return cls(kind, prog_id, name, tag, netns, cgroup, link_id, order)


def _reason(exc: OSError) -> str:
    """The kernel's answer alone (libbpf's OSErrors carry what was done too)."""
    return libbpf.strerror(exc.errno) if exc.errno else str(exc)


def _count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 64


@dataclass
class ProgramScan:
    programs: list[NetProgram]
    problems: list[tuple[str, str]] = field(default_factory=list)  # (what, why): counted, shown
    supported: bool = True  # False: this kernel has no such hook at all
    why: str = ""  # one sentence when not supported


# ---- sk_lookup ------------------------------------------------------------------------


def _namespace_paths() -> dict[int, str]:
    """inode -> a path that opens it, for every namespace a process or an
    ``ip netns`` name holds."""
    from .netns import list_netns

    paths = {os.stat("/proc/thread-self/ns/net").st_ino: "/proc/thread-self/ns/net"}
    for ref in list_netns().namespaces:
        paths.setdefault(ref.inode, ref.path)
    return paths


def _query_netns(path: str, inode: int | None = None) -> list[int]:
    """Program ids of the namespace's sk_lookup run array, in run order
    (``inode``: the namespace expected there; a reused pid's is refused)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if inode is not None and os.fstat(fd).st_ino != inode:
            raise OSError(2, "another namespace is there now")
        return libbpf.attached_programs(fd, BPF_SK_LOOKUP)
    finally:
        os.close(fd)


def sk_lookup_supported() -> tuple[bool, str]:
    """Whether the running kernel has sk_lookup (5.9+): asked by querying
    our own namespace's sk_lookup programs (EINVAL: no such attach type)."""
    try:
        _query_netns("/proc/thread-self/ns/net")
    except OSError as exc:
        if exc.errno == 22:
            return False, ("this kernel has no sk_lookup hook (BPF_SK_LOOKUP came in Linux 5.9): "
                           "no program can steer connections or datagrams")
    return True, ""


def sk_lookup_programs(netns: int | None = None) -> ProgramScan:
    """Every sk_lookup program attached to any network namespace (or only
    the one with inode ``netns``), ordered by namespace inode, then run order.

    sk_lookup programs are attached only with bpf_links, so the links are
    the inventory (one BPF_LINK_GET_NEXT_ID walk). The run order is the
    namespace's run array, read with BPF_PROG_QUERY on the namespace (its
    attachment order, which a BPF_LINK_UPDATE keeps in place); where the
    namespace cannot be opened (held by no process and no name) it falls
    back to link id order, the attachment order unless a link was updated.
    """
    supported, why = sk_lookup_supported()
    if not supported:
        return ProgramScan([], [], False, why)
    all_links, problems = libbpf.links()
    mine = [lk for lk in all_links if lk.type == libbpf.BPF_LINK_TYPE_NETNS
            and lk.attach_type == BPF_SK_LOOKUP and (netns is None or lk.target == netns)]
    by_ns: dict[int, list[libbpf.LinkInfo]] = {}
    for lk in mine:
        by_ns.setdefault(lk.target, []).append(lk)
    paths = _namespace_paths() if by_ns else {}
    programs: list[NetProgram] = []
    info_cache: dict[int, tuple[str, str, int] | None] = {}
    for ino in sorted(by_ns):
        ns_links = sorted(by_ns[ino], key=lambda lk: lk.link_id)
        order_ids: list[int] | None = None
        if ino in paths:
            try:
                order_ids = _query_netns(paths[ino], ino)
            except OSError:
                order_ids = None  # gone meanwhile, or no permission: link id order
        placed = _place(ns_links, order_ids)
        for pos, lk in enumerate(placed):
            info = _info(lk.prog_id, info_cache, problems)
            if info is None:
                continue
            programs.append(NetProgram("sk_lookup", lk.prog_id, info[0], info[1], ino, None,
                                       lk.link_id, pos))
    return ProgramScan(programs, problems)


def _place(ns_links: list[libbpf.LinkInfo], order_ids: list[int] | None) -> list[libbpf.LinkInfo]:
    """The links in the order of the run array's program ids (one program
    attached through two links appears twice: its links in id order)."""
    if order_ids is None:
        return ns_links
    pool: dict[int, list[libbpf.LinkInfo]] = {}
    for lk in ns_links:
        pool.setdefault(lk.prog_id, []).append(lk)
    placed = [pool[pid].pop(0) for pid in order_ids if pool.get(pid)]
    # Links attached between the two reads run last (appended to the array).
    placed += [lk for rest in pool.values() for lk in rest]
    return placed


def _info(prog_id: int, cache: dict[int, tuple[str, str, int] | None],
          problems: list[tuple[str, str]]) -> tuple[str, str, int] | None:
    if prog_id not in cache:
        try:
            cache[prog_id] = libbpf.program_info(prog_id)
        except OSError as exc:
            problems.append((f"bpf program {prog_id}", _reason(exc)))
            cache[prog_id] = None
    return cache[prog_id]


# ---- cgroup sock_addr -------------------------------------------------------------------


def sock_addr_programs(kinds: Iterable[str] = SOCK_ADDR_KINDS) -> ProgramScan:
    """Every cgroup sock_addr (and post_bind) program attached anywhere in the
    cgroup2 hierarchy (tracer.cgroups.cgroup2_root()), ordered by cgroup path
    (parents first), kind (as in ``kinds``), then run order within them.

    One BPF_PROG_QUERY per cgroup and kind (not effective: each program once,
    where it is attached); ``order`` is the query's, the order the cgroup
    runs its own programs in (a process's descendant cgroups' programs run
    before its ancestors'). Link ids come from one walk of the bpf_links.
    A kind the kernel does not know (EINVAL on the first query) is dropped.
    Cost measured on the 6.18 development machine (all 14 kinds): 3 ms for
    the root alone, 35 ms for 301 cgroups (about 0.1 ms a cgroup).
    """
    kinds = [k for k in kinds if k in ATTACH_TYPES]
    root = cgroup2_root()
    if root is None:
        return ProgramScan([], [("cgroup2", "no cgroup2 hierarchy is mounted")])
    all_links, problems = libbpf.links()
    by_target: dict[tuple[int, int, int], list[int]] = {}
    for lk in all_links:
        if lk.type == libbpf.BPF_LINK_TYPE_CGROUP:
            by_target.setdefault((lk.target, lk.attach_type, lk.prog_id), []).append(lk.link_id)
    programs: list[NetProgram] = []
    info_cache: dict[int, tuple[str, str, int] | None] = {}
    known = list(kinds)
    for dirpath, dirnames, _files in os.walk(root):
        dirnames.sort()
        where = "/" if dirpath == root else "/" + os.path.relpath(dirpath, root)
        try:
            fd = os.open(dirpath, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            continue  # removed during the walk
        try:
            ino = os.fstat(fd).st_ino
            for kind in list(known):
                try:
                    ids = libbpf.attached_programs(fd, ATTACH_TYPES[kind])
                except OSError as exc:
                    if exc.errno == 22:  # EINVAL: this kernel has no such hook
                        known.remove(kind)
                        continue
                    if exc.errno == 2:  # ENOENT: cgroup removed meanwhile
                        break
                    problems.append((f"cgroup {where} {kind}", _reason(exc)))
                    if exc.errno == 1:  # EPERM: no point asking the rest
                        return ProgramScan(programs, problems)
                    continue
                for pos, pid in enumerate(ids):
                    info = _info(pid, info_cache, problems)
                    if info is None:
                        continue
                    link_ids = by_target.get((ino, ATTACH_TYPES[kind], pid))
                    programs.append(NetProgram(kind, pid, info[0], info[1], None, where,
                                               link_ids.pop(0) if link_ids else None, pos))
        finally:
            os.close(fd)
    return ProgramScan(programs, problems)


# ---- running an sk_lookup program ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LookupRun:
    program: NetProgram
    verdict: str  # "pass" | "drop" | "unknown"
    cookie: int | None  # the socket selected (sock_diag's cookie); None: none selected
    why: str = ""  # for "unknown": one sentence why it could not be run


# struct bpf_sk_lookup (include/uapi/linux/bpf.h): cookie/sk u64, family,
# protocol, remote_ip4 (network order), remote_ip6[4], remote_port (network
# order, 16 bits, then 16 zero bits; a __u32 before 5.19 holding the same
# bytes), local_ip4, local_ip6[4], local_port (host order), ingress_ifindex
# (5.17+). The 72 bytes passed are accepted by older kernels too: a context
# longer than the kernel's struct is taken when the extra bytes are zero.
_CTX = struct.Struct("<QII4s16s2sH4s16sII4x")
_PROTOCOLS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}
_FAMILIES = {"ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}


def _address(family: str, addr: str) -> tuple[bytes, bytes]:
    """(ip4 field, ip6 field) of an address given as text."""
    ip = ipaddress.ip_address(addr)
    if family == "ipv4":
        if ip.version != 4:
            raise ValueError(f"{addr} is not an IPv4 address")
        return ip.packed, bytes(16)
    if ip.version == 4:
        ip = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + ip.packed)
    return bytes(4), ip.packed


def lookup_context(protocol: str, family: str, remote: tuple[str, int],
                   local: tuple[str, int], ifindex: int = 0) -> bytes:
    """The struct bpf_sk_lookup a new connection/datagram of that tuple gets."""
    r4, r6 = _address(family, remote[0])
    l4, l6 = _address(family, local[0])
    return _CTX.pack(0, _FAMILIES[family], _PROTOCOLS[protocol], r4, r6,
                     struct.pack(">H", remote[1]), 0, l4, l6, local[1], ifindex)


NO_TEST_RUN = ("this kernel cannot test-run sk_lookup programs (BPF_PROG_TEST_RUN for "
               "sk_lookup came in Linux 5.13, and in 5.10.136 of the 5.10 series)")
GONE = "the program was unloaded since it was found"
REUSEPORT = ("the program selected a socket of a SO_REUSEPORT group without "
             "BPF_SK_LOOKUP_F_NO_REUSEPORT: the kernel would then pick a member of the group, "
             "which a test run does not do")
NO_IFINDEX = ("ran with no ingress interface: the kernel's test run takes none, so a "
              "program that reads ingress_ifindex saw 0")


def run_sk_lookup(program: NetProgram, protocol: str, family: str,
                  remote: tuple[str, int], local: tuple[str, int], ifindex: int = 0) -> LookupRun:
    """Run the program with BPF_PROG_TEST_RUN on that tuple (protocol
    "tcp"/"udp", family "ipv4"/"ipv6", addresses as text) and return its
    verdict and selection.

    The run needs no namespace change: the program's maps (a SOCKMAP of the
    namespace's sockets) are the same from anywhere, and the selected
    socket's cookie is global (proven against a program attached to another
    namespace in tests/kernel/test_netprogs.py). It runs alone, with no
    earlier program's selection in ``ctx->sk`` (the kernel refuses one), so
    a program that reads it may answer differently inside its run array.
    The kernel's test run refuses a nonzero ingress_ifindex (EINVAL on 5.17+,
    E2BIG before, verified on 6.18 and 5.10): with one the run is made
    without it and ``why`` says so.
    """
    ctx = lookup_context(protocol, family, remote, local, ifindex)
    try:
        fd = libbpf.prog_fd_by_id(program.prog_id)
    except OSError as exc:
        if exc.errno == 2:
            return LookupRun(program, "unknown", None, GONE)
        return LookupRun(program, "unknown", None,
                         f"cannot open the program: {_reason(exc)}")
    note = ""
    try:
        info = libbpf.program_info(program.prog_id)
        if info is None or info[1] != program.tag:
            return LookupRun(program, "unknown", None, GONE)
        try:
            retval, out = libbpf.test_run_ctx(fd, ctx)
        except OSError as exc:
            # The test run wants ingress_ifindex 0: EINVAL where the kernel's
            # struct has the field, E2BIG where it ends before it (before 5.17).
            if exc.errno in (22, 7) and ifindex:
                note = NO_IFINDEX
                retval, out = libbpf.test_run_ctx(fd, lookup_context(protocol, family, remote,
                                                                     local, 0))
            else:
                raise
    except OSError as exc:
        if exc.errno == ENOTSUPP:
            return LookupRun(program, "unknown", None, NO_TEST_RUN)
        if exc.errno == 95:  # EOPNOTSUPP
            return LookupRun(program, "unknown", None, REUSEPORT)
        return LookupRun(program, "unknown", None,
                         f"the kernel refused the test run: {_reason(exc)}")
    finally:
        os.close(fd)
    cookie = struct.unpack_from("<Q", out, 0)[0] if len(out) >= 8 else 0
    return LookupRun(program, "pass" if retval == 1 else "drop", cookie or None, note)


# ---- several programs of one namespace -------------------------------------------------


@dataclass(frozen=True, slots=True)
class LookupOutcome:
    verdict: str  # "pass" | "drop" | "unknown"
    cookie: int | None  # the selected socket (the last non-null selection)
    decided_by: NetProgram | None
    runs: tuple[LookupRun, ...]


def combine(runs: list[LookupRun]) -> LookupOutcome:
    """The kernel's rule for the sk_lookup programs of one namespace
    (BPF_PROG_SK_LOOKUP_RUN_ARRAY, include/linux/filter.h), ``runs`` in run
    order: every program runs; a program that returns SK_PASS with a socket
    selected makes that the selection (the last such wins); SK_DROP from any
    program drops, unless some program selected a socket (a selection beats
    a drop); with neither, the kernel's own lookup decides (pass, no cookie).

    ``decided_by``: the program whose selection won, else the first that
    dropped, else None.

    Unknown runs: a known selection made after the last unknown run decides
    (whatever the unknown ones did, it is the last selection, and a
    selection beats a drop); otherwise the outcome is unknown.

    Runs are made one program at a time, so this assumes each later program
    replaces an earlier selection (bpf_sk_assign with
    BPF_SK_LOOKUP_F_REPLACE). One that assigns without it gets EEXIST inside
    the run array and leaves the earlier selection: where two programs
    select, the real winner may be the earlier one.
    """
    runs_t = tuple(runs)
    last_unknown = max((i for i, r in enumerate(runs_t) if r.verdict == "unknown"), default=-1)
    selecting = [i for i, r in enumerate(runs_t) if r.verdict == "pass" and r.cookie]
    if selecting and selecting[-1] > last_unknown:
        won = runs_t[selecting[-1]]
        return LookupOutcome("pass", won.cookie, won.program, runs_t)
    if last_unknown >= 0:
        return LookupOutcome("unknown", None, None, runs_t)
    dropped = [r for r in runs_t if r.verdict == "drop"]
    if dropped:
        return LookupOutcome("drop", None, dropped[0].program, runs_t)
    return LookupOutcome("pass", None, None, runs_t)


__all__ = [
    "ATTACH_TYPES", "SOCK_ADDR_KINDS", "LookupOutcome", "LookupRun", "NetProgram", "ProgramScan",
    "combine", "lookup_context", "run_sk_lookup", "sk_lookup_programs", "sock_addr_programs",
]
