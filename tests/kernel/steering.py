"""Programs that steer traffic, attached for real, for the kernel tests.

tests/kernel/bpf/steer.bpf.c is compiled once per session (clang -O2 -g
-target bpf -I probes, like test_bind_hooks). Each attach loads its own copy
of the object (its own maps), attaches one program with a bpf_link, and
detaches it (and unloads it) on ``close()`` or at the end of a ``with``.

Use from any test module under tests/kernel::

    from steering import attach_steer, attach_connect_rewrite, ns_socket

    with attach_steer(netns.path, 8080, listener.fileno()) as steer:
        ...                       # TCP to port 8080 in netns now reaches listener
    with attach_steer(netns.path, 53, udp_sock.fileno(), protocol="udp"):
        ...
    with attach_steer(netns.path, 9000, None, drop=True):
        ...                       # TCP to 9000 is dropped (connection refused)
    with attach_connect_rewrite("/portscope-t-x", 7000, 7001):
        ...                       # connect() to :7000 by that cgroup's processes goes to :7001

``steer.prog_id``, ``steer.link_id`` and ``steer.tag`` say what the kernel
gave it. ``ns_socket(path, ...)`` makes a socket that belongs to a namespace
(created on a thread that entered it), in this process, so that its fd can
go into the SOCKMAP and the test can accept on it. A missing clang fails
under CI (tests/needs.py).
"""

from __future__ import annotations

import functools
import os
import socket
import struct
import subprocess
import tempfile
from pathlib import Path

from tests.needs import SLOWDOWN, missing, need_tool
from tracer import libbpf
from tracer.cgroups import cgroup2_root
from tracer.nsenter import in_netns

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "tests/kernel/bpf/steer.bpf.c"
STEER_NAME = "ps_steer"  # bpf_prog_info.name of the sk_lookup program
REWRITE_NAME = "ps_rewrite"  # of the cgroup/connect4 program


@functools.lru_cache(maxsize=1)
def steer_object() -> str:
    """The compiled object's path (compiled on the first call of the session)."""
    clang = need_tool("clang")
    out = Path(tempfile.mkdtemp(prefix="portscope-steer-")) / "steer.bpf.o"
    subprocess.run([clang, "-O2", "-g", "-target", "bpf", "-D__TARGET_ARCH_x86",
                    f"-I{ROOT / 'probes'}", "-c", str(SOURCE), "-o", str(out)], check=True,
                   timeout=300)
    return str(out)


class Attached:
    """One loaded copy of steer.bpf.o with one of its programs attached."""

    def __init__(self, program: str) -> None:
        self.obj = libbpf.BpfObject(steer_object())
        self.link: libbpf.Link | None = None
        try:
            for prog in self.obj.programs():
                prog.set_autoload(prog.name == program)
            # The other program's maps are created too but stay unused.
            self.obj.load()
            (self.program,) = [p for p in self.obj.programs() if p.name == program]
        except BaseException:
            self.obj.close()
            raise

    def _linked(self, link: libbpf.Link) -> None:
        self.link = link
        self.prog_id = _id_of(self.program.fd)
        self.link_id = _id_of(link.fd)
        info = libbpf.program_info(self.prog_id)
        assert info is not None
        self.name, self.tag = info[0], info[1]

    def close(self) -> None:
        if self.link is not None:
            self.link.destroy()
            self.link = None
        self.obj.close()

    def __enter__(self) -> "Attached":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _id_of(fd: int) -> int:
    """The id of the program or link open on ``fd`` (both infos start
    with ... type, id for links; type, id for programs)."""
    import ctypes

    buf = ctypes.create_string_buffer(256)
    size = ctypes.c_uint32(256)
    ret = libbpf.lib().bpf_obj_get_info_by_fd(fd, buf, ctypes.byref(size))
    if ret < 0:
        raise OSError(-ret, os.strerror(-ret))
    return ctypes.c_uint32.from_buffer(buf, 4).value


def _open_ns(netns: str | int) -> tuple[int, bool]:
    if isinstance(netns, int):
        return netns, False
    return os.open(netns, os.O_RDONLY | os.O_CLOEXEC), True


def attach_steer(netns: str | int, port: int, target_fd: int | None, protocol: str = "tcp",
                 drop: bool = False) -> Attached:
    """An sk_lookup link on the namespace (a path such as /run/netns/NAME, or
    an open fd) that hands new ``protocol`` traffic to local ``port`` to the
    socket open on ``target_fd`` (a listening TCP or a bound UDP socket of
    that namespace); with ``drop``, drops it instead (``target_fd`` unused)."""
    handle = Attached(STEER_NAME)
    try:
        cfg = handle.obj.map("steer_cfg")
        cfg.update(struct.pack("<I", 0), struct.pack("<III", port,
                                                     socket.IPPROTO_UDP if protocol == "udp"
                                                     else socket.IPPROTO_TCP, int(drop)))
        if target_fd is not None:
            handle.obj.map("steer_target").update(struct.pack("<I", 0),
                                                  struct.pack("<Q", target_fd))
        fd, opened = _open_ns(netns)
        try:
            handle._linked(handle.program.attach_netns(fd))
        finally:
            if opened:
                os.close(fd)
    except BaseException:
        handle.close()
        raise
    return handle


def cgroup_dir(cgroup: str) -> str:
    """The directory of a cgroup2 path ("/x/y" below the mount, or absolute)."""
    root = cgroup2_root()
    if root is None:
        missing("needs a cgroup2 hierarchy")
    assert root is not None
    return cgroup if cgroup.startswith(root + "/") else os.path.join(root, cgroup.lstrip("/"))


def attach_connect_rewrite(cgroup: str, from_port: int, to_port: int) -> Attached:
    """A cgroup/connect4 link on ``cgroup`` (a path below the cgroup2 mount,
    "/portscope-t-x", or the absolute directory) turning connect() to
    ``from_port`` into connect() to ``to_port``."""
    handle = Attached(REWRITE_NAME)
    try:
        handle.obj.map("rewrite_cfg").update(struct.pack("<I", 0),
                                             struct.pack("<II", from_port, to_port))
        fd = os.open(cgroup_dir(cgroup), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            handle._linked(handle.program.attach_cgroup(fd))
        finally:
            os.close(fd)
    except BaseException:
        handle.close()
        raise
    return handle


def ns_socket(netns: str, protocol: str = "tcp", family: int = socket.AF_INET) -> socket.socket:
    """A socket of the namespace at ``netns`` (created on a thread inside it)."""
    kind = socket.SOCK_DGRAM if protocol == "udp" else socket.SOCK_STREAM
    fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return in_netns(fd, lambda: socket.socket(family, kind))
    finally:
        os.close(fd)


def listener(netns: str, port: int, protocol: str = "tcp") -> socket.socket:
    """A TCP listener (or bound UDP socket) on 127.0.0.1:``port`` in the namespace."""
    s = ns_socket(netns, protocol)
    s.bind(("127.0.0.1", port))
    if protocol == "tcp":
        s.listen(16)
    s.settimeout(5.0 * SLOWDOWN)
    return s
