"""A thin ctypes binding to the system libbpf (``libbpf.so.1``, libbpf >= 1.0).

Only what portscope uses: open an object, set read-only data, choose the
programs that load, load, attach, poll ring buffers, read maps (one key or in
batches), run BPF iterators, and read BTF. Every symbol has its ``argtypes``
and ``restype`` declared; every failing call raises ``OSError(errno, ...)``
from one checker, and libbpf's own log is captured (not printed) so that the
caller can turn it into one clear sentence.

libbpf 1.x reports errors as NULL / negative return plus ``errno``: that is
the only convention handled here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from ctypes import (
    CFUNCTYPE,
    POINTER,
    c_bool,
    c_char_p,
    c_int,
    c_size_t,
    c_uint32,
    c_uint64,
    c_void_p,
)
from dataclasses import dataclass
from typing import Callable, Iterator

from .errors import LibbpfMissing

# ---- loading the library ---------------------------------------------------

_PRINT_FN = CFUNCTYPE(c_int, c_int, c_char_p, c_void_p)
_SAMPLE_FN = CFUNCTYPE(c_int, c_void_p, c_void_p, c_size_t)


class _OpenOpts(ctypes.Structure):
    """struct bpf_object_open_opts as of libbpf 1.0 (sz guards the rest)."""

    _fields_ = [
        ("sz", c_size_t),
        ("object_name", c_char_p),
        ("relaxed_maps", c_bool),
        ("pin_root_path", c_char_p),
        ("_attach_prog_fd", c_uint32),
        ("kconfig", c_char_p),
        ("btf_custom_path", c_char_p),
        ("kernel_log_buf", c_char_p),
        ("kernel_log_size", c_size_t),
        ("kernel_log_level", c_uint32),
    ]


class _BatchOpts(ctypes.Structure):
    _fields_ = [("sz", c_size_t), ("elem_flags", c_uint64), ("flags", c_uint64)]


# struct bpf_prog_info (linux/bpf.h): its size as of 6.x and where the
# recursion_misses counter sits (added in 5.12).
_PROG_INFO_SIZE = 232
_PROG_INFO_RECURSION_MISSES = 208
_PROG_INFO_NAME = 64  # char name[BPF_OBJ_NAME_LEN]
_MAP_INFO_SIZE = 96  # struct bpf_map_info: type, id, ... (the kernel fills what it has)


class _IterAttachOpts(ctypes.Structure):
    _fields_ = [("sz", c_size_t), ("link_info", c_void_p), ("link_info_len", c_uint32)]


_SIGNATURES: dict[str, tuple[object, list[object]]] = {
    "libbpf_set_print": (c_void_p, [_PRINT_FN]),
    "libbpf_num_possible_cpus": (c_int, []),
    "libbpf_strerror": (c_int, [c_int, c_char_p, c_size_t]),
    "libbpf_major_version": (c_uint32, []),
    "libbpf_minor_version": (c_uint32, []),
    "bpf_object__open_file": (c_void_p, [c_char_p, POINTER(_OpenOpts)]),
    "bpf_object__load": (c_int, [c_void_p]),
    "bpf_object__close": (None, [c_void_p]),
    "bpf_object__btf": (c_void_p, [c_void_p]),
    "bpf_object__next_program": (c_void_p, [c_void_p, c_void_p]),
    "bpf_object__find_map_by_name": (c_void_p, [c_void_p, c_char_p]),
    "bpf_program__name": (c_char_p, [c_void_p]),
    "bpf_program__section_name": (c_char_p, [c_void_p]),
    "bpf_program__set_autoload": (c_int, [c_void_p, c_bool]),
    "bpf_program__autoload": (c_bool, [c_void_p]),
    "bpf_program__attach": (c_void_p, [c_void_p]),
    "bpf_program__attach_iter": (c_void_p, [c_void_p, POINTER(_IterAttachOpts)]),
    "bpf_link__destroy": (c_int, [c_void_p]),
    "bpf_link__fd": (c_int, [c_void_p]),
    "bpf_iter_create": (c_int, [c_int]),
    "bpf_map__fd": (c_int, [c_void_p]),
    "bpf_map__set_max_entries": (c_int, [c_void_p, c_uint32]),
    "bpf_map__set_autocreate": (c_int, [c_void_p, c_bool]),
    "bpf_map__max_entries": (c_uint32, [c_void_p]),
    "bpf_map__type": (c_int, [c_void_p]),
    "bpf_map__key_size": (c_uint32, [c_void_p]),
    "bpf_map__value_size": (c_uint32, [c_void_p]),
    "bpf_map__initial_value": (c_void_p, [c_void_p, POINTER(c_size_t)]),
    "bpf_map__pin": (c_int, [c_void_p, c_char_p]),
    "bpf_map__unpin": (c_int, [c_void_p, c_char_p]),
    "bpf_obj_get": (c_int, [c_char_p]),
    "bpf_obj_pin": (c_int, [c_int, c_char_p]),
    "bpf_map_lookup_elem": (c_int, [c_int, c_void_p, c_void_p]),
    "bpf_map_update_elem": (c_int, [c_int, c_void_p, c_void_p, c_uint64]),
    "bpf_map_delete_elem": (c_int, [c_int, c_void_p]),
    "bpf_map_get_next_key": (c_int, [c_int, c_void_p, c_void_p]),
    "bpf_program__fd": (c_int, [c_void_p]),
    "bpf_obj_get_info_by_fd": (c_int, [c_int, c_void_p, POINTER(c_uint32)]),
    "bpf_prog_query": (c_int, [c_int, c_uint32, c_uint32, POINTER(c_uint32), POINTER(c_uint32),
                               POINTER(c_uint32)]),
    "bpf_prog_get_fd_by_id": (c_int, [c_uint32]),
    "bpf_link_get_next_id": (c_int, [c_uint32, POINTER(c_uint32)]),
    "bpf_link_get_fd_by_id": (c_int, [c_uint32]),
    "bpf_prog_test_run_opts": (c_int, [c_int, c_void_p]),
    "bpf_program__attach_netns": (c_void_p, [c_void_p, c_int]),
    "bpf_program__attach_cgroup": (c_void_p, [c_void_p, c_int]),
    "bpf_map_lookup_batch": (
        c_int,
        [c_int, c_void_p, c_void_p, c_void_p, c_void_p, POINTER(c_uint32), POINTER(_BatchOpts)],
    ),
    "ring_buffer__new": (c_void_p, [c_int, _SAMPLE_FN, c_void_p, c_void_p]),
    "ring_buffer__poll": (c_int, [c_void_p, c_int]),
    "ring_buffer__consume": (c_int, [c_void_p]),
    "ring_buffer__free": (None, [c_void_p]),
    "btf__parse": (c_void_p, [c_char_p, c_void_p]),
    "btf__free": (None, [c_void_p]),
    "btf__type_cnt": (c_uint32, [c_void_p]),
    "btf__type_by_id": (c_void_p, [c_void_p, c_uint32]),
    "btf__name_by_offset": (c_char_p, [c_void_p, c_uint32]),
    "btf__find_by_name_kind": (c_int, [c_void_p, c_char_p, c_uint32]),
}

_lib: ctypes.CDLL | None = None
_lib_lock = threading.Lock()


def lib() -> ctypes.CDLL:
    """The loaded libbpf, with every signature declared (loaded once)."""
    global _lib
    with _lib_lock:
        if _lib is None:
            _lib = _load()
        return _lib


def _load() -> ctypes.CDLL:
    path = os.environ.get("PORTSCOPE_LIBBPF") or ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        handle = ctypes.CDLL(path, use_errno=True)
    except OSError:
        raise LibbpfMissing(
            f"cannot load libbpf ({path}): install libbpf 1.x (Debian/Ubuntu: apt install libbpf1)"
        ) from None
    for name, (restype, argtypes) in _SIGNATURES.items():
        try:
            fn = getattr(handle, name)
        except AttributeError:
            raise LibbpfMissing(
                f"{path} lacks {name}: portscope needs libbpf 1.0 or newer"
            ) from None
        fn.restype = restype
        fn.argtypes = argtypes
    if handle.libbpf_major_version() < 1:
        raise LibbpfMissing(f"{path} is libbpf 0.x: portscope needs libbpf 1.0 or newer")
    _install_log_capture(handle)
    return handle


def version() -> str:
    return f"{lib().libbpf_major_version()}.{lib().libbpf_minor_version()}"


def possible_cpus() -> int:
    n = lib().libbpf_num_possible_cpus()
    if n <= 0:
        raise OSError(-n, os.strerror(-n))
    return n


# ---- libbpf's log: captured, never printed ---------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def trim_heap() -> None:
    """Give the C heap's free memory back to the system. Opening and loading
    an object (above all one whose plan the kernel then refuses) frees
    megabytes of parsed BTF that glibc would otherwise keep for the life of
    a long-running command. A no-op where the C library has no malloc_trim."""
    trim = getattr(_libc, "malloc_trim", None)
    if trim is not None:
        trim(0)

_libc.vsnprintf.restype = c_int
_libc.vsnprintf.argtypes = [c_char_p, c_size_t, c_char_p, c_void_p]

_log_lines: list[str] = []
_log_lock = threading.Lock()


_VA_LIST_BYTES = 32  # sizeof(va_list): 24 on x86-64, 32 on arm64


def _on_libbpf_print(level: int, fmt: bytes, args: int) -> int:
    # va_list reaches us as a pointer on x86-64 and arm64, so vsnprintf can
    # expand it. A va_list is consumed by use: measuring the message first
    # needs a copy (what va_copy does on these ABIs: copy the bytes).
    copy = ctypes.create_string_buffer(ctypes.string_at(args, _VA_LIST_BYTES), _VA_LIST_BYTES)
    size = _libc.vsnprintf(None, 0, fmt, copy) + 1
    buf = ctypes.create_string_buffer(max(size, 1))
    _libc.vsnprintf(buf, len(buf), fmt, args)
    with _log_lock:
        _log_lines.append(buf.value.decode(errors="replace"))
        del _log_lines[:-1000]  # bounded: keep the latest messages only
    return 0


_print_cb = _PRINT_FN(_on_libbpf_print)


def _install_log_capture(handle: ctypes.CDLL) -> None:
    handle.libbpf_set_print(_print_cb)


def reclaim_log() -> None:
    """Route libbpf's log to take_log() again. libbpf is shared by the whole
    process, and bcc (the bcc engine) installs its own printer in it."""
    _install_log_capture(lib())


def take_log() -> str:
    """Everything libbpf logged since the last call, then forget it."""
    with _log_lock:
        text = "".join(_log_lines)
        _log_lines.clear()
    return text


# ---- errors ---------------------------------------------------------------


def strerror(err: int) -> str:
    """os.strerror, plus libbpf's own codes (4000 and up: bad ELF, bad BTF...)."""
    if err >= 4000:
        buf = ctypes.create_string_buffer(256)
        lib().libbpf_strerror(err, buf, len(buf))
        return buf.value.decode()
    return os.strerror(err)


