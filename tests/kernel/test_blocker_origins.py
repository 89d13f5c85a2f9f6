"""Blockers no process holds, named for what they are, against the kernel.

* A TIME_WAIT socket left by a server that closed first, while a collector
  recorded closes: ``why`` names the process that left it (pid, name,
  command line, read in the kernel at the close) after that process exited.
* A server that closes while its client keeps the connection leaves its side
  FIN_WAIT2 on the timewait timer, held by no process: ``why`` says so (not
  "a process portscope cannot see"), names the client that holds the other
  end in CLOSE_WAIT, and the bind really fails until that socket is gone.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from harness import Actor, EventCollector, Netns, expect_outcome

from tracer.explain import Request, explain

PORT = 7100
REPO = Path(__file__).resolve().parents[2]


def _conn(actor: Actor, port: int) -> tuple[int, int, int]:
    lst = actor.socket("tcp")
    expect_outcome(actor.bind(lst, "127.0.0.1", port), 0)
    expect_outcome(actor.listen(lst), 0)
    cli = actor.socket("tcp")
    expect_outcome(actor.connect(cli, "127.0.0.1", port), 0)
    return lst, cli, actor.accept(lst)


def test_who_left_a_time_wait_socket(netns: Netns, tracer: EventCollector) -> None:
    # The session's tracer is a running collector: it records the close.
    server = Actor(netns)
    lst, cli, conn = _conn(server, PORT)
    server.close(lst)
    server.close(conn)  # the server closes first: TIME_WAIT on its port
    server.close(cli)
    server.wait_tcp_states(PORT, lambda st: st == ["TIME_WAIT"])
    pid = server.pid
    server.exit()  # the process is gone; what it left stays
    ex = explain(Request(port=PORT, addr="127.0.0.1"), netns=str(netns.inode))
    assert ex.verdict == "conflict"
    (b,) = ex.to_json()["blockers"]
    assert b["state"] == "TIME_WAIT" and b["held"] == "time_wait" and not b["owners"]
    closer = b["closed_by"]
    assert closer is not None and closer["pid"] == pid
    with open(f"/proc/{os.getpid()}/cmdline", "rb") as f:  # the actor is a fork of this process
        argv0 = f.read().split(b"\0")[0].decode()
    assert closer["cmdline"] and closer["cmdline"].startswith(argv0)
    assert not [n for n in ex.notes if n.kind == "closer_unknown"]
    # `ports` names who left it too.
    out = subprocess.run([sys.executable, "-m", "tracer.cli", "ports", str(PORT), "--netns",
                          str(netns.inode), "--json"], capture_output=True, text=True, check=True,
                         timeout=60, cwd=REPO).stdout
    (tw,) = [s for s in json.loads(out)["sockets"] if s["state"] == "TIME_WAIT"]
    assert tw["owners"] == [] and tw["closed_by"]["pid"] == pid


def _ss_timer(netns: Netns, port: int) -> str | None:
    """The timer ss shows on the FIN_WAIT2 socket on local ``port``."""
    out = subprocess.run(["ip", "netns", "exec", netns.name, "ss", "-tanoH", "state", "fin-wait-2"],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    for line in out.splitlines():
        if f":{port} " in line:
            found = re.search(r"timer:\((\w+),", line)
            return found.group(1) if found else None
    return None


def test_an_orphaned_fin_wait2_socket_is_said_to_be_one(netns: Netns) -> None:
    server, client = Actor(netns), Actor(netns)
    lst = server.socket("tcp")
    expect_outcome(server.bind(lst, "127.0.0.1", PORT), 0)
    expect_outcome(server.listen(lst), 0)
    cli = client.socket("tcp")
    expect_outcome(client.connect(cli, "127.0.0.1", PORT), 0)
    server.accept(lst)
    server.exit()  # the server dies; its client keeps the connection open
    client.wait_tcp_states(PORT, lambda st: st == ["FIN_WAIT2"])
    ex = explain(Request(port=PORT, addr="127.0.0.1"), netns=str(netns.inode))
    (b,) = ex.to_json()["blockers"]
    # The kernel builds one of two things here. Usually the orphan becomes a
    # TIME_WAIT minisocket in its FIN_WAIT2 substate (timewait timer), which
    # the bind rules treat as TIME_WAIT. If the peer's ACK arrives while the
    # dying process's close() still holds the socket lock, it stays a full
    # orphaned socket on the keepalive timer (tcp_rcv_state_process), bound
    # by the plain reuse rule. ss, not portscope, says which one this is.
    timer = _ss_timer(netns, PORT)
    expected = ("time_wait", "time_wait") if timer == "timewait" else ("orphan", "no_reuse")
    assert timer in ("timewait", "keepalive"), timer
    assert (b["state"], b["held"], b["rule"]) == ("FIN_WAIT2", *expected), timer
    assert not [n for n in ex.notes if n.kind == "hidden_owner"]
    (note,) = [n for n in ex.notes if n.kind in ("orphan", "closed_on_this_side")]
    peer = note.params["peer"]
    assert peer["state"] == "CLOSE_WAIT" and peer["pids"] == [client.pid]  # type: ignore[index]
    assert "wait" in {f.kind for f in ex.fixes}
    new = Actor(netns)
    t = new.bind(new.socket("tcp"), "127.0.0.1", PORT)
    assert t.errno == errno.EADDRINUSE, t.describe()  # the kernel agrees: it blocks
    # Destroying it is offered exactly where the kernel does it (6.1 does,
    # 5.10 keeps the socket); where it does not, a note says so.
    subprocess.run(["ip", "netns", "exec", netns.name, "ss", "-K", "-tna",
                    f"( sport = :{PORT} )"], check=True, capture_output=True, timeout=30)
    destroyed = _ss_timer(netns, PORT) is None
    assert ("destroy_socket" in {f.kind for f in ex.fixes}) == destroyed, timer
    assert ("destroy_keeps" in {n.kind for n in ex.notes}) != destroyed, ex.notes
