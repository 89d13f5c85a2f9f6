"""`portscope record` and `portscope report` against real hijack scenarios.

Each scenario is played for real while `portscope record` runs as a
separate process: actors are separate programs (exec'd, so that their
executable is what the journal must name), in a private network namespace,
as other uids (setresuid before exec) or in another cgroup. The recorder is
stopped, then `portscope report --json` must list exactly the expected
finding, with the right pids. A clean scenario (the same kinds of sharing,
done by one service) must list none.

The crash tests kill the recorder with SIGKILL during a bind storm and check
that the file is intact, reopens, and holds every bind performed up to one
second before the kill.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from harness import Netns

from tests.needs import missing

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.kernel

SNAPSHOT_INTERVAL = "0.5"
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
UID_A, UID_B = 41000, 41001

# The actor program: one socket operation per line of JSON on stdin, one
# JSON answer per line on stdout. Run by a chosen executable.
ACTOR = r'''
import ctypes, json, os, socket, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
socks = {}
OPTS = {"reuseaddr": (socket.SOL_SOCKET, socket.SO_REUSEADDR),
        "reuseport": (socket.SOL_SOCKET, socket.SO_REUSEPORT)}

def reply(**kw):
    sys.stdout.write(json.dumps(kw) + "\n")
    sys.stdout.flush()

def steer(fd, index):
    insns = struct.pack("HBBI", 0x06, 0, 0, index)  # BPF_RET | BPF_K: "ret #index"
    prog = ctypes.create_string_buffer(insns, len(insns))
    fprog = struct.pack("HxxxxxxQ", 1, ctypes.addressof(prog))
    buf = ctypes.create_string_buffer(fprog, len(fprog))
    if libc.setsockopt(fd, socket.SOL_SOCKET, 51, buf, len(fprog)) != 0:  # SO_ATTACH_REUSEPORT_CBPF
        raise OSError(ctypes.get_errno(), "SO_ATTACH_REUSEPORT_CBPF")

reply(pid=os.getpid(), exe=os.readlink("/proc/self/exe"), uid=os.getuid(),
      netns=os.stat("/proc/self/ns/net").st_ino)
for line in sys.stdin:
    req = json.loads(line)
    op = req["op"]
    try:
        if op == "socket":
            family = socket.AF_INET6 if req.get("family") == "ipv6" else socket.AF_INET
            kind = socket.SOCK_DGRAM if req["proto"] == "udp" else socket.SOCK_STREAM
            s = socket.socket(family, kind)
            for name in req.get("options", []):
                s.setsockopt(*OPTS[name], 1)
            socks[s.fileno()] = s
            reply(fd=s.fileno(), inode=os.fstat(s.fileno()).st_ino)
        elif op in ("bind", "listen"):
            s = socks[req["fd"]]
            try:
                s.bind((req["addr"], req["port"])) if op == "bind" else s.listen(16)
                reply(errno=0)
            except OSError as e:
                reply(errno=e.errno)
        elif op == "close":
            socks.pop(req["fd"]).close()
            reply()
        elif op == "steer":
            steer(req["fd"], req["index"])
            reply()
        elif op == "exit":
            reply()
            break
    except Exception as e:
        reply(error=repr(e))
'''


class Programs:
    """Executables for the actors: the system python, and a copy of it under
    another name (another executable as far as /proc/PID/exe goes)."""

    def __init__(self) -> None:
        # World-readable: actors running as other uids exec from here.
        self.dir = tempfile.mkdtemp(prefix="portscope-journal-")
        os.chmod(self.dir, 0o755)
        self.service = os.path.realpath(sys.executable)
        self.impostor = os.path.join(self.dir, "impostor")
        shutil.copy2(self.service, self.impostor)
        os.chmod(self.impostor, 0o755)
        self.script = os.path.join(self.dir, "actor.py")
        Path(self.script).write_text(ACTOR)
        os.chmod(self.script, 0o644)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class ExecActor:
    """A separate program in ``ns``, as ``uid``, optionally in ``cgroup``,
    doing socket operations on request."""

    def __init__(self, ns: Netns, exe: str, script: str, uid: int = 0,
                 cgroup: str | None = None) -> None:
        ns_path = ns.path

        def enter() -> None:  # in the child, before exec
            fd = os.open(ns_path, os.O_RDONLY)
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                os._exit(97)
            os.close(fd)
            if cgroup:
                with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
                    f.write(str(os.getpid()))
            if uid:
                os.setgroups([])
                os.setresgid(uid, uid, uid)
                os.setresuid(uid, uid, uid)

        self.proc = subprocess.Popen([exe, script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     preexec_fn=enter, text=True, bufsize=1, cwd="/")
        hello = self._read()
        self.pid, self.exe, self.uid, self.netns = hello["pid"], hello["exe"], hello["uid"], hello["netns"]
        assert self.netns == ns.inode and self.uid == uid and self.exe == exe

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise RuntimeError(f"actor {self.proc.pid} died (status {self.proc.poll()})")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"actor {self.proc.pid}: {answer['error']}")
        return answer

    def _call(self, **req: Any) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps(req) + "\n")  # type: ignore[union-attr]
        return self._read()

    def socket(self, proto: str = "tcp", options: tuple[str, ...] = (), family: str = "ipv4") -> int:
        return self._call(op="socket", proto=proto, family=family, options=list(options))["fd"]

    def bind(self, fd: int, addr: str, port: int) -> int:
        return self._call(op="bind", fd=fd, addr=addr, port=port)["errno"]

    def listen(self, fd: int) -> int:
        return self._call(op="listen", fd=fd)["errno"]

    def serve(self, addr: str, port: int, proto: str = "tcp", options: tuple[str, ...] = ()) -> int:
        """A socket bound (and for TCP, listening) that must succeed."""
        fd = self.socket(proto, options)
        assert self.bind(fd, addr, port) == 0, f"bind {addr}:{port} failed"
        if proto == "tcp":
            assert self.listen(fd) == 0
        return fd

    def close(self, fd: int) -> None:
        self._call(op="close", fd=fd)

    def steer(self, fd: int, index: int = 0) -> None:
        self._call(op="steer", fd=fd, index=index)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)


class Recording:
    """A running `portscope record`, its journal, and the report on it."""

    def __init__(self, path: Path, *extra: str) -> None:
        self.path = path
        started = time.time()
        self.stderr = open(path.with_suffix(".stderr"), "w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tracer.cli", "record", "-o", str(path),
             "--snapshot-interval", SNAPSHOT_INTERVAL, *extra],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=self.stderr)
        self.wait_snapshot(after=started, timeout=20)

    def log(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    def wait_snapshot(self, after: float | None = None, timeout: float = 10.0) -> None:
        """Until a snapshot has started after ``after`` (default: now), so
        that the journal saw the state the scenario has reached."""
        after = time.time() if after is None else after
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"portscope record exited ({self.proc.returncode}):\n{self.log()}")
            if self.path.exists():
                try:
                    if self.query("SELECT count(*) FROM snapshots WHERE time > ?", after)[0][0]:
                        return
                except sqlite3.OperationalError:
                    pass  # not created yet
            time.sleep(0.05)
        raise AssertionError(f"no snapshot after {after} within {timeout}s:\n{self.log()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError("portscope record did not stop on SIGTERM")
        assert self.proc.returncode == 0, self.log()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def report(path: Path, *args: str) -> dict[str, Any]:
    result = subprocess.run([sys.executable, "-m", "tracer.cli", "report", str(path), "--json", *args],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def summary(findings: list[dict[str, Any]]) -> list[tuple[str, list[int], list[int]]]:
    return [(f["kind"], f["pids"], f["owners"]) for f in findings]


# ---- fixtures -------------------------------------------------------------------


@pytest.fixture(scope="module")
def programs() -> Iterator[Programs]:
    p = Programs()
    try:
        yield p
    finally:
        p.close()


@pytest.fixture(scope="module")
def can_record(root: None) -> None:
    from tracer.engine import EngineConfig
    from tracer.errors import PortscopeError
    from tracer.loader import open_engine

    try:
        open_engine(EngineConfig(successes=frozenset({"bind", "listen", "listen_close"}))).close()
    except (PortscopeError, OSError) as exc:
        missing(f"the BPF probes cannot be loaded: {type(exc).__name__}: {exc}")


class Scene:
    """A namespace, its actors and a recording, all torn down at the end
    (the recording first, so that the teardown is not in the journal)."""

    def __init__(self, tmp: Path, programs: Programs) -> None:
        self.programs = programs
        self.tmp = tmp
        self.ns = Netns()
        self.actors: list[ExecActor] = []
        self.cgroups: list[str] = []
        self.recording: Recording | None = None

    def record(self, *extra: str, name: str = "journal.db") -> Recording:
        self.recording = Recording(self.tmp / name, *extra)
        return self.recording

    def actor(self, exe: str | None = None, uid: int = 0, cgroup: str | None = None) -> ExecActor:
        a = ExecActor(self.ns, exe or self.programs.service, self.programs.script, uid, cgroup)
        self.actors.append(a)
        return a

    def cgroup(self) -> str:
        base = _cgroup2_mount()
        if base is None:
            missing("needs a writable cgroup v2 hierarchy to put an actor in another cgroup")
        path = tempfile.mkdtemp(prefix="portscope-t-", dir=base)
        self.cgroups.append(path)
        return path

    def report(self, *args: str) -> dict[str, Any]:
        assert self.recording is not None
        self.recording.stop()
        return report(self.recording.path, "--netns", str(self.ns.inode), *args)

    def close(self) -> None:
        if self.recording is not None:
            self.recording.kill()
        for a in self.actors:
            a.kill()
        self.ns.close()
        for path in self.cgroups:
            try:
                os.rmdir(path)
            except OSError:
                pass


def _cgroup2_mount() -> str | None:
    with open("/proc/self/mounts") as f:
        for line in f:
            dev, mnt, fstype = line.split()[:3]
            if fstype == "cgroup2" and os.access(mnt, os.W_OK):
                return mnt
    return None


@pytest.fixture
def scene(tmp_path: Path, programs: Programs, can_record: None) -> Iterator[Scene]:
    s = Scene(tmp_path, programs)
    try:
        yield s
    finally:
        s.close()


# ---- the findings, one scenario each ---------------------------------------------------


def test_other_uid_tries_to_join_a_reuseport_group(scene: Scene) -> None:
    rec = scene.record()
    owner = scene.actor(uid=UID_A)
    owner.serve("0.0.0.0", 8080, options=("reuseport",))
    rec.wait_snapshot()
    intruder = scene.actor(uid=UID_B)
    fd = intruder.socket(options=("reuseport",))
    assert intruder.bind(fd, "0.0.0.0", 8080) == errno.EADDRINUSE  # the kernel's uid check
    rec.wait_snapshot()

    doc = scene.report()
    assert summary(doc["findings"]) == [("reuseport_other_uid", [intruder.pid], [owner.pid])]
    f = doc["findings"][0]
    assert (f["protocol"], f["port"], f["netns"]) == ("tcp", 8080, scene.ns.inode)
    failed = [e for e in f["evidence"] if e["type"] == "event"]
    assert failed[0]["result"] == "EADDRINUSE" and failed[0]["pid"] == intruder.pid
    assert failed[0]["uid"] == UID_B
    assert any(b["rule"] == "reuseport_other_uid" and owner.pid in b["pids"]
               for b in failed[0]["blockers"])
    held = [e for e in f["evidence"] if e["type"] == "snapshot"]
    assert held and held[0]["uid"] == UID_A and held[0]["owners"][0]["pid"] == owner.pid
    # The refusal is also on the port's timeline, as a conflict.
    assert any(e["what"] == "conflict" and e["pids"] == [intruder.pid] for e in doc["timeline"])


@pytest.mark.parametrize("differs", ["executable", "cgroup"])
def test_foreign_process_joins_a_reuseport_group(scene: Scene, differs: str) -> None:
    rec = scene.record()
    service = scene.actor(uid=UID_A)
    service.serve("0.0.0.0", 8080, options=("reuseport",))
    service.serve("0.0.0.0", 8080, options=("reuseport",))  # a group of two
    rec.wait_snapshot()
    if differs == "executable":
        joiner = scene.actor(exe=scene.programs.impostor, uid=UID_A)
    else:
        joiner = scene.actor(uid=UID_A, cgroup=scene.cgroup())
    joiner.serve("0.0.0.0", 8080, options=("reuseport",))  # same uid: the kernel lets it in
    rec.wait_snapshot()

    doc = scene.report()
    assert summary(doc["findings"]) == [("reuseport_foreign_member", [joiner.pid], [service.pid])]
    f = doc["findings"][0]
    joined = [e for e in f["evidence"] if e["type"] == "event"]
    assert joined[0]["call"] == "listen" and joined[0]["pid"] == joiner.pid
    if differs == "executable":
        assert joined[0]["exe"] == scene.programs.impostor
    groups = {e["group"] for e in f["evidence"] if e["type"] == "snapshot"}
    assert len(groups) == 1 and None not in groups  # one group: the joiner is in the service's


@pytest.mark.parametrize("differs", ["uid", "executable"])
def test_udp_port_shared_across_owners(scene: Scene, differs: str) -> None:
    rec = scene.record()
    first = scene.actor(uid=UID_A)
    first.serve("0.0.0.0", 5353, proto="udp", options=("reuseaddr",))
    rec.wait_snapshot()
    second = (scene.actor(uid=UID_B) if differs == "uid"
              else scene.actor(exe=scene.programs.impostor, uid=UID_A))
    second.serve("0.0.0.0", 5353, proto="udp", options=("reuseaddr",))
    rec.wait_snapshot()

    doc = scene.report()
    assert summary(doc["findings"]) == [("udp_shared", [second.pid], [first.pid])]
    f = doc["findings"][0]
    assert f["protocol"] == "udp" and f["port"] == 5353
    assert [e["pid"] for e in f["evidence"] if e["type"] == "event"] == [second.pid]


def test_port_taken_by_another_executable_after_its_owner_closed_it(scene: Scene) -> None:
    rec = scene.record()
    service = scene.actor(uid=UID_A)
    fd = service.serve("0.0.0.0", 8080)
    rec.wait_snapshot()
    taker = scene.actor(exe=scene.programs.impostor, uid=UID_A)
    tfd = taker.socket()
    service.close(fd)  # the service restarts...
    assert taker.bind(tfd, "0.0.0.0", 8080) == 0  # ...and another program gets there first
    assert taker.listen(tfd) == 0
    rec.wait_snapshot()

    doc = scene.report()
    assert summary(doc["findings"]) == [("restart_race", [taker.pid], [service.pid])]
    calls = [(e["call"], e["pid"]) for e in doc["findings"][0]["evidence"] if e["type"] == "event"]
    assert ("listen_close", service.pid) in calls and ("bind", taker.pid) in calls


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_specific_address_shadows_a_wildcard(scene: Scene, proto: str) -> None:
    options = ("reuseport",) if proto == "tcp" else ("reuseaddr",)
    rec = scene.record()
    service = scene.actor(uid=UID_A)
    service.serve("0.0.0.0", 8053, proto=proto, options=options)
    rec.wait_snapshot()
    shadow = scene.actor(exe=scene.programs.impostor, uid=UID_A)
    shadow.serve("127.0.0.1", 8053, proto=proto, options=options)
    rec.wait_snapshot()

    doc = scene.report()
    assert summary(doc["findings"]) == [("wildcard_shadowed", [shadow.pid], [service.pid])]
    locals_ = [e["local"] for e in doc["findings"][0]["evidence"] if e["type"] == "snapshot"]
    assert locals_ == ["127.0.0.1:8053", "0.0.0.0:8053"]


def test_reuseport_bpf_program_attached(scene: Scene) -> None:
    rec = scene.record()
    a = scene.actor(uid=UID_A)
    a.serve("0.0.0.0", 8080, options=("reuseport",))
    b = scene.actor(uid=UID_A)  # same program, same user: a legitimate member
    bfd = b.serve("0.0.0.0", 8080, options=("reuseport",))
    rec.wait_snapshot()
    b.steer(bfd, 0)  # SO_ATTACH_REUSEPORT_CBPF: every connection to member 0
    rec.wait_snapshot()

    doc = scene.report()
    assert summary(doc["findings"]) == [("reuseport_bpf_attached", sorted([a.pid, b.pid]),
                                         sorted([a.pid, b.pid]))]
    snaps = [e for e in doc["findings"][0]["evidence"] if e["type"] == "snapshot"]
    assert {e["bpf"] for e in snaps} == {False, True}


def test_clean_scenario_has_no_findings(scene: Scene) -> None:
    """The same mechanisms, used by one service: no finding, but the
    conflicts and ownership changes are on the timeline."""
    rec = scene.record()
    svc = scene.programs.service
    # A reuseport group of two processes of one program, user and cgroup.
    a = scene.actor(svc, uid=UID_A)
    a.serve("0.0.0.0", 8080, options=("reuseport",))
    rec.wait_snapshot()
    b = scene.actor(svc, uid=UID_A)
    b.serve("0.0.0.0", 8080, options=("reuseport",))
    # A plain conflict: no SO_REUSEPORT, refused (an operator's mistake, not a hijack).
    c = scene.actor(svc, uid=UID_A)
    assert c.bind(c.socket(), "0.0.0.0", 8080) == errno.EADDRINUSE
    # A UDP reuseport group of one program.
    d = scene.actor(svc, uid=UID_A)
    d.serve("0.0.0.0", 5353, proto="udp", options=("reuseport",))
    rec.wait_snapshot()
    d2 = scene.actor(svc, uid=UID_A)
    d2.serve("0.0.0.0", 5353, proto="udp", options=("reuseport",))
    # A restart: the same program takes its port back at once.
    e = scene.actor(svc, uid=UID_A)
    efd = e.serve("0.0.0.0", 9090)
    rec.wait_snapshot()
    e2 = scene.actor(svc, uid=UID_A)
    e2fd = e2.socket()
    e.close(efd)
    assert e2.bind(e2fd, "0.0.0.0", 9090) == 0 and e2.listen(e2fd) == 0
    # One process on the wildcard and on a specific address of the same port.
    f = scene.actor(svc, uid=UID_A)
    f.serve("0.0.0.0", 7070, options=("reuseport",))
    f.serve("127.0.0.1", 7070, options=("reuseport",))
    rec.wait_snapshot()

    doc = scene.report()
    assert doc["findings"] == []
    whats = {(e["port"], e["what"]) for e in doc["timeline"]}
    assert {(8080, "listening"), (8080, "conflict"), (9090, "closed"), (9090, "bound"),
            (5353, "bound"), (7070, "listening")} <= whats


def test_the_journal_and_report_carry_each_failures_explanation(scene: Scene) -> None:
    """What trace says of a failure, record keeps and report shows: the
    reason of a refusal before the port, and the blocker of a conflict, named
    even when it closed at once after the failure."""
    rec = scene.record()
    unprivileged = scene.actor(uid=UID_A)
    assert unprivileged.bind(unprivileged.socket(), "0.0.0.0", 80) == errno.EACCES
    holder = scene.actor(uid=UID_A)
    fd = holder.serve("0.0.0.0", 8090)
    late = scene.actor(uid=UID_A)
    assert late.bind(late.socket(), "0.0.0.0", 8090) == errno.EADDRINUSE
    holder.close(fd)  # gone a moment after the failure
    rec.wait_snapshot()

    doc = scene.report()
    conflicts = {e["result"]: e for e in doc["timeline"] if e["what"] == "conflict"}
    refused = conflicts["EACCES"]
    assert refused["reason"]["rule"] == "privileged_port"
    assert refused["explanation"]["fixes"] and refused["pids"] == [unprivileged.pid]
    taken = conflicts["EADDRINUSE"]
    (b,) = taken["blockers"]
    assert b["pids"] == [holder.pid] and b["held"] in ("owners", "gone")
    assert taken["reason"]["rule"] == "conflict"
    out = subprocess.run([sys.executable, "-m", "tracer.cli", "report", str(rec.path),
                          "--netns", str(scene.ns.inode)], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "why: port 80 is below net.ipv4.ip_unprivileged_port_start" in out.stdout
    assert f"[{holder.pid}] (listener" in out.stdout


def test_human_report_and_since(scene: Scene) -> None:
    rec = scene.record()
    owner = scene.actor(uid=UID_A)
    owner.serve("0.0.0.0", 8080, options=("reuseport",))
    rec.wait_snapshot()
    intruder = scene.actor(uid=UID_B)
    assert intruder.bind(intruder.socket(options=("reuseport",)), "0.0.0.0", 8080) == errno.EADDRINUSE
    rec.wait_snapshot()
    rec.stop()
    out = subprocess.run([sys.executable, "-m", "tracer.cli", "report", str(rec.path),
                          "--netns", str(scene.ns.inode)], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "1 finding:" in out.stdout and "reuseport_other_uid" in out.stdout
    assert f"pid {intruder.pid}" in out.stdout and "evidence:" in out.stdout
    assert "timeline:" in out.stdout and "conflict" in out.stdout
    # Everything happened more than 0 seconds ago, and nothing in the future.
    assert report(rec.path, "--netns", str(scene.ns.inode), "--since", "1h")["findings"]
    future = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() + 3600))
    later = report(rec.path, "--netns", str(scene.ns.inode), "--since", future)
    assert later["findings"] == [] and later["timeline"] == []


# ---- crashes --------------------------------------------------------------------------

STORM = r'''
import socket, sys, time
rate, duration, log = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
hold = socket.socket(); hold.bind(("127.0.0.1", 1000)); hold.listen()
out = open(log, "w", buffering=1)
n, port, start = 0, 2000, time.time()
out.write(f"{start} 0\n")
last = start
while time.time() - start < duration:
    s = socket.socket()
    if n % 10 == 9:
        target = 1000  # refused: EADDRINUSE, explained on the spot
    else:
        port = port + 1 if port < 60000 else 2000
        target = port
    try:
        s.bind(("127.0.0.1", target))
    except OSError:
        pass
    s.close()
    n += 1
    now = time.time()
    if now - last >= 0.01:
        out.write(f"{now} {n}\n")
        last = now
    ahead = n / rate - (now - start)
    if ahead > 0:
        time.sleep(ahead)
out.write(f"{time.time()} {n}\n")
'''


def _storm_counts(log: Path) -> list[tuple[float, int]]:
    rows = []
    for line in log.read_text().splitlines():
        t, n = line.split()
        rows.append((float(t), int(n)))
    return rows


def _integrity(path: Path) -> str:
    conn = sqlite3.connect(str(path))  # read-write: recovers the WAL like any reopening
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


def test_kill_9_during_bind_storm_loses_at_most_the_last_second(scene: Scene) -> None:
    rec = scene.record()
    storm_py = Path(scene.programs.dir) / "storm.py"
    storm_py.write_text(STORM)
    log = scene.tmp / "storm.log"
    storm = subprocess.Popen(["ip", "netns", "exec", scene.ns.name, sys.executable, str(storm_py),
                              "4000", "6", str(log)])
    try:
        time.sleep(3.0)  # the storm is well under way
        killed_at = time.time()
        rec.proc.send_signal(signal.SIGKILL)
        rec.proc.wait()
        dead_at = time.time()
    finally:
        storm.wait(30)
    counts = _storm_counts(log)
    performed_before = max(n for t, n in counts if t <= killed_at - 1.0)
    performed_by_death = min(n for t, n in counts if t >= dead_at)
    assert performed_before > 5000  # a storm indeed

    assert _integrity(rec.path) == "ok"
    recorded = rec.query("SELECT count(*) FROM events WHERE netns = ? AND call = 'bind' AND port != 1000 "
                         "OR netns = ? AND call = 'bind' AND port = 1000 AND errno != 0",
                         scene.ns.inode, scene.ns.inode)[0][0]
    assert performed_before <= recorded <= performed_by_death, (
        f"{recorded} binds recorded; {performed_before} performed up to 1 s before the kill, "
        f"{performed_by_death} by the recorder's death")
    times = rec.query("SELECT max(time) FROM events WHERE netns = ?", scene.ns.inode)[0][0]
    assert times <= dead_at

    # It reopens: the report reads it, and a new recorder appends to it.
    doc = report(rec.path, "--netns", str(scene.ns.inode))
    assert doc["journal"]["sessions"][0]["ended"] is None
    again = scene.record(name="journal.db")
    again.stop()
    assert _integrity(rec.path) == "ok"
    doc = report(rec.path, "--netns", str(scene.ns.inode))
    assert len(doc["journal"]["sessions"]) == 2
    assert any("stopped uncleanly" in n for n in doc["journal"]["notes"])
    assert {e["what"] for e in doc["timeline"]} >= {"conflict"}


def test_kill_9_at_random_moments_with_rotation_never_corrupts(scene: Scene) -> None:
    """Rotation on (a small --max-size), the recorder killed over and over at
    arbitrary moments of a storm: the file is always intact and bounded."""
    import random

    storm_py = Path(scene.programs.dir) / "storm.py"
    storm_py.write_text(STORM)
    storm = subprocess.Popen(["ip", "netns", "exec", scene.ns.name, sys.executable, str(storm_py),
                              "4000", "30", str(scene.tmp / "storm.log")])
    path = scene.tmp / "bounded.db"
    max_size = 2 << 20
    try:
        for round_ in range(4):
            rec = scene.record("--max-size", str(max_size), "--retain", "1h", name="bounded.db")
            time.sleep(random.uniform(0.5, 3.0))
            rec.kill()
            assert _integrity(path) == "ok", f"round {round_}"
            pages, free, size = (rec.query(f"PRAGMA {p}")[0][0]
                                 for p in ("page_count", "freelist_count", "page_size"))
            # Rotation runs a slice at a time, four times a second: allow for
            # what a storm adds meanwhile.
            assert pages * size < 2 * max_size, f"round {round_}: {pages} pages, {free} free"
    finally:
        storm.kill()
        storm.wait()
    rec = scene.record("--max-size", str(max_size), name="bounded.db")
    time.sleep(3)
    rec.stop()
    assert _integrity(path) == "ok"
    sessions = rec.query("SELECT count(*) FROM sessions")[0][0]
    assert sessions >= 1
    assert path.stat().st_size <= max_size * 1.2
