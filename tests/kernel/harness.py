"""Socket scenarios against the real kernel, with their ground truth.

The tracer is only trustworthy if what it reports for a bind(), listen() or
connect() is what the kernel really did. This harness makes the kernel do it:

* :class:`Netns` is a private named network namespace, so that scenarios own
  their ports, their sysctls (``ip_local_port_range``) and never collide with
  the host or with each other.
* :class:`Actor` is a forked child process living in that namespace, possibly
  as another uid, that performs socket operations one at a time on request.
  Several actors interleave, which is what real conflicts look like (two
  services, two users, a parent and its forked child).
* Every traced call returns a :class:`Truth`: what the actor asked for and
  what the kernel answered, measured inside the actor with ordinary system
  calls (``getsockname``, ``fstat``, ``getuid``), never computed by the tracer.
* :func:`match` finds the traced event for a Truth and :func:`assert_matches`
  compares them field by field.
* :class:`EventCollector` drains an engine until the expected events arrived.
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import gc
import os
import random
import secrets
import select
import signal
import socket
import struct
import subprocess
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection, Pipe
from typing import Any, Callable, Iterable

from tests.needs import SLOWDOWN
from tracer.events import Clock, decode
from tracer.records import CallEvent

# A wait for something that must happen (a traced event, a TCP state) gets
# the machine's slowdown: it only lasts that long when the
# thing never comes, so the claims stay as strict under emulation.
MUST_HAPPEN_S = 5.0 * SLOWDOWN

# ---- kernel constants Python 3.11 does not name ------------------------------

CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NAME = 15
IP_FREEBIND = 15
IP_TRANSPARENT = 19
IP_BIND_ADDRESS_NO_PORT = 24
IP_LOCAL_PORT_RANGE = 51
IPV6_TRANSPARENT = 75
IPV6_FREEBIND = 78

# Loaded before any fork: a child must not need to load a library.
_libc = ctypes.CDLL(None, use_errno=True)

FAMILIES = {"ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}
FAMILY_NAMES = {socket.AF_INET: "ipv4", socket.AF_INET6: "ipv6", socket.AF_UNSPEC: "unspec"}
PROTOCOLS = {"tcp": (socket.SOCK_STREAM, socket.IPPROTO_TCP), "udp": (socket.SOCK_DGRAM, socket.IPPROTO_UDP)}
OPTION_FLAGS = ("reuseaddr", "reuseport", "v6only", "freebind", "transparent", "bind_address_no_port")

# /proc/net/tcp state codes (include/net/tcp_states.h).
TCP_STATES = {
    1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
    6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING",
}

# TcpExt counters (besides TCPAbortOn*) that count a socket leaving early.
VANISHING_COUNTERS = ("TCPTimeWaitOverflow", "TW", "TWKilled", "TCPMemoryPressures", "OutOfWindowIcmps")

DEFAULT_TIMEOUT = 10.0  # seconds an actor may take for one step
KEEPER_MAX_LIFE = 300.0  # a keeper never outlives this, even if nobody kills it


def pick_port() -> int:
    """A port below the default ephemeral range, so no autobind can take it."""
    return random.randint(20000, 29999)


class HarnessError(RuntimeError):
    """The scenario could not be run (not: the kernel said no)."""


class ActorError(HarnessError):
    """A step that must succeed failed inside the actor."""


class ActorTimeout(HarnessError):
    """An actor did not answer in time; it has been killed."""


# ---- ground truth ------------------------------------------------------------


@dataclass(frozen=True)
class Truth:
    """What one bind()/listen()/connect() asked for and what the kernel did.

    Measured inside the actor. ``options`` is the kernel's own answer
    (getsockopt) as the call starts, not what the actor set: the kernel sets
    some flags itself (bind() to a specific IPv6 address turns on V6ONLY).
    ``seq`` counts earlier calls of the same kind on the same socket, so that
    a socket that connects twice is matched to the right event.
    """

    call: str
    pid: int
    tid: int
    uid: int
    sock_uid: int
    netns: int
    family: str
    protocol: str
    addr_family: str
    addr: str
    port: int
    bound_addr: str
    bound_port: int
    options: frozenset[str]  # read back from the kernel as the call starts
    bound_dev_if: int
    inode: int
    errno: int
    seq: int = 0
    options_set: frozenset[str] = frozenset()  # what the actor asked for

    @property
    def ok(self) -> bool:
        return self.errno == 0

    @property
    def errno_name(self) -> str:
        return errno_name(self.errno)

    def describe(self) -> str:
        return (
            f"{self.call}({self.family}/{self.protocol} inode {self.inode}, "
            f"{self.addr_family} {self.addr} port {self.port}) by pid {self.pid} "
            f"uid {self.uid} -> {self.errno_name}"
        )


def errno_name(code: int) -> str:
    return "OK" if code == 0 else errno_mod.errorcode.get(code, f"E{code}")


# Truth field -> how to read the same fact from a CallEvent.
COMPARED: dict[str, Callable[[CallEvent], Any]] = {
    "call": lambda e: e.call,
    "pid": lambda e: e.pid,
    "tid": lambda e: e.tid,
    "uid": lambda e: e.uid,
    "sock_uid": lambda e: e.sock_uid,
    "netns": lambda e: e.netns,
    "family": lambda e: e.family,
    "protocol": lambda e: e.protocol,
    "addr_family": lambda e: e.addr_family,
    "addr": lambda e: e.addr,
    "port": lambda e: e.port,
    "bound_addr": lambda e: e.bound_addr,
    "bound_port": lambda e: e.bound_port,
    "options": lambda e: e.options.flags,
    "bound_dev_if": lambda e: e.options.bound_dev_if,
    "inode": lambda e: e.inode,
    "errno": lambda e: e.errno,
}


def candidates(truth: Truth, events: Iterable[CallEvent]) -> list[CallEvent]:
    """Events of the same call on the same socket by the same thread, in order."""
    return [
        e for e in events
        if (e.netns, e.pid, e.tid, e.call, e.inode)
        == (truth.netns, truth.pid, truth.tid, truth.call, truth.inode)
    ]


def match(truth: Truth, events: Iterable[CallEvent]) -> CallEvent | None:
    """The traced event for ``truth``, or None when it has not been seen."""
    found = candidates(truth, events)
    return found[truth.seq] if len(found) > truth.seq else None


def mismatches(truth: Truth, event: CallEvent) -> list[str]:
    """One line per field where the tracer disagrees with the kernel's answer."""
    out = []
    for name, read in COMPARED.items():
        expected, traced = getattr(truth, name), read(event)
        if isinstance(expected, frozenset):
            expected, traced = sorted(expected), sorted(traced)
        if expected != traced:
            out.append(f"  {name}: traced {traced!r}, kernel/actor says {expected!r}")
    return out