def _errno() -> int:
    return ctypes.get_errno() or 1


def _check_ptr(ptr: int | None, what: str) -> int:
    if not ptr:
        err = _errno()
        raise OSError(err, f"{what}: {strerror(err)}")
    return ptr


def _check_ret(ret: int, what: str) -> int:
    """libbpf 1.x returns -errno from every call, low-level bpf_* ones too."""
    if ret < 0:
        err = -ret
        raise OSError(err, f"{what}: {strerror(err)}")
    return ret


# ---- objects, programs, maps, links ---------------------------------------


class Link:
    """An attached program; detached by ``destroy()`` (idempotent)."""

    def __init__(self, ptr: int, name: str) -> None:
        self._ptr: int | None = ptr
        self.name = name

    @property
    def fd(self) -> int:
        return _check_ret(lib().bpf_link__fd(self._ptr), f"link fd of {self.name}")

    def destroy(self) -> None:
        if self._ptr:
            lib().bpf_link__destroy(self._ptr)
            self._ptr = None


@dataclass
class Program:
    ptr: int
    name: str
    section: str

    def set_autoload(self, on: bool) -> None:
        _check_ret(lib().bpf_program__set_autoload(self.ptr, on), f"autoload {self.name}")

    @property
    def autoload(self) -> bool:
        return bool(lib().bpf_program__autoload(self.ptr))

    def attach(self) -> Link:
        ptr = lib().bpf_program__attach(self.ptr)
        return Link(_check_ptr(ptr, f"attach {self.name} ({self.section})"), self.name)

    @property
    def fd(self) -> int:
        return _check_ret(lib().bpf_program__fd(self.ptr), f"fd of program {self.name}")

    def recursion_misses(self) -> int:
        return recursion_misses(self.fd, self.name)

    def attach_netns(self, netns_fd: int) -> Link:
        """A bpf_link holding this (sk_lookup, flow_dissector) program on the
        network namespace open on ``netns_fd``; ``destroy()`` detaches it."""
        ptr = lib().bpf_program__attach_netns(self.ptr, netns_fd)
        return Link(_check_ptr(ptr, f"attach {self.name} to a network namespace"), self.name)

    def attach_cgroup(self, cgroup_fd: int) -> Link:
        """A bpf_link holding this cgroup program (its section names the
        hook) on the cgroup open on ``cgroup_fd``; ``destroy()`` detaches it."""
        ptr = lib().bpf_program__attach_cgroup(self.ptr, cgroup_fd)
        return Link(_check_ptr(ptr, f"attach {self.name} to a cgroup"), self.name)

    def attach_iter(self) -> Link:
        opts = _IterAttachOpts(sz=ctypes.sizeof(_IterAttachOpts))
        ptr = lib().bpf_program__attach_iter(self.ptr, ctypes.byref(opts))
        return Link(_check_ptr(ptr, f"attach iterator {self.name}"), self.name)


