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

    its = inventory.SharedIterators()
    original_dump = inventory.dump
    its.holders = bind_after(its.holders)  # type: ignore[method-assign]
    inventory.dump = bind_after(original_dump)  # type: ignore[assignment]
    try:
        taken = inventory.take(port=port, protocols=("udp",), netns=str(netns.inode),
                               iterators=its)
    finally:
        inventory.dump = original_dump  # type: ignore[assignment]
        its.close()
    assert bound_late and bound_late[0].errno == 0  # SO_REUSEADDR on both: shared
    assert taken.sockets, "the first socket was bound before the inventory began"
    for sock in taken.sockets:
        assert [o.pid for o in sock.owners] == [actor.pid], sock