def assert_matches(truth: Truth, event: CallEvent) -> None:
    """Field-by-field comparison; the message lists every disagreeing field."""
    bad = mismatches(truth, event)
    if bad:
        raise AssertionError(
            f"traced event disagrees with the ground truth for {truth.describe()}:\n"
            + "\n".join(bad)
            + f"\n  traced event: {event}"
        )


def expect_outcome(truth: Truth, expected_errno: int, why: str = "") -> None:
    """Guard the scenario itself: the kernel must have answered as the rule says.

    This is not the tracer under test; it catches a scenario that silently
    stopped exercising the rule it is named after.
    """
    if truth.errno != expected_errno:
        raise AssertionError(
            f"scenario broken: {truth.describe()}, expected {errno_name(expected_errno)}"
            + (f" ({why})" if why else "")
        )


def second_listen_refused(actor: "Actor", port: int) -> list[Truth]:
    """Two SO_REUSEADDR sockets bound to one port, then both listen(): the
    binds and the first listen() succeed, the second listen() fails (the
    kernel re-checks the port against the listener). The four calls, in order."""
    s1, s2 = actor.socket("tcp", reuseaddr=True), actor.socket("tcp", reuseaddr=True)
    truths = [actor.bind(s1, "127.0.0.1", port), actor.bind(s2, "127.0.0.1", port),
              actor.listen(s1), actor.listen(s2)]
    for truth in truths[:3]:
        expect_outcome(truth, 0)
    expect_outcome(truths[3], errno_mod.EADDRINUSE, "listen() re-checks the port against the listener")
    return truths


# ---- collecting events -------------------------------------------------------


