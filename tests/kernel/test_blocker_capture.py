"""The sockets that held a port when the kernel refused a bind() or listen(),
read in the kernel at that moment (probes/portscope.bpf.c, capture_tcp and
capture_udp), so that a blocker that lived for a millisecond is still named.

The oracle is the kernel twice over: the refusal itself, and the port's
sockets as sock_diag and the iterators report them right after it, before
anything closes. The probe's view must equal that view, socket for socket
(state, addresses, inode, uid, options, device), for every population of a
port below; then the blockers close, and the explanation must still name
them, and the process that bound them.

Where the blockers are read depends on the plan: at the port allocator's
refusal (``refusal``: fentry and kprobe, TCP) or at the exit of the call
(``exit``: the tracepoint plan, and UDP, whose allocator is not probed).
"""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from typing import Callable

import pytest
from harness import (
    Actor,
    EventCollector,
    Netns,
    Truth,
    expect_outcome,
    pick_port,
    second_listen_refused,
)

from tracer.inventory import take
from tracer.layout import PsBlockers
from tracer.onthespot import OnTheSpot
from tracer.plans import Plan
from tracer.records import CallEvent, Capture

pytestmark = pytest.mark.kernel

MAX_KEPT = len(PsBlockers().sock)


def expected_when(tracer: EventCollector, protocol: str) -> str:
    if protocol == "tcp" and tracer.engine.plan in (Plan.FENTRY, Plan.KPROBE):
        return "refusal"
    return "exit"


def view_of_capture(capture: Capture) -> set[tuple]:
    return {(c.protocol, c.family, c.state, c.local, c.remote, c.inode, c.uid,
             tuple(sorted(c.options)), c.bound_dev_if) for c in capture.sockets}


def view_of_kernel(netns: Netns, port: int, protocol: str, leave_out: int = 0) -> set[tuple]:
    """The port's sockets as sock_diag and the iterators report them."""
    inv = take(port=port, protocols=(protocol,), netns=str(netns.inode))
    out = set()
    for s in inv.sockets:
        d, f = s.diag, s.flags
        if d.inode and d.inode == leave_out:
            continue
        out.add((d.protocol, d.family, d.state, _ep(d.family, d.local_addr, d.local_port),
                 _ep(d.family, d.remote_addr, d.remote_port), d.inode,
                 f.sock_uid if f else d.uid, tuple(sorted(f.options)) if f else None,
                 d.bound_dev_if))
    return out