def run_iterator(link: Link) -> bytes:
    """Run a BPF iterator once and return everything it wrote."""
    fd = _check_ret(lib().bpf_iter_create(link.fd), f"create iterator {link.name}")
    chunks = []
    try:
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


def _prog_info(prog_fd: int, name: str) -> tuple[ctypes.Array, int]:
    """The kernel's struct bpf_prog_info of a loaded program, and how many
    of its bytes this kernel filled."""
    info = ctypes.create_string_buffer(_PROG_INFO_SIZE)
    size = c_uint32(_PROG_INFO_SIZE)
    _check_ret(lib().bpf_obj_get_info_by_fd(prog_fd, info, ctypes.byref(size)),
               f"info of program {name}")
    return info, size.value


def recursion_misses(prog_fd: int, name: str) -> int:
    """Times the kernel skipped a loaded program because it was already
    running on the same CPU (bpf_prog_info.recursion_misses)."""
    info, size = _prog_info(prog_fd, name)
    if size < _PROG_INFO_RECURSION_MISSES + 8:
        return 0  # a kernel older than 5.12 does not report it
    return c_uint64.from_buffer(info, _PROG_INFO_RECURSION_MISSES).value


BPF_F_QUERY_EFFECTIVE = 1
_PROG_INFO_TAG = 8  # __u8 tag[BPF_TAG_SIZE], 8 bytes