class EventCollector:
    """Decodes an engine's events and waits for the ones a scenario expects.

    Polling happens on demand in the test's own thread (no background thread),
    so that forking actors never copies a thread that holds a lock. Events of
    namespaces nobody watches are dropped, to keep memory flat on a busy host.
    """

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.clock = Clock()
        self.events: list[CallEvent] = []
        self.watched: set[int] | None = None  # None: keep every event

    def watch(self, netns_inode: int) -> None:
        if self.watched is None:
            self.watched = set()
        self.watched.add(netns_inode)

    def follow(self, netns_inode: int) -> None:
        """Start afresh on one namespace: a new test, a new namespace."""
        self.reset()
        self.watched = {netns_inode}

    def drain(self, timeout_ms: int = 0) -> int:
        """Poll once; keep what is watched; return how many raw records came."""
        raws = self.engine.poll(timeout_ms)
        for raw in raws:
            event = decode(raw, self.clock)
            if self.watched is None or event.netns in self.watched:
                self.events.append(event)
        return len(raws)

    def reset(self) -> None:
        """Forget everything seen so far (events of earlier tests)."""
        while self.drain(0):
            pass
        self.events.clear()

    def collect(self, until: Callable[[list[CallEvent]], bool], timeout: float = 5.0) -> list[CallEvent]:
        """Poll until ``until(events)`` holds; return the events either way."""
        deadline = time.monotonic() + timeout
        while True:
            self.drain(20)
            if until(self.events) or time.monotonic() >= deadline:
                return list(self.events)

    def wait_for(self, *truths: Truth, timeout: float = MUST_HAPPEN_S) -> list[CallEvent]:
        """The traced event of every truth, in order; fails naming the missing ones."""
        events = self.collect(lambda evs: all(match(t, evs) for t in truths), timeout)
        missing = [t for t in truths if match(t, events) is None]
        if missing:
            seen = [e for e in events if e.netns in {t.netns for t in truths}]
            raise AssertionError(
                f"no traced event within {timeout}s for:\n"
                + "\n".join(f"  {t.describe()} (seq {t.seq})" for t in missing)
                + f"\nevents seen in the namespace(s): {len(seen)}\n"
                + "\n".join(f"  {e.call} pid {e.pid} inode {e.inode} {e.errno_name}" for e in seen[-20:])
            )
        return [match(t, events) for t in truths]  # type: ignore[misc]

    def verify(self, *truths: Truth, timeout: float = MUST_HAPPEN_S) -> list[CallEvent]:
        """Wait for every truth's event and compare them field by field."""
        events = self.wait_for(*truths, timeout=timeout)
        failures = [mismatches(t, e) for t, e in zip(truths, events)]
        if any(failures):
            raise AssertionError(
                "traced events disagree with the ground truth:\n"
                + "\n".join(
                    f"{t.describe()}:\n" + "\n".join(bad) + f"\n  traced: {e}"
                    for t, e, bad in zip(truths, events, failures) if bad
                )
            )
        return events


# ---- network namespaces ------------------------------------------------------


def _run(*cmd: str, input: str | None = None) -> str:
    result = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise HarnessError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


class Netns:
    """A private named network namespace with ``lo`` up.

    Named (``ip netns add``) rather than anonymous so that actors can join it
    by path, and so that a leftover one is visible and removable by name.
    Use as a context manager, or call :meth:`close`; both kill the actors.
    """

    PREFIX = "portscope-t-"

    def __init__(self) -> None:
        self.name = self.PREFIX + secrets.token_hex(4)
        self.path = f"/run/netns/{self.name}"
        self.actors: list[Actor] = []
        _run("ip", "netns", "add", self.name)
        try:
            _run("ip", "-n", self.name, "link", "set", "lo", "up")
            # The nsfs inode of the bind mount is the namespace's inode, the
            # same number the kernel stores in net->ns.inum.
            self.inode = os.stat(self.path).st_ino
        except BaseException:
            self.close()
            raise

    def sysctl(self, key: str, value: str) -> None:
        """Write /proc/sys/KEY inside the namespace (e.g. net/ipv4/ip_local_port_range)."""
        _run("ip", "netns", "exec", self.name, "tee", f"/proc/sys/{key}", input=f"{value}\n")

    def read_sysctl(self, key: str) -> str:
        return _run("ip", "netns", "exec", self.name, "cat", f"/proc/sys/{key}").strip()

    def local_port_range(self) -> tuple[int, int]:
        low, high = self.read_sysctl("net/ipv4/ip_local_port_range").split()
        return int(low), int(high)

    def close(self) -> None:
        """Kill every actor and keeper, then delete the namespace. Safe twice."""
        for actor in self.actors:
            actor.kill()
        self.actors.clear()
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=30)

    def __enter__(self) -> "Netns":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- actors: the test side ---------------------------------------------------

_subreaper_set = False


