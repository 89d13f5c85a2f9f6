"""tracer.netprogs against the kernel: the programs that decide where traffic
goes, attached for real (tests/kernel/steering.py), found, test-run, and
checked against what the kernel then does with a real connection or
datagram.

* sk_lookup (private namespaces): a program steering port P to a listener
  on Q is found with its namespace, name, tag and link; its test run
  selects exactly the listener sock_diag reports (by cookie), selects
  nothing on another port; and a real connection to P is accepted by Q.
  The same for UDP, for a program that drops, and for two programs in one
  namespace, where combine() must give what the kernel did. The test runs
  are made from portscope's own namespace: no namespace entry is needed.
* cgroup connect4: a program in a test cgroup is found at that cgroup's
  path; a process in it connecting to port A reaches port B.

Where the kernel cannot test-run sk_lookup programs (before 5.13, and 5.10
before 5.10.136), run_sk_lookup must answer "unknown" with the reason.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
from harness import Actor, Netns
from steering import (
    REWRITE_NAME,
    STEER_NAME,
    attach_connect_rewrite,
    attach_steer,
    cgroup_dir,
    listener,
    ns_socket,
)

from tests.needs import SLOWDOWN, need_tool
from tracer import netprogs, sockdiag

REMOTE = ("127.0.0.1", 40000)


def test_run_works() -> bool:
    """Whether this kernel can BPF_PROG_TEST_RUN sk_lookup programs: upstream
    from 5.13 (7c32e8f8bc33), backported to 5.10.136. Debian's release
    (5.10.0-32-amd64) hides the sublevel; its version string has it."""
    rel = os.uname().release
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", rel)
    assert m, rel
    major, minor = int(m.group(1)), int(m.group(2))
    if (major, minor) >= (5, 13):
        return True
    if (major, minor) == (5, 10):
        deb = re.search(r"Debian 5\.10\.(\d+)", os.uname().version)
        sub = int(deb.group(1)) if deb else int(m.group(3) or 0)
        return sub >= 136
    return False


test_run_works.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test
TEST_RUN = test_run_works()


def _cookie(ns: Netns, protocol: str, port: int) -> int:
    fd = os.open(ns.path, os.O_RDONLY)
    try:
        (rec,) = [r for r in sockdiag.dump(fd, (protocol,), ("ipv4",)) if r.local_port == port
                  and r.state in ("LISTEN", "CLOSE")]
    finally:
        os.close(fd)
    return rec.cookie


def _found(ns: Netns) -> list[netprogs.NetProgram]:
    scan = netprogs.sk_lookup_programs(ns.inode)
    assert scan.supported and not scan.problems, scan
    return scan.programs


def _run(p: netprogs.NetProgram, port: int, protocol: str = "tcp") -> netprogs.LookupRun:
    return netprogs.run_sk_lookup(p, protocol, "ipv4", REMOTE, ("127.0.0.1", port))


def _expect(run: netprogs.LookupRun, verdict: str, cookie: int | None) -> None:
    if TEST_RUN:
        assert (run.verdict, run.cookie, run.why) == (verdict, cookie, ""), run
    else:
        assert (run.verdict, run.cookie, run.why) == ("unknown", None, netprogs.NO_TEST_RUN), run


def _connect(ns: Netns, port: int) -> socket.socket:
    c = ns_socket(ns.path)
    c.settimeout(5.0 * SLOWDOWN)
    c.connect(("127.0.0.1", port))
    return c


def test_a_clean_namespace_lists_no_program(netns: Netns) -> None:
    assert _found(netns) == []
    assert netprogs.sk_lookup_programs().supported


def test_tcp_steering_found_run_and_real(netns: Netns) -> None:
    p_port, q_port = 7101, 7102
    q = listener(netns.path, q_port)
    with attach_steer(netns.path, p_port, q.fileno()) as steer:
        (found,) = _found(netns)
        assert found == netprogs.NetProgram("sk_lookup", steer.prog_id, STEER_NAME, steer.tag,
                                            netns.inode, None, steer.link_id, 0)
        assert re.fullmatch(r"[0-9a-f]{16}", found.tag)
        # Every namespace's programs: this one is among them, once.
        assert [p for p in netprogs.sk_lookup_programs().programs
                if p.netns == netns.inode] == [found]
        _expect(_run(found, p_port), "pass", _cookie(netns, "tcp", q_port))
        _expect(_run(found, 7103), "pass", None)
        _expect(_run(found, p_port, "udp"), "pass", None)  # TCP only
        if TEST_RUN:  # the kernel's test run takes no interface: run without, and say so
            r = netprogs.run_sk_lookup(found, "tcp", "ipv4", REMOTE, ("127.0.0.1", p_port), 1)
            assert (r.verdict, r.cookie, r.why) == ("pass", _cookie(netns, "tcp", q_port),
                                                    netprogs.NO_IFINDEX)
        c = _connect(netns, p_port)  # the kernel agrees: Q accepts a connection to P
        a, peer = q.accept()
        assert a.getsockname() == ("127.0.0.1", p_port) and peer == c.getsockname()
        a.close()
        c.close()
    assert _found(netns) == []  # detached with its link
    gone = netprogs.run_sk_lookup(found, "tcp", "ipv4", REMOTE, ("127.0.0.1", p_port))
    assert (gone.verdict, gone.cookie, gone.why) == ("unknown", None, netprogs.GONE)
    q.close()


def test_udp_steering(netns: Netns) -> None:
    p_port, q_port = 7201, 7202
    q = listener(netns.path, q_port, "udp")
    with attach_steer(netns.path, p_port, q.fileno(), protocol="udp") as steer:
        (found,) = _found(netns)
        assert (found.prog_id, found.link_id) == (steer.prog_id, steer.link_id)
        _expect(_run(found, p_port, "udp"), "pass", _cookie(netns, "udp", q_port))
        _expect(_run(found, p_port, "tcp"), "pass", None)
        s = ns_socket(netns.path, "udp")
        s.sendto(b"steered", ("127.0.0.1", p_port))
        data, peer = q.recvfrom(64)
        assert data == b"steered" and peer[1] == s.getsockname()[1]
        s.close()
    q.close()


def test_drop_and_a_selection_beats_it(netns: Netns) -> None:
    """One program drops port P; a connection to P is refused although a
    listener is there. A second program then selects Q for P: the kernel
    lets the selection win over the drop, as combine() says."""
    p_port, q_port = 7301, 7302
    on_p = listener(netns.path, p_port)
    q = listener(netns.path, q_port)
    with attach_steer(netns.path, p_port, None, drop=True) as dropper:
        (found,) = _found(netns)
        _expect(_run(found, p_port), "drop", None)
        _expect(_run(found, q_port), "pass", None)
        out = netprogs.combine([_run(found, p_port)])
        if TEST_RUN:
            assert (out.verdict, out.cookie, out.decided_by) == ("drop", None, found)
        else:
            assert out.verdict == "unknown"
        with pytest.raises(ConnectionRefusedError):
            _connect(netns, p_port)
        with attach_steer(netns.path, p_port, q.fileno()) as steer:
            first, second = _found(netns)
            assert (first.prog_id, first.order, second.prog_id, second.order) == (
                dropper.prog_id, 0, steer.prog_id, 1)
            out = netprogs.combine([_run(first, p_port), _run(second, p_port)])
            if TEST_RUN:
                assert (out.verdict, out.cookie, out.decided_by) == (
                    "pass", _cookie(netns, "tcp", q_port), second)
            else:
                assert (out.verdict, out.cookie, out.decided_by) == ("unknown", None, None)
            c = _connect(netns, p_port)
            a, _ = q.accept()
            assert a.getsockname() == ("127.0.0.1", p_port)
            a.close()
            c.close()
    on_p.close()
    q.close()


def test_two_programs_the_last_selection_wins(netns: Netns) -> None:
    p_port, q1_port, q2_port = 7401, 7402, 7403
    q1, q2 = listener(netns.path, q1_port), listener(netns.path, q2_port)
    with attach_steer(netns.path, p_port, q1.fileno()) as one, \
            attach_steer(netns.path, p_port, q2.fileno()) as two:
        first, second = _found(netns)
        assert [(p.prog_id, p.link_id, p.order) for p in (first, second)] == [
            (one.prog_id, one.link_id, 0), (two.prog_id, two.link_id, 1)]
        assert first.tag == second.tag and first.prog_id != second.prog_id  # same code twice
        out = netprogs.combine([_run(first, p_port), _run(second, p_port)])
        if TEST_RUN:
            assert (out.verdict, out.cookie, out.decided_by) == (
                "pass", _cookie(netns, "tcp", q2_port), second)
        else:
            assert out.verdict == "unknown"
        c = _connect(netns, p_port)  # the kernel agrees: the second program's choice
        a, _ = q2.accept()
        a.close()
        c.close()
        q1.setblocking(False)
        with pytest.raises(BlockingIOError):
            q1.accept()
    q1.close()
    q2.close()


@pytest.fixture
def test_cgroup(root: None) -> Iterator[str]:
    path = f"/portscope-t-netprogs-{os.getpid()}"
    d = cgroup_dir(path)
    os.mkdir(d)
    try:
        yield path
    finally:
        for _ in range(100):  # the killed actor leaves the cgroup as it is reaped
            try:
                os.rmdir(d)
                break
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise
                time.sleep(0.05)


def test_connect4_rewrite_found_and_real(netns: Netns, test_cgroup: str) -> None:
    a_port, b_port = 7501, 7502
    b = listener(netns.path, b_port)
    assert [p for p in netprogs.sock_addr_programs().programs if p.cgroup == test_cgroup] == []
    with attach_connect_rewrite(test_cgroup, a_port, b_port) as rw:
        scan = netprogs.sock_addr_programs()
        assert not scan.problems, scan
        mine = [p for p in scan.programs if p.cgroup == test_cgroup]
        assert mine == [netprogs.NetProgram("connect4", rw.prog_id, REWRITE_NAME, rw.tag, None,
                                            test_cgroup, rw.link_id, 0)]
        only = netprogs.sock_addr_programs(["connect6", "bind4"]).programs
        assert not [p for p in only if p.cgroup == test_cgroup]
        actor = Actor(netns)
        try:
            with open(os.path.join(cgroup_dir(test_cgroup), "cgroup.procs"), "w") as f:
                f.write(str(actor.pid))
            t = actor.connect(actor.socket("tcp"), "127.0.0.1", a_port)
            assert t.errno == 0, t.describe()  # nothing listens on A: B answered
            conn, _ = b.accept()
            assert conn.getsockname() == ("127.0.0.1", b_port)
            conn.close()
        finally:
            actor.kill()
    b.close()


_UNPRIVILEGED = """
import json, sys
from tracer import netprogs
a, b = netprogs.sk_lookup_programs(), netprogs.sock_addr_programs()
r = netprogs.run_sk_lookup(netprogs.NetProgram.from_json(json.loads(sys.argv[1])), "tcp", "ipv4",
                           ("127.0.0.1", 40000), ("127.0.0.1", 7601))