def program_info(prog_id: int) -> tuple[str, str, int] | None:
    """(name, tag as 16 hex digits, BPF_PROG_TYPE_*) of a loaded program;
    None when it is gone. Raises OSError for any other failure (EPERM
    without CAP_SYS_ADMIN)."""
    fd = lib().bpf_prog_get_fd_by_id(prog_id)
    if fd == -2:  # ENOENT: unloaded meanwhile
        return None
    _check_ret(fd, f"open program {prog_id}")
    try:
        info, _ = _prog_info(fd, str(prog_id))
    finally:
        os.close(fd)
    name = info.raw[_PROG_INFO_NAME:_PROG_INFO_NAME + 16].split(b"\0", 1)[0]
    return (name.decode("utf-8", "replace"), info.raw[_PROG_INFO_TAG:_PROG_INFO_TAG + 8].hex(),
            c_uint32.from_buffer(info, 0).value)


def prog_fd_by_id(prog_id: int) -> int:
    """An fd on the loaded program ``prog_id`` (close it with os.close)."""
    return _check_ret(lib().bpf_prog_get_fd_by_id(prog_id), f"open program {prog_id}")


# struct bpf_link_info: type, id, prog_id, then (8-aligned) a union per type.
_LINK_INFO_SIZE = 128
BPF_LINK_TYPE_CGROUP = 3
BPF_LINK_TYPE_NETNS = 5


@dataclass(frozen=True)
class LinkInfo:
    """What the kernel says of one bpf_link. ``target`` and ``attach_type``
    are filled for cgroup links (target: the cgroup id, the inode of its
    cgroup2 directory) and netns links (target: the namespace's inode);
    0 for other types."""

    link_id: int
    type: int  # BPF_LINK_TYPE_*
    prog_id: int
    target: int
    attach_type: int


def links() -> tuple[list[LinkInfo], list[tuple[str, str]]]:
    """Every bpf_link of the system (BPF_LINK_GET_NEXT_ID, kernel 5.8+),
    in ascending id, and the (what, why) of those that could not be read
    (a link gone meanwhile is skipped silently). Listing needs
    CAP_SYS_ADMIN: without it the answer is no link and one problem."""
    out: list[LinkInfo] = []
    problems: list[tuple[str, str]] = []
    cur = c_uint32(0)
    nxt = c_uint32(0)
    while True:
        ret = lib().bpf_link_get_next_id(cur.value, ctypes.byref(nxt))
        if ret < 0:
            if -ret != 2:  # ENOENT: past the last one
                problems.append(("bpf links", strerror(-ret)))
            break
        cur.value = nxt.value
        fd = lib().bpf_link_get_fd_by_id(cur.value)
        if fd < 0:
            err = -fd
            if err != 2:
                problems.append((f"bpf link {cur.value}", strerror(err)))
            continue
        try:
            info = ctypes.create_string_buffer(_LINK_INFO_SIZE)
            size = c_uint32(_LINK_INFO_SIZE)
            ret = lib().bpf_obj_get_info_by_fd(fd, info, ctypes.byref(size))
        finally:
            os.close(fd)
        if ret < 0:
            problems.append((f"bpf link {cur.value}", strerror(-ret)))
            continue
        ltype, lid, prog = (c_uint32.from_buffer(info, o).value for o in (0, 4, 8))
        target = attach = 0
        if ltype == BPF_LINK_TYPE_CGROUP:
            target = c_uint64.from_buffer(info, 16).value
            attach = c_uint32.from_buffer(info, 24).value
        elif ltype == BPF_LINK_TYPE_NETNS:
            target = c_uint32.from_buffer(info, 16).value
            attach = c_uint32.from_buffer(info, 20).value
        out.append(LinkInfo(lid, ltype, prog, target, attach))
    return out, problems


