"""Reuseport groups against the real kernel: every connection and datagram
the kernel delivers to a group member is counted once, in the kernel, and
matched to the process that received it.

The ground truth is what each member process itself accepted or received;
the tracer's counts come from its BPF map. Each scenario runs in a private
network namespace with actors in separate processes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import Netns, ServingActor

from tests.needs import SLOWDOWN, missing

from tracer import libbpf
from tracer.coreobject import verify_plan
from tracer.engine import EngineConfig
from tracer.errors import PlanUnavailable
from tracer.nsenter import in_netns
from tracer.plans import BTF_PATH, Part, Plan
from tracer.records import Group, GroupsReading
from tracer.reuseport import GroupWatcher

ROOT = Path(__file__).resolve().parents[2]
PORT = 41000
BACKLOG = 4096
CONNECTIONS = 4000
STEP_TIMEOUT = 120.0  # one actor step may make 4,000 connections (slow under emulation)


def open_watcher(**kwargs) -> GroupWatcher:
    """A watcher with the plan the engine chooses (PORTSCOPE_PLAN under the
    kernel matrix). Some kernels cannot count with some plans (the
    tracepoint plan before 6.6 has no hook; 5.10 does not give fentry
    programs bpf_get_socket_cookie): the kernel matrix deselects these tests
    (marker ``counts_groups``) for a plan that ``portscope doctor`` says
    cannot count groups there, and runs them under one that can. Met anyway,
    it is a need missing (a failure under CI)."""
    try:
        return GroupWatcher(**kwargs)
    except PlanUnavailable as exc:
        missing(f"reuseport counting is not possible with this plan here: {exc}")
        raise


@pytest.fixture
def watcher(netns: Netns) -> GroupWatcher:
    w = open_watcher(port=PORT, netns=netns.path)
    try:
        yield w
    finally:
        w.close()


def members(ns: Netns, n: int, protocol: str = "tcp", family: str = "ipv4",
            addr: str = "127.0.0.1") -> list[tuple[ServingActor, int]]:
    """``n`` processes, each with one SO_REUSEPORT socket on ``addr``:PORT,
    listening (TCP) or bound (UDP)."""
    out = []
    for _ in range(n):
        actor = ServingActor(ns, timeout=STEP_TIMEOUT)
        fd = actor.socket(protocol, family, reuseport=True)
        assert actor.bind(fd, addr, PORT).ok
        if protocol == "tcp":
            assert actor.listen(fd, BACKLOG).ok
        else:
            actor.rcvbuf(fd, 8 << 20)  # no datagram dropped for lack of room
        out.append((actor, fd))
    return out


def the_group(snap: GroupsReading, protocol: str = "tcp") -> Group:
    found = [g for g in snap.groups if g.port == PORT and g.protocol == protocol]
    assert len(found) == 1, f"expected one {protocol} group on {PORT}, got {snap.to_json()}"
    return found[0]


def by_pid(group: Group) -> dict[int, int]:
    """delivered per owning pid (each member has exactly one owner here)."""
    out = {}
    for m in group.members:
        assert len(m.pids) == 1, m
        out[m.pids[0]] = m.delivered
    return out


def read_until(watcher: GroupWatcher, ready, timeout: float = STEP_TIMEOUT) -> GroupsReading:
    """Read until ``ready(snapshot)`` holds (deliveries are processed by the
    kernel shortly after the client's connect() returns); the last read."""
    deadline = time.monotonic() + timeout
    while True:
        snap = watcher.read()
        if ready(snap) or time.monotonic() >= deadline:
            return snap
        time.sleep(0.05)


def wait_served(servers: list[tuple[ServingActor, int]], total: int,
                timeout: float = STEP_TIMEOUT) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        counts = [a.served(fd) for a, fd in servers]
        if sum(counts) >= total or time.monotonic() >= deadline:
            return counts
        time.sleep(0.05)


def has_sk_data_ready() -> bool:
    """The sk_data_ready tracepoint exists from kernel 6.6 on."""
    btf = libbpf.Btf.parse(BTF_PATH)
    try:
        btf.find("btf_trace_sk_data_ready", libbpf.BtfKind.TYPEDEF)
        return True
    except KeyError:
        return False
    finally:
        btf.close()


@pytest.mark.parametrize("plan", [Plan.KPROBE, Plan.TRACEPOINT])
def test_group_counters_pass_the_verifier(root: None, plan: Plan) -> None:
    """The kprobe counter must load even where it cannot attach (no
    CONFIG_KPROBES); the fentry one is refused before verification where
    BPF trampolines are. Before 6.6 the tracepoint plan has no hook."""
    config = EngineConfig(events=False, ring_bytes=0)
    if plan is Plan.TRACEPOINT and not has_sk_data_ready():
        with pytest.raises(PlanUnavailable, match="sk_data_ready"):
            verify_plan(config, plan, Part.GROUPS)
        return
    verify_plan(config, plan, Part.GROUPS)


@pytest.mark.counts_groups
def test_tcp_counts_equal_what_each_process_accepted(netns: Netns, watcher: GroupWatcher) -> None:
    servers = members(netns, 4)
    client = ServingActor(netns, timeout=STEP_TIMEOUT)
    first = watcher.read()
    group = the_group(first)
    assert group.size == 4 and not group.bpf
    assert sorted(m.pids[0] for m in group.members) == sorted(a.pid for a, _ in servers)

    for actor, fd in servers:
        actor.serve(fd)
    assert client.connect_many("127.0.0.1", PORT, CONNECTIONS) == CONNECTIONS
    wait_served(servers, CONNECTIONS)
    accepted = [a.stop_serving(fd) for a, fd in servers]
    assert sum(accepted) == CONNECTIONS

    group = the_group(watcher.read())
    counted = by_pid(group)
    assert sum(counted.values()) == CONNECTIONS
    assert counted == {a.pid: n for (a, _), n in zip(servers, accepted)}
    assert all(m.queue == 0 and m.backlog == BACKLOG for m in group.members)
    # The kernel's hash spreads 4,000 connections evenly enough.
    assert group.imbalance.verdict in ("even", "uneven")
    assert abs(sum(m.share for m in group.members) - 1.0) < 1e-9
    assert watcher.health()["map_full"] == 0


@pytest.mark.counts_groups
def test_udp_counts_equal_what_each_process_received(netns: Netns, watcher: GroupWatcher) -> None:
    servers = members(netns, 4, protocol="udp", family="ipv6", addr="::1")
    client = ServingActor(netns, timeout=STEP_TIMEOUT)
    assert len(the_group(watcher.read(), "udp").members) == 4
    for actor, fd in servers:
        actor.serve(fd)
    assert client.send_many("::1", PORT, CONNECTIONS, family="ipv6") == CONNECTIONS
    wait_served(servers, CONNECTIONS)
    received = [a.stop_serving(fd) for a, fd in servers]
    assert sum(received) == CONNECTIONS

    group = the_group(watcher.read(), "udp")
    assert group.family == "ipv6" and group.local == f"[::1]:{PORT}"
    counted = by_pid(group)
    assert sum(counted.values()) == CONNECTIONS
    assert counted == {a.pid: n for (a, _), n in zip(servers, received)}
    assert all(m.backlog is None for m in group.members)


@pytest.mark.counts_groups
def test_member_that_stops_accepting_shows_its_queue_growing(netns: Netns,
                                                           watcher: GroupWatcher) -> None:
    servers = members(netns, 4)
    client = ServingActor(netns, timeout=STEP_TIMEOUT)
    watcher.read()  # as the command does at start (the kprobe plan needs cookies)
    for actor, fd in servers:
        actor.serve(fd)
    stalled, stalled_fd = servers[0]
    assert client.connect_many("127.0.0.1", PORT, 200) == 200
    wait_served(servers, 200)
    accepted_before = stalled.stop_serving(stalled_fd)

    others = servers[1:]

    def settled(snap: GroupsReading) -> bool:
        group = the_group(snap)
        member = {m.pids[0]: m for m in group.members}
        return (group.delivered == total
                and all(member[a.pid].queue == 0 for a, _ in others)
                and member[stalled.pid].queue == member[stalled.pid].delivered - accepted_before)

    queues = []
    total = 200
    for _ in range(2):
        assert client.connect_many("127.0.0.1", PORT, 200) == 200
        total += 200
        group = the_group(read_until(watcher, settled))
        member = {m.pids[0]: m for m in group.members}
        stuck = member[stalled.pid]
        # Everything it got since it stopped is waiting in its accept queue,
        # while the others keep theirs empty.
        assert group.delivered == total
        assert stuck.queue == stuck.delivered - accepted_before
        assert all(member[a.pid].queue == 0 for a, _ in others)
        queues.append(stuck.queue)
        if len(queues) == 2:
            # Connections waited through the last interval and none left
            # its queue: flagged, and only it.
            assert stuck.status == "not_accepting", stuck
            assert "accepted nothing" in stuck.problems[0]
            assert all(member[a.pid].status == "ok" for a, _ in others)
    assert 0 < queues[0] < queues[1], queues


@pytest.mark.counts_groups
@pytest.mark.parametrize("protocol", ["tcp", "udp"])
def test_join_and_leave_are_events_with_the_right_pid(netns: Netns, watcher: GroupWatcher,
                                                      protocol: str) -> None:
    servers = members(netns, 2, protocol=protocol)
    snap = watcher.read()
    assert snap.events == []  # the first read is the starting point, not joins

    (joiner, joiner_fd), = members(netns, 1, protocol=protocol)
    before = time.time()
    snap = watcher.read()
    joins = [e for e in snap.events if e.kind == "join"]
    assert [e.pids for e in joins] == [[joiner.pid]], snap.to_json()["events"]
    assert joins[0].protocol == protocol and joins[0].port == PORT
    assert joins[0].time >= before
    assert len(the_group(snap, protocol).members) == 3

    leaver, leaver_fd = servers[0]
    client = ServingActor(netns, timeout=STEP_TIMEOUT)
    if protocol == "tcp":
        client.connect_many("127.0.0.1", PORT, 60)
    else:
        client.send_many("127.0.0.1", PORT, 60)
    snap = read_until(watcher, lambda s: the_group(s, protocol).delivered == 60)
    queued = {m.pids[0]: m.delivered for m in the_group(snap, protocol).members}
    leaver.close(leaver_fd)
    snap = watcher.read()
    leaves = [e for e in snap.events if e.kind == "leave"]
    assert [e.pids for e in leaves] == [[leaver.pid]], snap.to_json()["events"]
    assert leaves[0].delivered == queued[leaver.pid]
    assert sorted(m.pids[0] for m in the_group(snap, protocol).members) == sorted(
        [servers[1][0].pid, joiner.pid])
    # The departed member's key is deleted from the kernel map.
    assert leaves[0].cookie not in watcher.counts()


@pytest.mark.counts_groups
def test_reuseport_bpf_program_is_shown(netns: Netns, watcher: GroupWatcher) -> None:
    servers = members(netns, 3)
    servers[0][0].steer_to(servers[0][1], 1)  # every connection to the second member
    client = ServingActor(netns, timeout=STEP_TIMEOUT)
    watcher.read()
    for actor, fd in servers:
        actor.serve(fd)
    client.connect_many("127.0.0.1", PORT, 100)
    served = wait_served(servers, 100)
    group = the_group(watcher.read())
    assert group.bpf
    assert sorted(m.delivered for m in group.members) == [0, 0, 100]
    assert sorted(served) == [0, 0, 100]
    assert group.imbalance.verdict == "uneven" and group.imbalance.max_min is None


@pytest.mark.counts_groups
def test_cli_json(netns: Netns) -> None:
    open_watcher().close()  # skips where this plan cannot count here
    servers = members(netns, 2)
    client = ServingActor(netns, timeout=STEP_TIMEOUT)
    cmd = [sys.executable, "-m", "tracer.cli", "groups", str(PORT), "--netns", netns.name,
           "--json", "--watch", "--interval", "0.5"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    first = json.loads(proc.stdout.readline())  # printed once the counters are attached
    for actor, fd in servers:
        actor.serve(fd)
    client.connect_many("127.0.0.1", PORT, 50)
    wait_served(servers, 50)
    proc.send_signal(signal.SIGINT)  # Ctrl-C: one last refresh, then a clean exit
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert first["plan"] in ("fentry", "kprobe", "tracepoint") and first["interval"] is None
    last = lines[-1]
    (group,) = [g for g in last["groups"] if g["protocol"] == "tcp"]
    assert group["port"] == PORT and group["netns"] == netns.inode and group["size"] == 2
    assert sum(m["delivered"] for m in group["members"]) == 50
    assert {m["pids"][0] for m in group["members"]} == {a.pid for a, _ in servers}
    assert set(group["imbalance"]) == {"members", "total", "seconds", "max_min", "cv", "chi2",
                                       "dof", "p_value", "verdict", "most", "least"}
    assert set(group["balance"]) == {"verdict", "cause", "causes", "most", "least"}
    # Each actor serves its socket from a thread of its own, which waits
    # for connections in select() before accept() (harness._Server).
    for m in group["members"]:
        assert [(a["pid"], a["how"]) for a in m["acceptors"]] == [(m["pids"][0], "select")], m
        assert m["acceptors"][0]["tid"] != m["pids"][0]
        assert m["status"] == "ok" and m["drops"] == 0
    for key in ("map_full", "missed", "unattributed", "no_cookie"):
        assert last["health"][key] == 0


@pytest.mark.counts_groups
def test_full_queue_drops_are_counted_per_member(netns: Netns, watcher: GroupWatcher) -> None:
    """A member whose accept queue is full refuses connections: its count
    is the kernel's sk_drops for that socket, as ``ss -tm`` shows it, and
    it is flagged as dropping; the other member is not."""
    (full, full_fd), (fine, fine_fd) = (members(netns, 1)[0], members(netns, 1)[0])
    # Relisten with a backlog of 1 (a queue of 2 on Linux) and never accept.
    assert full.listen(full_fd, 1).ok
    fine.serve(fine_fd)
    watcher.read()
    fd = os.open(netns.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        clients = in_netns(fd, lambda: [_nonblocking_connect(PORT) for _ in range(40)])
    finally:
        os.close(fd)
    try:
        def dropped(snap: GroupsReading) -> bool:
            m = {mm.pids[0]: mm for mm in the_group(snap).members}[full.pid]
            return bool(m.drops) and m.status == "dropping"

        watcher.read()
        snap = read_until(watcher, dropped, timeout=10.0 * SLOWDOWN)
        by_pid = {m.pids[0]: m for m in the_group(snap).members}
        assert dropped(snap), snap.to_json()
        assert by_pid[fine.pid].status == "ok" and by_pid[fine.pid].drops == 0
    finally:
        for c in clients:
            c.close()
    # The clients gone, no retransmitted SYN adds a drop: the count is still.
    time.sleep(0.2 * SLOWDOWN)
    ss = subprocess.run(["ip", "netns", "exec", netns.name, "ss", "-tlmnH", f"sport = :{PORT}"],
                        capture_output=True, text=True, check=True).stdout
    kernel = sorted(int(d) for d in re.findall(r",d(\d+)\)", ss))
    assert sorted(m.drops for m in the_group(watcher.read()).members) == kernel, ss


def _nonblocking_connect(port: int) -> socket.socket:
    s = socket.socket()
    s.setblocking(False)
    try:
        s.connect(("127.0.0.1", port))
    except BlockingIOError:
        pass
    return s
