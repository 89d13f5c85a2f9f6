"""`portscope ports` and `portscope why` as a user runs them, against sockets
made for real in a private namespace: owners (including a forked child
sharing a socket), flags, queues, timers, verdicts and exit codes."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

from harness import Actor, Netns

from tracer.owners import OwnerCache

REPO = Path(__file__).resolve().parents[2]


def portscope(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tracer.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def ports_json(*args: str) -> list[dict]:
    result = portscope("ports", "--json", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["sockets"]


def test_ports_shows_every_holder_flags_and_queues(netns: Netns) -> None:
    a, client = Actor(netns), Actor(netns)
    port = random.randint(20000, 29999)
    lfd = a.socket("tcp", reuseport=True)
    bound = a.bind(lfd, "127.0.0.1", port)
    a.listen(lfd, backlog=7)
    keeper = a.fork_keep([lfd])  # parent and child now share the listener
    for _ in range(2):  # two connections left in the accept queue
        client.connect(client.socket("tcp"), "127.0.0.1", port)

    sockets = ports_json(str(port), "--netns", netns.name, "--tcp")
    listeners = [s for s in sockets if s["state"] == "LISTEN"]
    assert len(listeners) == 1, sockets
    lst = listeners[0]
    assert lst["inode"] == bound.inode and lst["netns"] == netns.inode
    assert sorted(o["pid"] for o in lst["owners"]) == sorted([a.pid, keeper])
    assert lst["options"] == ["reuseport"] and lst["reuseport_group_size"] == 1
    assert (lst["recv_q"], lst["send_q"]) == (2, 7), "accept-queue depth / backlog"
    unaccepted = [s for s in sockets if s["state"] == "ESTABLISHED" and s["local"].endswith(f":{port}")]
    assert len(unaccepted) == 2 and all(not s["owners"] for s in unaccepted)


def test_ports_time_wait_has_its_timer(netns: Netns) -> None:
    server, client = Actor(netns), Actor(netns)
    port = random.randint(20000, 29999)
    lfd = server.socket("tcp")
    server.bind(lfd, "127.0.0.1", port)
    server.listen(lfd)
    cfd = client.socket("tcp")
    client.connect(cfd, "127.0.0.1", port)
    server.close(server.accept(lfd))
    client.close(cfd)
    server.wait_tcp_states(port, lambda states: "TIME_WAIT" in states)

    tw = [s for s in ports_json(str(port), "--netns", netns.name, "--state", "time_wait")]
    assert len(tw) == 1 and tw[0]["timer"] == "timewait"
    assert 0 < tw[0]["timer_ms"] <= 60000


def test_why_names_blocker_and_exit_codes(netns: Netns) -> None:
    a = Actor(netns)
    port = random.randint(20000, 29999)
    lfd = a.socket("tcp")
    a.bind(lfd, "0.0.0.0", port)
    a.listen(lfd)

    busy = portscope("why", str(port), "--addr", "127.0.0.1", "--netns", netns.name, "--json")
    assert busy.returncode == 5, busy.stderr
    answer = json.loads(busy.stdout)
    assert answer["verdict"] == "conflict"
    assert [b["pids"] for b in answer["blockers"]] == [[a.pid]]
    assert answer["blockers"][0]["rule"] == "listener"
    assert answer["blockers"][0]["overlap"] == "wildcard"

    free = portscope("why", str(port + 1), "--netns", netns.name, "--json")
    assert free.returncode == 0 and json.loads(free.stdout)["verdict"] == "free"

    human = portscope("why", str(port), "--netns", netns.name)
    assert "would FAIL with EADDRINUSE" in human.stdout and f"[{a.pid}]" in human.stdout


def test_bad_inputs_are_one_sentence() -> None:
    for args, words in [(("why", "99999"), "invalid port"),
                        (("why", "80", "--addr", "not-an-ip"), "invalid address"),
                        (("why", "80", "--user", "no-such-user-xyz"), "no user named"),
                        (("why", "80", "--netns", "no-such-netns-xyz"), "no network namespace"),
                        (("why", "80", "--device", "nodev0"), "no network device")]:
        result = portscope(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert words in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_vanished_process_is_neither_raised_nor_counted() -> None:
    """A process that exited since its socket was seen is not a gap worth a
    note (its socket went with it, or another holder has it): it is kept
    with the name the iterator read, marked gone, and not counted as
    unreadable."""
    proc = subprocess.Popen(["true"])
    proc.wait()  # reaped: its pid is gone
    cache = OwnerCache()
    owner = cache.get(proc.pid, "true")
    assert not owner.readable and owner.comm == "true" and owner.problem == "gone"
    assert cache.unreadable == 0
    assert cache.get(os.getpid(), "x").readable


def test_a_socket_bound_while_the_inventory_is_taken_keeps_its_owner(netns: Netns) -> None:
    """The inventory reads sockets (sock_diag) and who holds them (the
    iter/task_file walk) one after the other. A socket bound between the
    two must not appear without its owner (it once did, when the walk came
    first: the journal then reported a UDP port shared by no known process).
    Here a real process binds right after the first of the two reads; every
    socket the inventory then shows on the port names that process."""
    from tracer import inventory
    from tracer.sockflags import SharedIterators

    actor = Actor(netns)
    port = random.randint(20000, 29999)
    fds = [actor.socket("udp", reuseaddr=True) for _ in range(2)]
    assert actor.bind(fds[0], "0.0.0.0", port).errno == 0
    bound_late = []

    def bind_after(read):  # type: ignore[no-untyped-def]
        def wrapped(*args, **kwargs):  # type: ignore[no-untyped-def]
            out = read(*args, **kwargs)
            if not bound_late:
                bound_late.append(actor.bind(fds[1], "0.0.0.0", port))
            return out
        return wrapped

    its = SharedIterators()
    original_dump = inventory.dump_in
    its.holders = bind_after(its.holders)  # type: ignore[method-assign]
    inventory.dump_in = bind_after(original_dump)  # type: ignore[assignment]
    try:
        taken = inventory.take(port=port, protocols=("udp",), netns=str(netns.inode),
                               iterators=its)
    finally:
        inventory.dump_in = original_dump  # type: ignore[assignment]
        its.close()
    assert bound_late and bound_late[0].errno == 0  # SO_REUSEADDR on both: shared
    assert taken.sockets, "the first socket was bound before the inventory began"
    for sock in taken.sockets:
        assert [o.pid for o in sock.owners] == [actor.pid], sock


def test_flags_come_from_holders_and_the_tables_are_walked_only_for_sockets_nobody_holds(
        netns: Netns) -> None:
    """A held socket's flags are read through its holder (iter/task_file);
    the walk of the host's socket tables runs only when the dump found
    sockets no process holds (TIME_WAIT here), and then gives theirs. The
    two readings of a held socket are the same, field by field."""
    from tracer import inventory
    from tracer.sockflags import SharedIterators

    a, b = Actor(netns), Actor(netns)
    port = random.randint(20000, 29999)
    for actor in (a, a, b):
        fd = actor.socket("tcp", reuseport=True)
        assert actor.bind(fd, "127.0.0.1", port).ok
        assert actor.listen(fd).ok
    udp = a.socket("udp", "ipv6", v6only=True, bindtodevice="lo", reuseaddr=True)
    assert a.bind(udp, "::1", port).ok
    tw_port = port + 1  # a connection whose server side closed first: TIME_WAIT
    listener = b.socket("tcp", reuseaddr=True)
    assert b.bind(listener, "127.0.0.1", tw_port).ok and b.listen(listener).ok
    client = a.socket("tcp")
    assert a.connect(client, "127.0.0.1", tw_port).ok
    b.close(b.accept(listener))
    a.close(client)
    b.wait_tcp_states(tw_port, lambda states: "TIME_WAIT" in states)

    its = SharedIterators()
    walks: list[int | None] = []
    walk = its.sockets

    def counted(netns_fd=None, port=None, cookies=None):  # type: ignore[no-untyped-def]
        walks.append(port)
        return walk(netns_fd, port, cookies)

    its.sockets = counted  # type: ignore[method-assign]
    try:
        held = inventory.take(port=port, netns=str(netns.inode), iterators=its)
        assert walks == [], "every socket on the port is held: no walk"
        with_tw = inventory.take(port=tw_port, netns=str(netns.inode), iterators=its)
        assert walks == [tw_port], "a TIME_WAIT socket on the port: one walk"
        fd = os.open(netns.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            walked = {f.cookie: f for f in walk(fd, port)}
        finally:
            os.close(fd)
    finally:
        its.close()
    assert len(held.sockets) == 4 and held.flags_unknown == 0
    for sock in held.sockets:
        assert sock.owners and sock.flags == walked[sock.diag.cookie], sock
    groups = {s.flags.group for s in held.sockets if s.diag.protocol == "tcp"}  # type: ignore[union-attr]
    assert len(groups) == 1 and 0 not in groups
    tw = [s for s in with_tw.sockets if s.diag.state == "TIME_WAIT"]
    assert tw and with_tw.flags_unknown == 0
    assert all(s.flags and s.flags.options == frozenset({"reuseaddr"}) for s in tw)


def test_a_udp_inventory_has_no_tcp_socket_in_it(netns: Netns) -> None:
    """Bound-only TCP sockets, rebuilt from their holders on kernels that do
    not dump them, belong to a TCP inventory only."""
    from tracer import inventory

    actor = Actor(netns)
    port = random.randint(20000, 29999)
    assert actor.bind(actor.socket("tcp"), "127.0.0.1", port).ok  # bound, never listening
    assert actor.bind(actor.socket("udp"), "127.0.0.1", port).ok
    udp = inventory.take(port=port, protocols=("udp",), netns=str(netns.inode))
    tcp = inventory.take(port=port, protocols=("tcp",), netns=str(netns.inode))
    assert [s.diag.protocol for s in udp.sockets] == ["udp"]
    assert [(s.diag.protocol, s.diag.state) for s in tcp.sockets] == [("tcp", "CLOSE")]


# A listener, and CROWD connections to it that its side closed first: the
# crowd is left in TIME_WAIT on the listener's port (the server's end of a
# connection ends in TIME_WAIT when it closes first).
CROWD = 150
CROWD_MAKER = """
import socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
listener = socket.socket()
listener.bind(("127.0.0.1", port))
listener.listen(n)
for _ in range(n):
    client = socket.create_connection(("127.0.0.1", port))
    served, _ = listener.accept()
    served.close()
    client.close()