class _TestRunOpts(ctypes.Structure):
    """struct bpf_test_run_opts of libbpf 1.0 (sz guards the rest)."""

    _fields_ = [
        ("sz", c_size_t),
        ("data_in", c_void_p),
        ("data_out", c_void_p),
        ("data_size_in", c_uint32),
        ("data_size_out", c_uint32),
        ("ctx_in", c_void_p),
        ("ctx_out", c_void_p),
        ("ctx_size_in", c_uint32),
        ("ctx_size_out", c_uint32),
        ("retval", c_uint32),
        ("repeat", c_int),
        ("duration", c_uint32),
        ("flags", c_uint32),
        ("cpu", c_uint32),
        ("batch_size", c_uint32),
    ]


def test_run_ctx(prog_fd: int, ctx: bytes) -> tuple[int, bytes]:
    """BPF_PROG_TEST_RUN of a program that takes only a context (sk_lookup):
    ``ctx`` in, (the program's return value, the context out) back. Raises
    OSError with the kernel's errno (ENOTSUPP 524: this kernel cannot
    test-run this program type)."""
    buf_in = ctypes.create_string_buffer(ctx, len(ctx))
    buf_out = ctypes.create_string_buffer(len(ctx))
    opts = _TestRunOpts(sz=ctypes.sizeof(_TestRunOpts), ctx_in=ctypes.addressof(buf_in),
                        ctx_out=ctypes.addressof(buf_out), ctx_size_in=len(ctx),
                        ctx_size_out=len(ctx), repeat=1)
    _check_ret(lib().bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts)), "test run")
    return opts.retval, buf_out.raw[:opts.ctx_size_out]
BPF_MAP_TYPE_RINGBUF = 27  # include/uapi/linux/bpf.h


def attached_programs(target_fd: int, attach_type: int, effective: bool = False,
                      limit: int = 64) -> list[int]:
    """Ids of the programs attached to a cgroup (or namespace) open on
    ``target_fd`` at ``attach_type`` (BPF_PROG_QUERY); with ``effective``,
    those inherited from its ancestors too."""
    ids = (c_uint32 * limit)()
    count = c_uint32(limit)
    flags = c_uint32(0)
    _check_ret(lib().bpf_prog_query(target_fd, attach_type,
                                    BPF_F_QUERY_EFFECTIVE if effective else 0,
                                    ctypes.byref(flags), ids, ctypes.byref(count)),
               f"query programs of type {attach_type}")
    return list(ids[:count.value])


def program_name(prog_id: int) -> str:
    """The name a loaded program was given (bpf_prog_info.name), '' when it
    is gone or cannot be opened."""
    fd = lib().bpf_prog_get_fd_by_id(prog_id)
    if fd < 0:
        return ""
    try:
        info, _ = _prog_info(fd, str(prog_id))
        return info.raw[_PROG_INFO_NAME:_PROG_INFO_NAME + 16].split(b"\0", 1)[0].decode(
            "utf-8", "replace")
    except OSError:
        return ""
    finally:
        os.close(fd)


def map_id(map_fd: int, name: str) -> int:
    """The kernel's id of the map open on ``map_fd`` (bpf_map_info.id), the
    number /proc/PID/fdinfo shows as ``map_id`` for whoever holds it."""
    info = ctypes.create_string_buffer(_MAP_INFO_SIZE)
    size = c_uint32(_MAP_INFO_SIZE)
    _check_ret(lib().bpf_obj_get_info_by_fd(map_fd, info, ctypes.byref(size)), f"info of map {name}")
    return c_uint32.from_buffer(info, 4).value


def program_type(prog_fd: int, name: str) -> int:
    """The program type the kernel loaded (bpf_prog_info.type: BPF_PROG_TYPE_*)."""
    info, _ = _prog_info(prog_fd, name)
    return c_uint32.from_buffer(info, 0).value


