"""What each probe plan observes beyond the system call, on the plan running.

The fentry and kprobe plans also probe the port allocator,
``inet_csk_get_port`` (TCP and DCCP only; UDP has its own allocator), and
fold its verdict into the event of the call it ran in: ``get_port`` is
``"ok"`` or ``"refused"``, and None where the call never reached it. The
tracepoint plan sees only the system calls: ``get_port`` is always None.

Run under each plan by scripts/kernel-matrix (PORTSCOPE_PLAN); natively the
automatic choice decides, which is the tracepoint plan on the CI machine.
"""

from __future__ import annotations

import errno

import pytest
from harness import (
    Actor,
    EventCollector,
    Netns,
    expect_outcome,
    pick_port,
    second_listen_refused,
)

from tracer.plans import Plan

pytestmark = pytest.mark.kernel

OK = 0
ALLOCATOR_PLANS = (Plan.FENTRY, Plan.KPROBE)
LOOPBACK = {"ipv4": "127.0.0.1", "ipv6": "::1"}



def allocator_verdict(tracer: EventCollector, verdict: str) -> str | None:
    """What ``get_port`` must say under the running plan when the port
    allocator answered ``verdict`` inside the call."""
    return verdict if tracer.engine.plan in ALLOCATOR_PLANS else None


# BPF_PROG_TYPE_* (include/uapi/linux/bpf.h)
PROG_TYPE_KPROBE, PROG_TYPE_TRACEPOINT, PROG_TYPE_TRACING = 2, 5, 26
CALLS = ("bind", "listen", "connect")


def test_fentry_plan_attaches_no_syscall_tracepoint(tracer: EventCollector) -> None:
    """A syscall tracepoint puts every task on the slow system-call path, so
    the fentry plan takes bind/listen/connect from trampolines on the kernel
    functions; the other plans from the tracepoints. The kernel says which
    program types it loaded (the events themselves are proven, under every
    plan, by the rest of the suite)."""
    types = tracer.engine.program_types()
    tracepoints = {name for name, t in types.items() if t == PROG_TYPE_TRACEPOINT}
    if tracer.engine.plan is Plan.FENTRY:
        assert tracepoints == {"ps_state_change"}, types  # sock:inet_sock_set_state
        for call in CALLS:
            assert types[f"ps_fentry_{call}"] == types[f"ps_fexit_{call}"] == PROG_TYPE_TRACING
    else:
        assert {f"ps_{end}_{call}" for end in ("enter", "exit") for call in CALLS} <= tracepoints
    if tracer.engine.plan is Plan.KPROBE:
        assert types["ps_kretprobe_get_port"] == PROG_TYPE_KPROBE


def test_events_name_the_running_plan(tracer: EventCollector, netns: Netns) -> None:
    a = Actor(netns)
    truth = a.bind(a.socket("tcp"), "127.0.0.1", pick_port())
    expect_outcome(truth, OK)
    (event,) = tracer.verify(truth)
    assert event.plan == tracer.engine.plan.value


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_tcp_bind_conflict_is_refused_by_the_allocator(tracer: EventCollector, netns: Netns,
                                                       family: str) -> None:
    a = Actor(netns)
    port = pick_port()
    first = a.bind(a.socket("tcp", family), LOOPBACK[family], port)
    second = a.bind(a.socket("tcp", family), LOOPBACK[family], port)
    expect_outcome(first, OK)
    expect_outcome(second, errno.EADDRINUSE, "no option lifts the conflict")
    ok, refused = tracer.verify(first, second)
    assert ok.get_port == allocator_verdict(tracer, "ok")
    assert refused.get_port == allocator_verdict(tracer, "refused")


@pytest.mark.parametrize("port", ["explicit", "zero"])
def test_tcp_bind_success_is_accepted_by_the_allocator(tracer: EventCollector, netns: Netns,
                                                       port: str) -> None:
    """Port 0 goes through the allocator too: it is where the port is chosen."""
    a = Actor(netns)
    truth = a.bind(a.socket("tcp"), "127.0.0.1", pick_port() if port == "explicit" else 0)
    expect_outcome(truth, OK)
    (event,) = tracer.verify(truth)
    assert event.get_port == allocator_verdict(tracer, "ok")


def test_listen_time_conflict_is_refused_by_the_allocator(tracer: EventCollector,
                                                          netns: Netns) -> None:
    """Two SO_REUSEADDR sockets share a bound port; the second listen() asks
    the allocator again (inet_csk_listen_start), which refuses it."""
    a = Actor(netns)
    port = pick_port()
    truths = second_listen_refused(a, port)
    events = tracer.verify(*truths)
    assert [e.get_port for e in events] == [
        allocator_verdict(tracer, v) for v in ("ok", "ok", "ok", "refused")
    ]


@pytest.mark.parametrize("reuseaddr", [False, True], ids=["plain", "reuseaddr"])
def test_udp_bind_does_not_use_the_tcp_allocator(tracer: EventCollector, netns: Netns,
                                                 reuseaddr: bool) -> None:
    """UDP ports come from udp_lib_get_port, which no plan probes."""
    a = Actor(netns)
    port = pick_port()
    first = a.bind(a.socket("udp", reuseaddr=reuseaddr), "127.0.0.1", port)
    second = a.bind(a.socket("udp", reuseaddr=reuseaddr), "127.0.0.1", port)
    expect_outcome(first, OK)
    expect_outcome(second, OK if reuseaddr else errno.EADDRINUSE)
    events = tracer.verify(first, second)
    assert [e.get_port for e in events] == [None, None]


def test_calls_that_never_reach_the_allocator(tracer: EventCollector, netns: Netns) -> None:
    """A non-local address, or a socket bound already, is refused before the
    allocator is asked; connect() picks its ephemeral port without it
    (inet_hash_connect)."""
    server, client = Actor(netns), Actor(netns)
    port = pick_port()
    nonlocal_bind = client.bind(client.socket("tcp"), "192.0.2.1", port)
    listener = server.socket("tcp")
    truths = [server.bind(listener, "127.0.0.1", port), server.listen(listener),
              client.connect(client.socket("tcp"), "127.0.0.1", port)]
    rebind = server.bind(listener, "127.0.0.1", port + 1)
    expect_outcome(nonlocal_bind, errno.EADDRNOTAVAIL, "a non-local address needs IP_FREEBIND")
    for truth in truths:
        expect_outcome(truth, OK)
    expect_outcome(rebind, errno.EINVAL, "a socket is bound once")
    refused, bind, listen, connect, bound_twice = tracer.verify(nonlocal_bind, *truths, rebind)
    assert (bind.get_port, listen.get_port) == (allocator_verdict(tracer, "ok"),) * 2
    assert (refused.get_port, connect.get_port, bound_twice.get_port) == (None, None, None)