print("ready", flush=True)
sys.stdin.read()
"""


def test_why_on_a_crowded_port_describes_the_first_and_counts_all(netns: Netns) -> None:
    port = random.randint(20000, 29999)
    maker = subprocess.Popen(["ip", "netns", "exec", netns.name, sys.executable, "-c", CROWD_MAKER,
                              str(port), str(CROWD)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert maker.stdout is not None and maker.stdout.readline().strip() == "ready"
        # The kernel's own count of what holds the port (ss, not portscope).
        ss = subprocess.run(["ip", "netns", "exec", netns.name, "ss", "-tanH", "state", "time-wait",
                             "sport", "=", f":{port}"], capture_output=True, text=True, check=True)
        time_waits = len(ss.stdout.splitlines())
        assert time_waits == CROWD, ss.stdout

        default = portscope("why", str(port), "--netns", netns.name, "--json")
        assert default.returncode == 5, default.stderr
        doc = json.loads(default.stdout)
        assert doc["blockers_total"] == CROWD + 1
        assert len(doc["blockers"]) == 100, "the first 100 are described one by one"
        # The one a process holds comes first; the TIME_WAIT sockets after it,
        # the one that holds the port longest first.
        # (ip netns exec execs the maker: its pid is the maker's.)
        assert doc["blockers"][0]["state"] == "LISTEN" and doc["blockers"][0]["pids"] == [maker.pid]
        timers = [b["timer_ms"] for b in doc["blockers"][1:]]
        assert all(b["held"] == "time_wait" for b in doc["blockers"][1:])
        assert timers == sorted(timers, reverse=True)
        # Every blocker is counted in a group, and the groups are what the kernel has.
        groups = {g["state"]: g for g in doc["blocker_groups"]}
        assert sum(g["count"] for g in doc["blocker_groups"]) == CROWD + 1
        assert groups["TIME_WAIT"]["count"] == time_waits and groups["LISTEN"]["count"] == 1
        low, high = groups["TIME_WAIT"]["timer_ms"]
        assert 0 < low <= high <= 60000

        every = json.loads(portscope("why", str(port), "--netns", netns.name, "--json", "--all").stdout)
        assert len(every["blockers"]) == CROWD + 1 == every["blockers_total"]

        human = portscope("why", str(port), "--netns", netns.name)
        assert f"{time_waits} x TIME_WAIT 127.0.0.1:{port}" in human.stdout, human.stdout
        assert f"100 of {CROWD + 1} blockers described one by one" in human.stdout
    finally:
        if maker.stdin:
            maker.stdin.close()
        maker.wait(timeout=30)