def _become_subreaper() -> None:
    """Orphans of our actors (keepers whose actor exited) become our children.

    Without it a keeper is re-parented to PID 1 and can be neither waited
    for nor reliably reaped; with it cleanup kills and reaps it by pid.
    """
    global _subreaper_set
    if not _subreaper_set:
        _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        _subreaper_set = True


class Actor:
    """A child process in ``ns`` (as ``uid``/``gid``) doing socket steps on request.

    Sockets are named by their file descriptor number inside the actor.
    bind/listen/connect never raise for a kernel refusal: they return a
    :class:`Truth` whose ``errno`` says what the kernel answered. Any other
    step that fails raises :class:`ActorError`; a step that takes longer than
    ``timeout`` kills the actor and raises :class:`ActorTimeout`.
    """

    def __init__(self, ns: Netns, uid: int = 0, gid: int | None = None,
                 timeout: float = DEFAULT_TIMEOUT, caps: frozenset[int] | None = None,
                 comm: bytes | None = None) -> None:
        """``comm``: the process's command name (/proc/PID/comm, at most 15
        bytes kept by the kernel), for tests of how names are shown."""
        _become_subreaper()
        self.ns = ns
        self.uid = uid
        self.gid = uid if gid is None else gid
        self.timeout = timeout
        self.keepers: list[int] = []
        self.alive = False
        self._conn, child_conn = Pipe(duplex=True)
        # The lifeline's read end is inherited by the actor and its keepers;
        # when we close the write end (or die), they see EOF and exit.
        lifeline_r, self._lifeline_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child never returns from here
            _child_main(child_conn, lifeline_r, ns.path, self.uid, self.gid, caps, comm)
        self.pid = pid
        self.alive = True
        ns.actors.append(self)
        child_conn.close()
        os.close(lifeline_r)
        try:
            hello = self._receive("start")
        except HarnessError:
            self.kill()
            raise
        self.netns = hello["netns"]
        if self.netns != ns.inode:
            self.kill()
            raise HarnessError(f"actor joined netns {self.netns}, expected {ns.inode}")

    # -- plumbing

    def _receive(self, what: str) -> Any:
        if not self._conn.poll(self.timeout):
            self.kill()
            raise ActorTimeout(f"actor {self.pid} gave no answer to {what} within {self.timeout}s")
        try:
            status, payload = self._conn.recv()
        except EOFError:
            self.kill()
            raise HarnessError(f"actor {self.pid} died during {what}") from None
        if status == "error":
            raise ActorError(f"actor {self.pid} (uid {self.uid}) failed at {what}: {payload}")
        return payload

    def _call(self, op: str, *args: Any, **kwargs: Any) -> Any:
        if not self.alive:
            raise HarnessError(f"actor {self.pid} is gone; cannot {op}")
        self._conn.send((op, args, kwargs))
        return self._receive(op)

    # -- socket steps

    def socket(self, protocol: str = "tcp", family: str = "ipv4", **options: Any) -> int:
        """A new socket; options: reuseaddr, reuseport, v6only, freebind,
        transparent, bind_address_no_port (bool), bindtodevice (device name)."""
        return self._call("socket", protocol, family, options)

    def setsockopt(self, fd: int, **options: Any) -> None:
        self._call("setsockopt", fd, options)

    def bind(self, fd: int, addr: str, port: int) -> Truth:
        return self._call("bind", fd, addr, port)

    def bind_unspec(self, fd: int, addr: str, port: int) -> Truth:
        """bind() with an AF_UNSPEC sockaddr_in (Python's bind cannot make one)."""
        return self._call("bind_unspec", fd, addr, port)

    def listen(self, fd: int, backlog: int = 16) -> Truth:
        return self._call("listen", fd, backlog)

    def connect(self, fd: int, addr: str, port: int) -> Truth:
        return self._call("connect", fd, addr, port)

    def accept(self, fd: int, timeout: float = 5.0) -> int:
        return self._call("accept", fd, timeout)

    def close(self, fd: int) -> None:
        self._call("close", fd)

    def fill(self, fd: int) -> int:
        """Send on ``fd`` until its buffers are full; the bytes sent."""
        return self._call("fill", fd)

    def fork_keep(self, fds: Iterable[int]) -> int:
        """Fork a keeper that holds ``fds`` open (and nothing else) until
        cleanup; returns its pid. The actor itself carries on."""
        pid = self._call("fork_keep", list(fds))
        self.keepers.append(pid)
        return pid

    def tcp_states(self, port: int) -> list[str]:
        """States of every TCP socket on local ``port`` in the namespace."""
        return self._call("tcp_states", port)

    def wait_tcp_states(self, port: int, ready: Callable[[list[str]], bool],
                        timeout: float = MUST_HAPPEN_S) -> list[str]:
        """Poll :meth:`tcp_states` until ``ready`` holds; fail with what was seen."""
        deadline = time.monotonic() + timeout
        while True:
            states = self.tcp_states(port)
            if ready(states):
                return states
            if time.monotonic() >= deadline:
                raise HarnessError(f"TCP sockets on port {port} stayed {states} for {timeout}s"
                                   f" (namespace's TCP aborts: {self.tcp_aborts() or 'none'})")
            time.sleep(0.02)

    def tcp_aborts(self) -> dict[str, int]:
        """The namespace's nonzero TcpExt counters that say why a socket vanished.

        A wait for a state that never comes names them, so that a scenario the
        kernel did not build (a TIME_WAIT bucket overflow, an abort on memory)
        is told apart from one that is merely slow.
        """
        return self._call("tcp_aborts")

    # -- ending

    def exit(self) -> None:
        """Ask the actor to exit (its sockets close, keepers stay) and reap it."""
        if not self.alive:
            return
        self._call("exit")
        self._reap(self.pid, self.timeout)
        self.alive = False

    def kill(self) -> None:
        """Kill the actor and its keepers, whatever state they are in. Safe twice."""
        for pid in ([self.pid] if self.alive else []) + self.keepers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._reap(pid, 2.0)
        self.alive = False
        self.keepers.clear()
        if self._lifeline_w >= 0:
            os.close(self._lifeline_w)
            self._lifeline_w = -1
        self._conn.close()

    @staticmethod
    def _reap(pid: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                return  # not ours (no subreaper) or already reaped
            if done:
                return
            time.sleep(0.01)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


# ---- actors: the child side --------------------------------------------------


def _child_main(conn: Connection, lifeline_r: int, ns_path: str, uid: int, gid: int,
                caps: frozenset[int] | None = None, comm: bytes | None = None) -> None:
    """Runs in the forked child: join the namespace, drop to uid, serve steps."""
    code = 0
    try:
        gc.freeze()  # never finalize the parent's objects (their fds are closed below)
        _close_fds_except({0, 1, 2, conn.fileno(), lifeline_r})
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if comm is not None:
            _libc.prctl(PR_SET_NAME, ctypes.c_char_p(comm), 0, 0, 0)
        try:
            _enter_netns(ns_path)
            _drop_privileges(uid, gid, caps)
        except Exception as exc:  # reported to the parent as the start failure
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
            raise
        _ActorServer(conn, lifeline_r).serve()
    except BaseException:
        code = 1
    finally:
        os._exit(code)


def _close_fds_except(keep: set[int]) -> None:
    """Drop every inherited fd: other actors' lifelines, the tracer's BPF fds."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def _enter_netns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


PR_SET_KEEPCAPS = 8
CAP_NET_BIND_SERVICE = 10
CAP_NET_ADMIN = 12
_CAP_VERSION_3 = 0x20080522


def _drop_privileges(uid: int, gid: int, caps: frozenset[int] | None = None) -> None:
    """After setns (which needs CAP_SYS_ADMIN): groups, then gid, then uid.
    ``caps``: keep exactly these capabilities (effective and permitted),
    even as another uid (a service given CAP_NET_BIND_SERVICE), or drop the
    others as root (root without the capability); None: what the uid gets."""
    if uid == 0 and gid == 0 and caps is None:
        return
    if caps is not None:
        _libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0)
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if caps is not None:
        _capset(caps)


def _capset(caps: frozenset[int]) -> None:
    header = (ctypes.c_uint32 * 2)(_CAP_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()
    for cap in caps:
        word, bit = divmod(cap, 32)
        data[word * 3] |= 1 << bit  # effective
        data[word * 3 + 1] |= 1 << bit  # permitted
    if _libc.capset(header, data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")


def _sockaddr_str(family: int, name: Any) -> tuple[str, int]:
    """(address, port) from getsockname, canonical as inet_ntop writes it."""
    host, port = name[0], name[1]
    return canonical_addr(family, host.split("%", 1)[0]), port


def canonical_addr(family: int, addr: str) -> str:
    af = socket.AF_INET6 if family == socket.AF_INET6 else socket.AF_INET
    return socket.inet_ntop(af, socket.inet_pton(af, addr))


class _ActorServer:
    """The actor's loop: one request, one reply; it never raises to the pipe."""

    def __init__(self, conn: Connection, lifeline_r: int) -> None:
        self.conn = conn
        self.lifeline_r = lifeline_r
        self.sockets: dict[int, socket.socket] = {}
        self.options: dict[int, set[str]] = {}
        self.devices: dict[int, int] = {}
        self.calls: dict[tuple[int, int, str], int] = {}
        self.netns = os.stat("/proc/self/ns/net").st_ino

    def serve(self) -> None:
        self.conn.send(("ok", {"netns": self.netns, "pid": os.getpid()}))
        while True:
            try:
                op, args, kwargs = self.conn.recv()
            except EOFError:  # the test process is gone
                return
            try:
                result = getattr(self, f"op_{op}")(*args, **kwargs)
            except Exception as exc:
                self.conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
                continue
            self.conn.send(("ok", result))
            if op == "exit":
                return

    # -- steps that must succeed

    def op_socket(self, protocol: str, family: str, options: dict[str, Any]) -> int:
        kind, proto = PROTOCOLS[protocol]
        sock = socket.socket(FAMILIES[family], kind, proto)
        fd = sock.fileno()
        self.sockets[fd] = sock
        self.options[fd] = set()
        self.devices[fd] = 0
        self.op_setsockopt(fd, options)
        return fd

    def op_setsockopt(self, fd: int, options: dict[str, Any]) -> None:
        sock = self.sockets[fd]
        for name, value in options.items():
            if name == "local_port_range":  # (low, high): IP_LOCAL_PORT_RANGE, kernel 6.3+
                low, high = value
                sock.setsockopt(socket.IPPROTO_IP, IP_LOCAL_PORT_RANGE,
                                (low | high << 16).to_bytes(4, "little"))
                continue
            if name == "rcvbuf":  # a small receive buffer: a peer that reads slowly
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, value)
                continue
            if name == "bindtodevice":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, value.encode())
                self.devices[fd] = socket.if_nametoindex(value) if value else 0
                continue
            level, optname = _option(sock.family, name)
            sock.setsockopt(level, optname, int(bool(value)))
            (self.options[fd].add if value else self.options[fd].discard)(name)

    def op_accept(self, fd: int, timeout: float) -> int:
        # select, not settimeout: a timeout would make the socket non-blocking.
        sock = self.sockets[fd]
        if not select.select([sock], [], [], timeout)[0]:
            raise TimeoutError(f"no connection to accept within {timeout}s")
        conn, _ = sock.accept()
        new = conn.fileno()
        self.sockets[new] = conn
        self.options[new] = set(self.options[fd])  # inherited from the listener
        self.devices[new] = self.devices[fd]
        return new

    def op_close(self, fd: int) -> None:
        self.sockets.pop(fd).close()

    def op_fill(self, fd: int) -> int:
        """Send until the socket's buffers are full (the peer does not read)."""
        sock, sent = self.sockets[fd], 0
        sock.setblocking(False)
        try:
            while True:
                sent += sock.send(b"x" * 65536)
        except BlockingIOError:
            return sent
        finally:
            sock.setblocking(True)

    def op_fork_keep(self, fds: list[int]) -> int:
        pid = os.fork()
        if pid == 0:
            self._keep(set(fds))
        return pid

    def _keep(self, fds: set[int]) -> None:
        """The keeper: hold ``fds`` until the lifeline closes or time runs out."""
        try:
            self.conn.close()
            for fd in [fd for fd in self.sockets if fd not in fds]:
                self.sockets.pop(fd).close()
            select.select([self.lifeline_r], [], [], KEEPER_MAX_LIFE)
        finally:
            os._exit(0)

    def op_tcp_states(self, port: int) -> list[str]:
        states = []
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with open(table) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    if int(cols[1].rsplit(":", 1)[1], 16) == port:
                        states.append(TCP_STATES.get(int(cols[3], 16), cols[3]))
        return sorted(states)

    def op_tcp_aborts(self) -> dict[str, int]:
        with open("/proc/net/netstat") as f:
            lines = f.read().splitlines()
        for names, values in zip(lines[::2], lines[1::2]):
            if names.startswith("TcpExt:"):
                counters = dict(zip(names.split()[1:], map(int, values.split()[1:])))
                return {name: value for name, value in counters.items()
                        if value and (name.startswith("TCPAbortOn") or name in VANISHING_COUNTERS)}
        return {}

    def op_exit(self) -> None:
        return None

    # -- the traced calls: a refusal is a result, not an error

    def op_bind(self, fd: int, addr: str, port: int) -> Truth:
        sock = self.sockets[fd]
        return self._traced(fd, "bind", FAMILY_NAMES[sock.family], addr, port,
                            lambda: sock.bind(_sockaddr(sock.family, addr, port)))

    def op_bind_unspec(self, fd: int, addr: str, port: int) -> Truth:
        raw = struct.pack("=H", socket.AF_UNSPEC) + struct.pack("!H", port) \
            + socket.inet_aton(addr) + bytes(8)

        def call() -> None:
            buf = ctypes.create_string_buffer(raw, len(raw))
            if _libc.bind(fd, buf, len(raw)) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))

        return self._traced(fd, "bind", "unspec", addr, port, call)

    def op_listen(self, fd: int, backlog: int) -> Truth:
        sock = self.sockets[fd]
        addr, port = _sockaddr_str(sock.family, sock.getsockname())
        return self._traced(fd, "listen", FAMILY_NAMES[sock.family], addr, port,
                            lambda: sock.listen(backlog))

    def op_connect(self, fd: int, addr: str, port: int) -> Truth:
        sock = self.sockets[fd]
        return self._traced(fd, "connect", FAMILY_NAMES[sock.family], addr, port,
                            lambda: sock.connect(_sockaddr(sock.family, addr, port)))

    def _traced(self, fd: int, call: str, addr_family: str, addr: str, port: int,
                syscall: Callable[[], None]) -> Truth:
        sock = self.sockets[fd]
        options = self._kernel_options(sock)  # as they are when the call starts
        if not self.options[fd] <= options:
            raise HarnessError(f"options set {sorted(self.options[fd])} but the kernel has {sorted(options)}")
        try:
            syscall()
            err = 0
        except OSError as exc:
            err = exc.errno or 0
        bound_addr, bound_port = _sockaddr_str(sock.family, sock.getsockname())
        stat = os.fstat(fd)
        # Per socket, not per fd: a closed socket's fd number is given to the
        # next one (a scenario that builds its TIME_WAIT again, for example).
        key = (fd, stat.st_ino, call)
        seq = self.calls.get(key, 0)
        self.calls[key] = seq + 1
        return Truth(
            call=call,
            pid=os.getpid(),
            tid=threading.get_native_id(),
            uid=os.getuid(),
            sock_uid=stat.st_uid,
            netns=self.netns,
            family=FAMILY_NAMES[sock.family],
            protocol="tcp" if sock.type == socket.SOCK_STREAM else "udp",
            addr_family=addr_family,
            addr=canonical_addr(socket.AF_INET6 if addr_family == "ipv6" else socket.AF_INET, addr),
            port=port,
            bound_addr=bound_addr,
            bound_port=bound_port,
            options=options,
            bound_dev_if=self.devices[fd],
            inode=stat.st_ino,
            errno=err,
            seq=seq,
            options_set=frozenset(self.options[fd]),
        )

    @staticmethod
    def _kernel_options(sock: socket.socket) -> frozenset[str]:
        names = [n for n in OPTION_FLAGS if n != "v6only" or sock.family == socket.AF_INET6]
        return frozenset(n for n in names if sock.getsockopt(*_option(sock.family, n)))