def _ep(family: str, addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if family == "ipv6" else f"{addr}:{port}"


def refused_event(tracer: EventCollector, truth: Truth) -> CallEvent:
    expect_outcome(truth, errno.EADDRINUSE)
    (event,) = tracer.wait_for(truth)
    assert event.capture is not None, "a refused bind must carry what held the port"
    return event


# ---- populations of a port: each builds sockets, then a call the kernel refuses --------


def listener(a: Actor, port: int) -> Truth:
    s = a.socket("tcp")
    expect_outcome(a.bind(s, "127.0.0.1", port), 0)
    expect_outcome(a.listen(s), 0)
    return a.bind(a.socket("tcp"), "0.0.0.0", port)


def dual_stack_listener(a: Actor, port: int) -> Truth:
    s = a.socket("tcp", "ipv6")
    expect_outcome(a.bind(s, "::", port), 0)
    expect_outcome(a.listen(s), 0)
    return a.bind(a.socket("tcp", reuseaddr=True), "127.0.0.1", port)


def bound_only(a: Actor, port: int) -> Truth:
    expect_outcome(a.bind(a.socket("tcp", "ipv6", v6only=True), "::1", port), 0)
    expect_outcome(a.bind(a.socket("tcp", reuseaddr=True), "127.0.0.1", port), 0)
    return a.bind(a.socket("tcp", "ipv6"), "::", port)


def connections_and_time_wait(a: Actor, port: int) -> Truth:
    """A listener, two accepted connections, one unaccepted, and two
    TIME_WAIT sockets left by server-side closes."""
    lst = a.socket("tcp", reuseaddr=True)
    expect_outcome(a.bind(lst, "127.0.0.1", port), 0)
    expect_outcome(a.listen(lst), 0)
    for i in range(5):
        cli = a.socket("tcp")
        expect_outcome(a.connect(cli, "127.0.0.1", port), 0)
        if i < 4:
            conn = a.accept(lst)
            if i >= 2:
                a.close(conn)  # the server closes first: its side goes to TIME_WAIT
                a.close(cli)
    a.wait_tcp_states(port, lambda st: st.count("TIME_WAIT") == 2)
    return a.bind(a.socket("tcp"), "127.0.0.1", port)


def udp_sockets(a: Actor, port: int) -> Truth:
    expect_outcome(a.bind(a.socket("udp"), "127.0.0.1", port), 0)
    expect_outcome(a.bind(a.socket("udp", "ipv6", reuseaddr=True), "::1", port), 0)
    connected = a.socket("udp", reuseport=True)
    expect_outcome(a.bind(connected, "127.0.0.2", port), 0)
    expect_outcome(a.connect(connected, "127.0.0.1", 9), 0)
    return a.bind(a.socket("udp"), "0.0.0.0", port)


POPULATIONS: dict[str, tuple[str, Callable[[Actor, int], Truth]]] = {
    "listener": ("tcp", listener),
    "dual_stack_listener": ("tcp", dual_stack_listener),
    "bound_only": ("tcp", bound_only),
    "connections_and_time_wait": ("tcp", connections_and_time_wait),
    "udp_sockets": ("udp", udp_sockets),
}


@pytest.mark.parametrize("name", POPULATIONS)
def test_the_probe_sees_what_the_kernel_reports(tracer: EventCollector, netns: Netns,
                                                name: str) -> None:
    protocol, build = POPULATIONS[name]
    a = Actor(netns)
    port = pick_port()
    event = refused_event(tracer, build(a, port))
    cap = event.capture
    assert cap.when == expected_when(tracer, protocol)
    assert cap.complete and cap.seen == len(cap.sockets)
    assert view_of_capture(cap) == view_of_kernel(netns, port, protocol)
    assert all(c.netns == netns.inode and c.port == port for c in cap.sockets)
    # Every socket made by a traced bind()/listen() names that process.
    bound = [c for c in cap.sockets if c.inode and c.state in ("LISTEN", "CLOSE")]
    assert bound and all(c.binder_pid == a.pid for c in bound)


def test_a_socket_on_the_port_in_another_namespace_is_not_a_blocker(tracer: EventCollector,
                                                                    netns: Netns) -> None:
    port = pick_port()
    with Netns() as other:
        tracer.watch(other.inode)
        b = Actor(other)
        s = b.socket("tcp")
        expect_outcome(b.bind(s, "0.0.0.0", port), 0)
        expect_outcome(b.listen(s), 0)
        a = Actor(netns)
        event = refused_event(tracer, listener(a, port))
        assert [c.netns for c in event.capture.sockets] == [netns.inode]
        b.exit()


def test_a_refused_listen_names_the_listener_not_itself(tracer: EventCollector,
                                                        netns: Netns) -> None:
    a = Actor(netns)
    port = pick_port()
    first_bind, second_bind, first_listen, second_listen = second_listen_refused(a, port)
    event = refused_event(tracer, second_listen)
    assert event.call == "listen"
    (c,) = event.capture.sockets
    assert (c.state, c.inode, c.binder_pid) == ("LISTEN", first_listen.inode, a.pid)
    assert view_of_capture(event.capture) == view_of_kernel(netns, port, "tcp",
                                                            leave_out=second_listen.inode)


def test_a_crowded_port_keeps_its_listener_and_counts_the_rest(tracer: EventCollector,
                                                               netns: Netns) -> None:
    """More sockets than an event keeps: the listener is kept before the
    connections (they fill the record from the other end), and the count
    says how many there were."""
    a = Actor(netns)
    port = pick_port()
    lst = a.socket("tcp")
    expect_outcome(a.bind(lst, "127.0.0.1", port), 0)
    expect_outcome(a.listen(lst, 64), 0)
    clients = 2 * MAX_KEPT
    for _ in range(clients):
        expect_outcome(a.connect(a.socket("tcp"), "127.0.0.1", port), 0)
        a.accept(lst)
    event = refused_event(tracer, a.bind(a.socket("tcp"), "127.0.0.1", port))
    cap = event.capture
    assert cap.complete and cap.seen == clients + 1
    assert len(cap.sockets) == MAX_KEPT
    assert [c.state for c in cap.sockets].count("LISTEN") == 1
    assert view_of_capture(cap) <= view_of_kernel(netns, port, "tcp")


# ---- the blocker gone by the time anyone looks -----------------------------------------


def test_a_blocker_that_lived_around_the_failure_is_still_named(tracer: EventCollector,
                                                                netns: Netns) -> None:
    blocker, victim = Actor(netns), Actor(netns)
    port = pick_port()
    s = blocker.socket("tcp")
    bound = blocker.bind(s, "127.0.0.1", port)
    expect_outcome(bound, 0)
    expect_outcome(blocker.listen(s), 0)
    refused = victim.bind(victim.socket("tcp"), "0.0.0.0", port)
    blocker.close(s)  # gone a moment after the refusal ...
    pid = blocker.pid
    blocker.exit()  # ... and its process with it
    event = refused_event(tracer, refused)
    assert view_of_kernel(netns, port, "tcp") == set(), "the blocker must be gone by now"

    with OnTheSpot() as spot:
        x = spot.explain(event)
    assert x is not None and x.error is None
    (b,) = x.blockers
    assert (b.pids, b.state, b.local, b.held, b.rule) == (
        (pid,), "LISTEN", f"127.0.0.1:{port}", "gone", "listener")
    doc = x.to_json()
    assert doc["errno"] == "EADDRINUSE" and [r["rule"] for r in doc["reasons"]] == ["conflict"]
    assert doc["fixes"][0]["kind"] == "retry"
    assert not [f for f in doc["fixes"] if f["kind"] == "stop_holder"]
    (closed,) = [n for n in doc["notes"] if n["kind"] == "closed_since"]
    assert closed["params"]["inode"] == bound.inode
    assert not [n for n in doc["notes"] if n["kind"] == "blocker_gone"]
    # The kernel agrees that the retry now succeeds.
    expect_outcome(victim.bind(victim.socket("tcp"), "0.0.0.0", port), 0)


def test_a_blocker_is_named_even_when_its_namespace_is_gone(tracer: EventCollector) -> None:
    """The namespace died with its last process before anyone looked: the
    explanation comes from what the probe read at the refusal alone."""
    port = pick_port()
    with Netns() as ns:
        tracer.watch(ns.inode)
        blocker, victim = Actor(ns), Actor(ns)
        s = blocker.socket("tcp")
        expect_outcome(blocker.bind(s, "0.0.0.0", port), 0)
        expect_outcome(blocker.listen(s), 0)
        refused = victim.bind(victim.socket("tcp", "ipv6"), "::", port)
        pid = blocker.pid
        event = refused_event(tracer, refused)
    with OnTheSpot() as spot:
        x = spot.explain(event)  # the namespace is deleted by now
    assert x is not None and x.error is None, x
    (b,) = x.blockers
    assert (b.pids, b.state, b.local, b.held, b.rule, b.overlap) == (
        (pid,), "LISTEN", f"0.0.0.0:{port}", "gone", "listener", "dual_stack")
    kinds = [n.kind for n in x.notes]
    assert "namespace_gone" in kinds and "closed_since" in kinds
    assert x.fixes[0].kind == "retry"


# The whole incident in one short-lived process and namespace: a listener,
# a refused bind, and the listener closed at once; the namespace dies with
# the process, perhaps before the tracer has read the event.
FLEETING = """
import os, socket, sys
port = int(sys.argv[1])
a = socket.socket(); a.bind(("0.0.0.0", port)); a.listen()
b = socket.socket()
try:
    b.bind(("0.0.0.0", port)); err = 0
except OSError as e:
    err = e.errno
a.close()
print(os.getpid(), err, flush=True)
"""


def test_trace_names_a_blocker_that_closed_at_once() -> None:
    from test_trace_cli import Tracer

    from tests.needs import need_root, need_tool

    need_root()
    need_tool("unshare")
    port = pick_port()
    trace = Tracer("--json", "--port", str(port))
    try:
        out = subprocess.run(["unshare", "-n", sys.executable, "-c", FLEETING, str(port)],
                             capture_output=True, text=True, check=True, timeout=30).stdout
        pid, err = map(int, out.split())
        assert err == errno.EADDRINUSE
        lines = trace.lines(1, timeout=10)
    finally:
        trace.interrupt()
    (line,) = lines
    event = json.loads(line)
    assert event["pid"] == pid and event["result"] == "EADDRINUSE"
    (c,) = event["at_failure"]["sockets"]
    assert (c["state"], c["local"], c["binder"]["pid"]) == ("LISTEN", f"0.0.0.0:{port}", pid)
    (b,) = event["blockers"]
    assert (b["pids"], b["state"], b["held"]) == ([pid], "LISTEN", "gone")
    assert "closed_since" in [n["kind"] for n in event["explanation"]["notes"]]
    assert event["explanation"]["fixes"][0]["kind"] == "retry"


def test_a_successful_bind_carries_no_capture(tracer: EventCollector, netns: Netns) -> None:
    """Only a refusal reads the port's lists: a successful bind's event is
    the plain record."""
    a = Actor(netns)
    ok = a.bind(a.socket("tcp"), "127.0.0.1", pick_port())
    expect_outcome(ok, 0)
    (event,) = tracer.wait_for(ok)
    assert event.capture is None