print(json.dumps({"links": [a.programs, a.problems, a.supported], "cgroups": [b.programs, b.problems],
                  "run": [r.verdict, r.cookie, r.why]}))
"""


def test_without_privilege_the_answer_says_so(netns: Netns) -> None:
    """As a user without CAP_SYS_ADMIN (nobody): no program, the reason in
    ``problems``, an "unknown" run with the reason; never a traceback."""
    setpriv = need_tool("setpriv")
    q = listener(netns.path, 7602)
    with attach_steer(netns.path, 7601, q.fileno()):
        (found,) = _found(netns)
        r = subprocess.run([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups",
                            sys.executable, "-c", _UNPRIVILEGED, json.dumps(found.to_json())],
                           cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True,
                           timeout=60)
    q.close()
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["links"] == [[], [["bpf links", "Operation not permitted"]], True]
    assert doc["cgroups"][0] == [] and ["bpf links", "Operation not permitted"] in doc["cgroups"][1]
    assert doc["run"] == ["unknown", None, "cannot open the program: Operation not permitted"]


def test_a_reuseport_selection_is_unknown(netns: Netns) -> None:
    """A program that selects a socket of a SO_REUSEPORT group leaves the
    choice of the member to the kernel, which a test run refuses to make
    (EOPNOTSUPP): unknown, with the reason. The kernel still delivers."""
    q = ns_socket(netns.path)
    q.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    q.bind(("127.0.0.1", 7702))
    q.listen(4)
    q.settimeout(5.0 * SLOWDOWN)
    with attach_steer(netns.path, 7701, q.fileno()):
        (found,) = _found(netns)
        run = _run(found, 7701)
        if TEST_RUN:
            assert (run.verdict, run.cookie, run.why) == ("unknown", None, netprogs.REUSEPORT)
        else:
            assert (run.verdict, run.why) == ("unknown", netprogs.NO_TEST_RUN)
        c = _connect(netns, 7701)
        a, _ = q.accept()
        a.close()
        c.close()
    q.close()