def _sockaddr(family: int, addr: str, port: int) -> tuple:
    return (addr, port, 0, 0) if family == socket.AF_INET6 else (addr, port)


def _option(family: int, name: str) -> tuple[int, int]:
    """(level, optname) of a boolean option for a socket of ``family``."""
    v6 = family == socket.AF_INET6
    table = {
        "reuseaddr": (socket.SOL_SOCKET, socket.SO_REUSEADDR),
        "reuseport": (socket.SOL_SOCKET, socket.SO_REUSEPORT),
        "v6only": (socket.IPPROTO_IPV6, socket.IPV6_V6ONLY),
        "freebind": (socket.IPPROTO_IPV6, IPV6_FREEBIND) if v6 else (socket.IPPROTO_IP, IP_FREEBIND),
        "transparent": (socket.IPPROTO_IPV6, IPV6_TRANSPARENT) if v6 else (socket.IPPROTO_IP, IP_TRANSPARENT),
        "bind_address_no_port": (socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT),
    }
    if name not in table:
        raise ValueError(f"unknown socket option {name!r}")
    if name == "v6only" and not v6:
        raise ValueError("v6only applies to ipv6 sockets only")
    return table[name]


# ---- reuseport groups: actors that serve many connections or datagrams ------

SO_ATTACH_REUSEPORT_CBPF = 51
SO_RCVBUFFORCE = 33


