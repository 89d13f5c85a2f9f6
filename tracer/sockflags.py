"""What sock_diag cannot tell: each socket's SO_REUSEADDR, SO_REUSEPORT,
IPV6_V6ONLY, bound device, and the reuseport group it belongs to, read by
the ``iter/tcp`` and ``iter/udp`` programs of probes/portscope.bpf.o.

A BPF socket iterator walks the sockets of the network namespace of the
thread that creates it, so reading another namespace runs on a thread that
enters it (nsenter.in_netns).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import socket
import struct
import threading
from dataclasses import dataclass, replace
from typing import Container, NamedTuple

from . import libbpf
from .coreobject import LibbpfLoaded, load_object
from .engine import EngineConfig, Need
from .layout import PsFileinfo, PsGroupFlag, PsOpt, PsSockinfo
from .nsenter import in_netns
from .plans import ITERATOR_PROGRAMS
from .records import FAMILIES, OPTION_NAMES, PROTOCOLS, TCP_STATES
from .text import system_text

RECORD = ctypes.sizeof(PsSockinfo)
FILE_RECORD = ctypes.sizeof(PsFileinfo)


class SockFlags(NamedTuple):
    """One socket as an iterator read it. A tuple, not a dataclass: a busy
    port decodes 10,000s of them per question, and a tuple is built several
    times faster than a frozen dataclass."""

    netns: int
    protocol: str
    family: str
    state: str
    addr: str
    port: int
    cookie: int
    inode: int
    sock_uid: int
    options: frozenset[str]  # reuseaddr, reuseport, v6only, freebind, transparent, ...
    bound_dev_if: int
    group: int  # opaque reuseport group id, equal for members of one group; 0: none
    group_size: int
    group_bpf_prog: bool  # a reuseport BPF program steers the group
    group_has_conns: bool


@dataclass(frozen=True, slots=True)
class Holder:
    """A process holding a socket through one of its file descriptors."""

    pid: int
    fd: int
    comm: str
    sock: SockFlags


def decode_sockets(raw: bytes, cookies: Container[int] | None = None) -> list[SockFlags]:
    """Records of the iter/tcp and iter/udp programs; with ``cookies``, only
    the sockets that have one of them (the rest are not decoded at all)."""
    _offsets(raw, RECORD)
    out = []
    # Field order of PsSockinfo (checked against the layout at import).
    for (cookie, inode, group_key, netns, sock_uid, bound_dev_if, port, group_size, family,
         protocol, state, opts, group_flags, addr) in _SOCKINFO_ROW.iter_unpack(raw):
        if cookies is not None and cookie not in cookies:
            continue
        out.append(SockFlags(
            netns, PROTOCOLS.get(protocol) or str(protocol), FAMILIES.get(family) or str(family),
            TCP_STATES.get(state) or str(state), _ntop(family, addr), port, cookie, inode,
            sock_uid, _options(opts), bound_dev_if,
            group_id(netns, protocol, family, addr, port, bound_dev_if, sock_uid,
                     bool(opts & _V6ONLY)) if group_key else 0, group_size,
            bool(group_flags & _BPF_PROG), bool(group_flags & _HAS_CONNS)))
    return out


def _row_struct(cls: type[ctypes.Structure], skip: tuple[str, ...]) -> struct.Struct:
    """A struct.Struct that unpacks ``cls`` (little-endian, as the BPF side
    writes it) into its scalar and byte-array fields in declaration order,
    leaving out the ``skip`` fields: iter_unpack decodes a whole buffer in C."""
    fmt, at = "<", 0
    for name, ctype in cls._fields_:  # type: ignore[misc]
        field = getattr(cls, name)
        if field.offset > at:
            fmt += f"{field.offset - at}x"
        code = getattr(ctype, "_type_", None)
        if name in skip:
            fmt += f"{field.size}x"
        elif isinstance(code, str) and len(code) == 1 and code in "bBhHiIlLqQ":
            # By size: ctypes' "L" is 8 bytes here, struct's standard "L" is 4.
            letter = {1: "b", 2: "h", 4: "i", 8: "q"}[field.size]
            fmt += letter.upper() if code.isupper() else letter
        else:
            fmt += f"{field.size}s"  # arrays: raw bytes
        at = field.offset + field.size
    fmt += f"{ctypes.sizeof(cls) - at}x" if ctypes.sizeof(cls) > at else ""
    row = struct.Struct(fmt)
    if row.size != ctypes.sizeof(cls):
        raise ImportError(f"{cls.__name__}: {fmt} is {row.size} bytes, not {ctypes.sizeof(cls)}")
    return row


_SOCKINFO_ROW = _row_struct(PsSockinfo, skip=("pad",))


def decode_holders(raw: bytes) -> list[Holder]:
    """Records of the iter/task_file program."""
    out = []
    for off in _offsets(raw, FILE_RECORD):
        r = PsFileinfo.from_buffer_copy(raw, off)
        out.append(Holder(r.pid, r.fd, system_text(r.comm), _one(r.sock)))
    return out


def _offsets(raw: bytes, size: int) -> range:
    if len(raw) % size:
        raise ValueError(f"iterator output of {len(raw)} bytes is not a whole number of records")
    return range(0, len(raw), size)


def _one(r: PsSockinfo) -> SockFlags:
    return SockFlags(
        netns=r.netns,
        protocol=PROTOCOLS.get(r.protocol, str(r.protocol)),
        family=FAMILIES.get(r.family, str(r.family)),
        state=TCP_STATES.get(r.state, str(r.state)),
        addr=_ntop(r.family, bytes(r.addr)),
        port=r.port,
        cookie=r.cookie,
        inode=r.inode,
        sock_uid=r.sock_uid,
        options=_options(r.opts),
        bound_dev_if=r.bound_dev_if,
        group=group_id(r.netns, r.protocol, r.family, bytes(r.addr), r.port, r.bound_dev_if,
                       r.sock_uid, bool(r.opts & _V6ONLY)) if r.group_key else 0,
        group_size=r.group_size,
        group_bpf_prog=bool(r.group_flags & _BPF_PROG),
        group_has_conns=bool(r.group_flags & _HAS_CONNS),
    )


# Cached: a busy port repeats a few addresses and option sets many times.
_BPF_PROG, _HAS_CONNS = int(PsGroupFlag.BPF_PROG), int(PsGroupFlag.HAS_CONNS)
_V6ONLY = int(PsOpt.V6ONLY)


@functools.lru_cache(maxsize=256)
def _options(bits: int) -> frozenset[str]:
    return frozenset(name for bit, name in OPTION_NAMES.items() if bits & bit)


@functools.lru_cache(maxsize=65536)
def _ntop(family: int, raw: bytes) -> str:
    if family == socket.AF_INET6:
        return socket.inet_ntop(socket.AF_INET6, raw)
    return socket.inet_ntop(socket.AF_INET, raw[:4])


@functools.lru_cache(maxsize=65536)
def group_id(netns: int, protocol: int, family: int, addr: bytes, port: int, bound_dev_if: int,
             uid: int, v6only: bool) -> int:
    """The id of a reuseport group, from what makes a group in the kernel: a
    socket joins the group of the sockets with the same namespace, protocol,
    family, address, port, device, owning uid and IPV6_V6ONLY setting
    (inet_reuseport_add_sock, udp_reuseport_add_sock), and starts a group
    of its own otherwise: UDP sockets that share a port through SO_REUSEADDR
    form one group per uid, and a v6-only [::]:P group can sit beside a
    dual-stack one (tests/kernel/test_iterators.py makes both). So the id is the same across runs of portscope,
    restarts of the server and hosts (not the kernel's address of the group,
    which changes with every run of the server and must not be shown), and an
    exporter's series and a journal's groups keep their identity."""
    if family != socket.AF_INET6:
        addr = addr[:4]
    text = f"{netns} {protocol} {family} {addr.hex()} {port} {bound_dev_if} {uid} {int(v6only)}"
    digest = hashlib.blake2b(text.encode(), digest_size=4, person=b"ps-reuseport").digest()
    return int.from_bytes(digest, "little") or 1


class SocketIterators:
    """The loaded iterator programs.

    ``sockets()`` walks one namespace's TCP and UDP tables; ``holders()``
    walks every process's file table (all namespaces at once). They come
    from the process's engine object when it carries them (``loaded``, a
    share of it is taken), else from an object of their own."""

    def __init__(self, config: EngineConfig | None = None,
                 loaded: LibbpfLoaded | None = None) -> None:
        if loaded is None:
            config = replace(config or EngineConfig(), events=False, groups=Need.OFF,
                             iterators=True)
            obj, _, created, _ = load_object(config, {}, iterators=True)
            loaded = LibbpfLoaded(obj, [], created)
        else:
            loaded.retain()
        self._loaded: LibbpfLoaded | None = loaded
        try:
            self._links = {name: loaded.program(name).attach_iter() for name in ITERATOR_PROGRAMS}
        except BaseException:
            loaded.close()
            raise
        libbpf.trim_heap()
        self._port_map = loaded.map("ps_iter_port")
        # One walk at a time: the port filter is one map slot for all walks.
        self._lock = threading.Lock()

    def sockets(self, netns_fd: int | None = None, port: int | None = None,
                cookies: Container[int] | None = None) -> list[SockFlags]:
        """Every TCP and UDP socket of the namespace (default: our own), or
        only those on local ``port`` (filtered in the kernel: the walk covers
        the host's whole tables, 100,000s of TIME_WAIT sockets on a busy host),
        or only those with one of ``cookies`` (filtered here, before decoding)."""

        def walk() -> bytes:
            return (libbpf.run_iterator(self._links["ps_iter_tcp"])
                    + libbpf.run_iterator(self._links["ps_iter_udp"]))

        with self._lock:
            self._set_port(port)
            raw = walk() if netns_fd is None else in_netns(netns_fd, walk)
        return decode_sockets(raw, cookies)

    def holders(self, port: int | None = None) -> list[Holder]:
        """Every IPv4/IPv6 socket held by a process (or only those on local
        ``port``), with the holder."""
        with self._lock:
            self._set_port(port)
            raw = libbpf.run_iterator(self._links["ps_iter_task_file"])
        return decode_holders(raw)

    def _set_port(self, port: int | None) -> None:
        self._port_map.update(struct.pack("I", 0), struct.pack("H", port or 0))

    def close(self) -> None:
        for link in self._links.values():
            link.destroy()
        self._links = {}
        if self._loaded:
            self._loaded.close()
            self._loaded = None

    def __enter__(self) -> "SocketIterators":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SharedIterators:
    """A handle on the process's one :class:`SocketIterators`: the collector's
    refresh, the on-the-spot explainer, the group watcher and the recorder
    each open one. The programs are the engine's when it carries them
    (tracer/loader.py adopts them), else loaded on the first open; they
    are closed with the last handle (an iterator is attached to no hook:
    idle, it costs nothing but its few maps)."""

    _lock = threading.Lock()
    _iterators: SocketIterators | None = None
    _handles = 0

    def __init__(self, config: EngineConfig | None = None,
                 adopted: SocketIterators | None = None) -> None:
        cls = SharedIterators
        with cls._lock:
            if cls._iterators is None:
                cls._iterators = adopted or SocketIterators(config)
            elif adopted is not None:
                adopted.close()  # another handle was first: keep one set
            cls._handles += 1
            self._its: SocketIterators | None = cls._iterators

    @classmethod
    def adopt(cls, its: SocketIterators) -> "SharedIterators":
        """Make ``its`` (loaded with the engine's object) the process's
        iterators, unless the process has some already; a handle on them."""
        return cls(adopted=its)

    @classmethod
    def loaded(cls) -> bool:
        """Whether the process holds its iterators already."""
        with cls._lock:
            return cls._iterators is not None

    def sockets(self, netns_fd: int | None = None, port: int | None = None,
                cookies: Container[int] | None = None) -> list[SockFlags]:
        assert self._its is not None, "iterators are closed"
        return self._its.sockets(netns_fd, port, cookies)

    def holders(self, port: int | None = None) -> list[Holder]:
        assert self._its is not None, "iterators are closed"
        return self._its.holders(port)

    def close(self) -> None:
        """Safe twice: only the first call gives the handle back."""
        cls = SharedIterators
        with cls._lock:
            if self._its is None:
                return
            self._its = None
            cls._handles -= 1
            if cls._handles == 0 and cls._iterators is not None:
                cls._iterators.close()
                cls._iterators = None

    def __enter__(self) -> "SharedIterators":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LoadingIterators:
    """A :class:`SharedIterators` handle opened on a thread of its own, so
    that loading the programs (about 40 ms when the process has none yet)
    overlaps with the sock_diag dump that has to come before the first walk
    anyway (the walk reads the cookies the dump assigns). The first walk
    waits for the load, and raises what the load raised."""

    def __init__(self, config: EngineConfig | None = None) -> None:
        self._handle: SharedIterators | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._open, args=(config,), daemon=True,
                                        name="portscope-iterators-load")
        self._thread.start()

    def _open(self, config: EngineConfig | None) -> None:
        try:
            self._handle = SharedIterators(config)
        except BaseException as exc:  # noqa: BLE001 - raised again by ready()
            self._error = exc

    def ready(self) -> SharedIterators:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._handle is not None, "iterators are closed"
        return self._handle

    def sockets(self, netns_fd: int | None = None, port: int | None = None,
                cookies: Container[int] | None = None) -> list[SockFlags]:
        return self.ready().sockets(netns_fd, port, cookies)

    def holders(self, port: int | None = None) -> list[Holder]:
        return self.ready().holders(port)

    def close(self) -> None:
        self._thread.join()
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> "LoadingIterators":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# What a walk needs: sockets() and holders().
Iterators = SocketIterators | SharedIterators | LoadingIterators