class MapOps:
    """Element operations on a map's fd, whoever created the map (libbpf,
    or bcc for the bcc engine). Subclasses give name, fd and key_size."""

    name: str
    fd: int
    key_size: int

    def lookup(self, key: bytes, value_size: int) -> bytes | None:
        """One element (``value_size`` is per-CPU size x CPUs for per-CPU maps)."""
        out = ctypes.create_string_buffer(value_size)
        ret = lib().bpf_map_lookup_elem(self.fd, key, out)
        if ret < 0:
            err = -ret
            if err == 2:  # ENOENT
                return None
            raise OSError(err, f"lookup in map {self.name}: {os.strerror(err)}")
        return out.raw

    def update(self, key: bytes, value: bytes) -> None:
        _check_ret(lib().bpf_map_update_elem(self.fd, key, value, 0), f"update map {self.name}")

    def delete(self, key: bytes) -> bool:
        """Remove one element; False when it was not there."""
        ret = lib().bpf_map_delete_elem(self.fd, key)
        if ret == -2:  # ENOENT
            return False
        _check_ret(ret, f"delete from map {self.name}")
        return True

    def lookup_batch(self, value_size: int, chunk: int = 4096) -> Iterator[tuple[bytes, bytes]]:
        """Every (key, value) of a hash map, ``chunk`` elements per syscall."""
        return lookup_batch(self.fd, self.key_size, value_size, self.name, chunk)


class FdMap(MapOps):
    """A map known only by its fd (created by bcc)."""

    def __init__(self, fd: int, name: str, key_size: int, value_size: int,
                 max_entries: int) -> None:
        self.fd = fd
        self.name = name
        self.key_size = key_size
        self.value_size = value_size
        self.max_entries = max_entries

    def pin(self, path: str) -> None:
        _check_ret(lib().bpf_obj_pin(self.fd, path.encode()), f"pin map {self.name} at {path}")

    def unpin(self, path: str) -> None:
        os.unlink(path)


class Map(MapOps):
    """A map of a libbpf object (its fd exists once the object is loaded)."""

    def __init__(self, ptr: int, name: str) -> None:
        self.ptr = ptr
        self.name = name

    @property
    def fd(self) -> int:
        return _check_ret(lib().bpf_map__fd(self.ptr), f"fd of map {self.name}")

    @property
    def key_size(self) -> int:
        return lib().bpf_map__key_size(self.ptr)

    @property
    def value_size(self) -> int:
        return lib().bpf_map__value_size(self.ptr)

    @property
    def max_entries(self) -> int:
        return lib().bpf_map__max_entries(self.ptr)

    @property
    def type(self) -> int:
        """BPF_MAP_TYPE_* (BPF_MAP_TYPE_RINGBUF: sized in bytes, a power of two pages)."""
        return lib().bpf_map__type(self.ptr)

    def set_max_entries(self, n: int) -> None:
        _check_ret(lib().bpf_map__set_max_entries(self.ptr, n), f"resize map {self.name}")

    def set_autocreate(self, on: bool) -> None:
        """Whether loading the object creates this map (before load only;
        no loaded program may use a map that is not created)."""
        _check_ret(lib().bpf_map__set_autocreate(self.ptr, on), f"autocreate map {self.name}")

    def initial_value(self) -> tuple[int, int]:
        """Address and size of the map's initial data (.rodata, .bss)."""
        size = c_size_t()
        ptr = lib().bpf_map__initial_value(self.ptr, ctypes.byref(size))
        return _check_ptr(ptr, f"initial value of map {self.name}"), size.value

    def pin(self, path: str) -> None:
        """Keep the map reachable at ``path`` in bpffs (for other processes)."""
        _check_ret(lib().bpf_map__pin(self.ptr, path.encode()), f"pin map {self.name} at {path}")

    def unpin(self, path: str) -> None:
        _check_ret(lib().bpf_map__unpin(self.ptr, path.encode()), f"unpin map {self.name}")


def open_pinned(path: str) -> int:
    """An fd on a map pinned in bpffs (close it with os.close)."""
    return _check_ret(lib().bpf_obj_get(path.encode()), f"open pinned map {path}")


# What a kernel answers to a batched lookup it does not implement for that
# map type (5.10 for per-CPU arrays: ENOTSUPP, 524, leaks to user space).
_NO_BATCH = (524, 95, 22)  # ENOTSUPP, EOPNOTSUPP, EINVAL


def lookup_batch(fd: int, key_size: int, value_size: int, name: str,
                 chunk: int = 4096) -> Iterator[tuple[bytes, bytes]]:
    """Every (key, value) of the map open on ``fd``, ``chunk`` per syscall;
    one key at a time (get_next_key, lookup) where the kernel has no batched
    lookup for this map type."""
    keys = ctypes.create_string_buffer(key_size * chunk)
    values = ctypes.create_string_buffer(value_size * chunk)
    token = ctypes.create_string_buffer(max(key_size, 8))
    opts = _BatchOpts(sz=ctypes.sizeof(_BatchOpts))
    in_batch = None
    while True:
        count = c_uint32(chunk)
        ret = lib().bpf_map_lookup_batch(
            fd, in_batch, token, keys, values, ctypes.byref(count), ctypes.byref(opts)
        )
        err = -ret if ret < 0 else 0
        if ret < 0 and err in _NO_BATCH and in_batch is None:
            yield from lookup_each(fd, key_size, value_size, name)
            return
        if ret < 0 and err != 2:  # ENOENT marks the last batch
            raise OSError(err, f"batch lookup in map {name}: {os.strerror(err)}")
        for i in range(count.value):
            yield (
                keys.raw[i * key_size : (i + 1) * key_size],
                values.raw[i * value_size : (i + 1) * value_size],
            )
        if ret < 0:
            return
        in_batch = token