class _Serving:
    """A thread inside an actor that accepts (TCP) or receives (UDP) on one
    socket and counts, closing each accepted connection at once."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.count = 0
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        tcp = self.sock.type == socket.SOCK_STREAM
        while not self.stopping:
            if not select.select([self.sock], [], [], 0.05)[0]:
                continue
            if tcp:
                conn, _ = self.sock.accept()
                conn.close()
            else:
                self.sock.recv(65536)
            self.count += 1

    def stop(self) -> int:
        self.stopping = True
        self.thread.join()
        return self.count


def _op_serve(self: _ActorServer, fd: int) -> None:
    if not hasattr(self, "serving"):
        self.serving = {}
    self.serving[fd] = _Serving(self.sockets[fd])


def _op_served(self: _ActorServer, fd: int) -> int:
    return self.serving[fd].count


def _op_stop_serving(self: _ActorServer, fd: int) -> int:
    return self.serving.pop(fd).stop()


def _op_rcvbuf(self: _ActorServer, fd: int, size: int) -> None:
    self.sockets[fd].setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)


def _op_connect_many(self: _ActorServer, family: str, addr: str, port: int, n: int) -> int:
    """``n`` connections, each from a new socket, closed at once; returns how
    many connected. A plain close (FIN), not a reset: on loopback the
    handshake's last ACK and a reset sent right after it can be processed in
    either order (two CPUs' backlogs), and a reset first silently undoes a
    connection the client saw succeed; a FIN completes the handshake itself."""
    made = 0
    for _ in range(n):
        with socket.socket(FAMILIES[family], socket.SOCK_STREAM) as s:
            s.connect(_sockaddr(FAMILIES[family], addr, port))
            made += 1
    return made


def _op_send_many(self: _ActorServer, family: str, addr: str, port: int, n: int) -> int:
    """``n`` datagrams, each from a new socket (a new source port, so the
    group's hash spreads them); returns how many were sent."""
    sent = 0
    for _ in range(n):
        with socket.socket(FAMILIES[family], socket.SOCK_DGRAM) as s:
            s.sendto(b"x", _sockaddr(FAMILIES[family], addr, port))
            sent += 1
    return sent


def _op_steer_to(self: _ActorServer, fd: int, index: int) -> None:
    """Attach a classic reuseport BPF program that sends everything to the
    group member at ``index`` (SO_ATTACH_REUSEPORT_CBPF: "ret #index")."""
    insns = struct.pack("HBBI", 0x06, 0, 0, index)  # BPF_RET | BPF_K
    prog = ctypes.create_string_buffer(insns, len(insns))
    fprog = struct.pack("HxxxxxxQ", 1, ctypes.addressof(prog))
    buf = ctypes.create_string_buffer(fprog, len(fprog))
    if _libc.setsockopt(fd, socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, buf, len(fprog)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"SO_ATTACH_REUSEPORT_CBPF: {os.strerror(err)}")


for _name, _fn in (("serve", _op_serve), ("served", _op_served), ("stop_serving", _op_stop_serving),
                   ("rcvbuf", _op_rcvbuf), ("connect_many", _op_connect_many),
                   ("send_many", _op_send_many), ("steer_to", _op_steer_to)):
    setattr(_ActorServer, f"op_{_name}", _fn)


class ServingActor(Actor):
    """An actor that can also serve a socket in the background and make or
    send many connections or datagrams in one step."""

    def serve(self, fd: int) -> None:
        """Accept (TCP) or receive (UDP) on ``fd`` in the background, counting."""
        self._call("serve", fd)

    def served(self, fd: int) -> int:
        """How many connections accepted or datagrams received so far."""
        return self._call("served", fd)

    def stop_serving(self, fd: int) -> int:
        """Stop accepting or receiving; returns the final count."""
        return self._call("stop_serving", fd)

    def rcvbuf(self, fd: int, size: int) -> None:
        self._call("rcvbuf", fd, size)

    def connect_many(self, addr: str, port: int, n: int, family: str = "ipv4") -> int:
        return self._call("connect_many", family, addr, port, n)

    def send_many(self, addr: str, port: int, n: int, family: str = "ipv4") -> int:
        return self._call("send_many", family, addr, port, n)

    def steer_to(self, fd: int, index: int) -> None:
        self._call("steer_to", fd, index)