def lookup_each(fd: int, key_size: int, value_size: int,
                name: str) -> Iterator[tuple[bytes, bytes]]:
    """Every (key, value) of the map open on ``fd``, two syscalls a key. A
    key deleted between the two is skipped; a walk restarted by a deletion
    (get_next_key of a deleted key starts over) never yields a key twice."""
    key = ctypes.create_string_buffer(key_size)
    nxt = ctypes.create_string_buffer(key_size)
    value = ctypes.create_string_buffer(value_size)
    seen: set[bytes] = set()
    prev = None
    while True:
        ret = lib().bpf_map_get_next_key(fd, prev, nxt)
        if ret < 0:
            if -ret == 2:  # ENOENT: past the last key
                return
            raise OSError(-ret, f"next key in map {name}: {os.strerror(-ret)}")
        ctypes.memmove(key, nxt, key_size)
        prev = key
        raw = key.raw
        if raw in seen:
            continue
        seen.add(raw)
        ret = lib().bpf_map_lookup_elem(fd, key, value)
        if ret == -2:  # deleted meanwhile
            continue
        _check_ret(ret, f"lookup in map {name}")
        yield raw, value.raw


class BpfObject:
    """An opened (and later loaded) BPF ELF object."""

    def __init__(self, path: str, btf_custom_path: str | None = None) -> None:
        self.path = path
        self._btf_path = btf_custom_path.encode() if btf_custom_path else None
        opts = _OpenOpts(sz=ctypes.sizeof(_OpenOpts), btf_custom_path=self._btf_path)
        take_log()
        ptr = lib().bpf_object__open_file(path.encode(), ctypes.byref(opts))
        self._ptr: int | None = _check_ptr(ptr, f"open {path}")

    def programs(self) -> list[Program]:
        progs, prev = [], None
        while prog := lib().bpf_object__next_program(self._ptr, prev):
            progs.append(
                Program(
                    prog,
                    lib().bpf_program__name(prog).decode(),
                    lib().bpf_program__section_name(prog).decode(),
                )
            )
            prev = prog
        return progs

    def map(self, name: str) -> Map:
        ptr = lib().bpf_object__find_map_by_name(self._ptr, name.encode())
        return Map(_check_ptr(ptr, f"map {name} in {self.path}"), name)

    def btf(self) -> "Btf":
        ptr = lib().bpf_object__btf(self._ptr)
        return Btf(_check_ptr(ptr, f"BTF of {self.path}"), owned=False)

    def load(self) -> None:
        _check_ret(lib().bpf_object__load(self._ptr), f"load {self.path}")

    def close(self) -> None:
        if self._ptr:
            lib().bpf_object__close(self._ptr)
            self._ptr = None


# ---- ring buffer ----------------------------------------------------------


class RingBuffer:
    """Polls one BPF ring buffer; each record is handed to ``on_record`` as bytes."""

    def __init__(self, ring: MapOps, on_record: Callable[[bytes], None]) -> None:
        def sample(_ctx: int, data: int, size: int) -> int:
            on_record(ctypes.string_at(data, size))
            return 0

        self._cb = _SAMPLE_FN(sample)  # kept alive as long as the ring
        ptr = lib().ring_buffer__new(ring.fd, self._cb, None, None)
        self._ptr: int | None = _check_ptr(ptr, f"ring buffer {ring.name}")

    def poll(self, timeout_ms: int) -> int:
        """Wait up to ``timeout_ms`` and consume what arrived; returns the count."""
        ret = lib().ring_buffer__poll(self._ptr, timeout_ms)
        if ret == -4:  # EINTR: a signal (Ctrl-C) arrived; the caller decides
            return 0
        return _check_ret(ret, "poll ring buffer")

    def consume(self) -> int:
        return _check_ret(lib().ring_buffer__consume(self._ptr), "consume ring buffer")

    def free(self) -> None:
        if self._ptr:
            lib().ring_buffer__free(self._ptr)
            self._ptr = None


# ---- BTF --------------------------------------------------------------------


class BtfKind:
    INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST = range(1, 11)
    RESTRICT, FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = range(11, 20)


class _BtfType(ctypes.Structure):
    _fields_ = [("name_off", c_uint32), ("info", c_uint32), ("size_or_type", c_uint32)]


@dataclass(frozen=True)
class BtfMember:
    name: str
    type_id: int
    bit_offset: int
    bitfield_size: int


class Btf:
    """Read access to a BTF blob: enough to walk structs, enums and datasecs."""

    def __init__(self, ptr: int, owned: bool) -> None:
        self._ptr: int | None = ptr
        self._owned = owned

    @classmethod
    def parse(cls, path: str) -> "Btf":
        """BTF of a file: raw BTF (/sys/kernel/btf/vmlinux) or an ELF with .BTF."""
        ptr = lib().btf__parse(path.encode(), None)
        return cls(_check_ptr(ptr, f"parse BTF of {path}"), owned=True)

    def close(self) -> None:
        if self._ptr and self._owned:
            lib().btf__free(self._ptr)
        self._ptr = None

    def find(self, name: str, kind: int) -> int:
        """Type id of ``name`` of ``kind``; raises KeyError when absent."""
        tid = lib().btf__find_by_name_kind(self._ptr, name.encode(), kind)
        if tid < 0:
            raise KeyError(name)
        return tid

    def _type(self, tid: int) -> _BtfType:
        ptr = _check_ptr(lib().btf__type_by_id(self._ptr, tid), f"BTF type {tid}")
        return _BtfType.from_address(ptr)

    def _name(self, off: int) -> str:
        raw = lib().btf__name_by_offset(self._ptr, off)
        return raw.decode() if raw else ""

    def kind(self, tid: int) -> int:
        return (self._type(tid).info >> 24) & 0x1F

    def name(self, tid: int) -> str:
        return self._name(self._type(tid).name_off)

    def _vlen(self, tid: int) -> int:
        return self._type(tid).info & 0xFFFF

    def _trailer(self, tid: int, words: int) -> list[int]:
        """The u32 words that follow a btf_type (members, enum values, ...)."""
        t = self._type(tid)
        n = self._vlen(tid) * words if words else 1
        arr = (c_uint32 * n).from_address(ctypes.addressof(t) + ctypes.sizeof(_BtfType))
        return list(arr)

    def size(self, tid: int) -> int:
        """Byte size of struct, union, enum, int, float, datasec."""
        return self._type(tid).size_or_type

    def ref(self, tid: int) -> int:
        """Target of a typedef, const, volatile, pointer, var."""
        return self._type(tid).size_or_type

    def resolve(self, tid: int) -> int:
        """Skip typedefs and qualifiers."""
        while self.kind(tid) in (BtfKind.TYPEDEF, BtfKind.CONST, BtfKind.VOLATILE,
                                 BtfKind.RESTRICT, BtfKind.TYPE_TAG):
            tid = self.ref(tid)
        return tid

    def int_info(self, tid: int) -> tuple[int, bool, bool]:
        """(bits, signed, char) of an INT type."""
        word = self._trailer(tid, 0)[0]
        encoding = (word >> 24) & 0x0F
        return word & 0xFF, bool(encoding & 1), bool(encoding & 2)

    def array_info(self, tid: int) -> tuple[int, int]:
        """(element type id, number of elements) of an ARRAY type."""
        t = self._type(tid)
        arr = (c_uint32 * 3).from_address(ctypes.addressof(t) + ctypes.sizeof(_BtfType))
        return arr[0], arr[2]

    def members(self, tid: int) -> list[BtfMember]:
        kflag = self._type(tid).info >> 31
        words = self._trailer(tid, 3)
        out = []
        for i in range(0, len(words), 3):
            name_off, mtype, offset = words[i : i + 3]
            bits = offset >> 24 if kflag else 0
            out.append(BtfMember(self._name(name_off), mtype, offset & 0xFFFFFF if kflag else offset, bits))
        return out

    def enum_values(self, tid: int) -> list[tuple[str, int]]:
        words = self._trailer(tid, 2)
        return [
            (self._name(words[i]), ctypes.c_int32(words[i + 1]).value)
            for i in range(0, len(words), 2)
        ]

    def datasec_vars(self, tid: int) -> dict[str, tuple[int, int]]:
        """name -> (offset, size) of each variable in a DATASEC."""
        words = self._trailer(tid, 3)
        return {self.name(words[i]): (words[i + 1], words[i + 2]) for i in range(0, len(words), 3)}


__all__ = [
    "BpfObject",
    "Btf",
    "BtfKind",
    "Link",
    "Map",
    "Program",
    "RingBuffer",
    "possible_cpus",
    "lookup_batch",
    "lookup_each",
    "open_pinned",
    "run_iterator",
    "take_log",
    "version",
]
