"""The iter/tcp and iter/udp programs (tracer/sockflags.py) and batched map
reads, against sockets made for real in a private namespace. The ground
truth for every flag is the kernel's own getsockopt answer in the actor."""

from __future__ import annotations

import os
import random
import socket
import struct

import pytest
from harness import Actor, Netns

from tracer import libbpf
from tracer.engine import Engine, EngineConfig
from tracer.layout import PsCounter
from tracer.loader import open_engine
from tracer.sockflags import SocketIterators, SockFlags


@pytest.fixture(scope="module")
def iterators(root: None):
    with SocketIterators() as its:
        yield its


def read_ns(iterators: SocketIterators, ns: Netns) -> list[SockFlags]:
    fd = os.open(ns.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return iterators.sockets(fd)
    finally:
        os.close(fd)


def by_inode(records: list[SockFlags]) -> dict[int, SockFlags]:
    return {r.inode: r for r in records if r.inode}


def test_flags_and_reuseport_groups(iterators: SocketIterators, netns: Netns) -> None:
    a, b = Actor(netns), Actor(netns)
    port = random.randint(20000, 30000)
    group = []
    for actor in (a, a, b):  # one group of three members, in two processes
        fd = actor.socket("tcp", reuseport=True)
        group.append(actor.bind(fd, "127.0.0.1", port))
        actor.listen(fd)
    lone_fd, other_fd = a.socket("tcp", reuseaddr=True), a.socket("tcp", reuseport=True)
    lone = a.bind(lone_fd, "127.0.0.1", port + 1)
    other = a.bind(other_fd, "127.0.0.2", port)  # another address: another group
    a.listen(lone_fd)
    a.listen(other_fd)
    bound_only = a.bind(a.socket("tcp", reuseaddr=True), "127.0.0.1", port + 3)
    v6 = a.bind(a.socket("udp", "ipv6", v6only=True, bindtodevice="lo"), "::1", port + 2)

    records = read_ns(iterators, netns)
    assert {r.netns for r in records} == {netns.inode}, "only the namespace's sockets"
    seen = by_inode(records)
    for truth in group + [lone, other, v6]:
        assert truth.ok, truth.describe()
        rec = seen[truth.inode]
        assert (rec.port, rec.addr) == (truth.bound_port, truth.bound_addr)
        assert rec.options == truth.options, (rec, truth.describe())
        assert rec.bound_dev_if == truth.bound_dev_if
        assert rec.sock_uid == truth.sock_uid
    members = {seen[t.inode].group for t in group}
    assert len(members) == 1 and 0 not in members, "one group id, shared"
    assert all(seen[t.inode].group_size == 3 for t in group)
    assert seen[other.inode].group not in members and seen[other.inode].group_size == 1
    assert seen[lone.inode].group == 0 and seen[lone.inode].group_size == 0
    assert seen[v6.inode].bound_dev_if == socket.if_nametoindex("lo")
    assert not any(seen[t.inode].group_bpf_prog for t in group)
    # A TCP socket that is bound but neither listening nor connected sits only
    # in the kernel's bind hash, which iter/tcp does not walk.
    assert bound_only.ok and bound_only.inode not in seen


def test_groups_the_kernel_keeps_apart_have_different_ids(iterators: SocketIterators,
                                                         netns: Netns) -> None:
    """Sockets that share an address and port through SO_REUSEADDR but not
    a uid form one UDP group per uid; a v6-only [::]:P group sits beside a
    dual-stack [::]:P group. The kernel makes each; each group has its own
    id, the same for all its members (sockflags.group_id hashes the uid and
    the v6-only setting for this)."""
    port = random.randint(20000, 30000)
    root, nobody = Actor(netns), Actor(netns, uid=65534)
    udp: dict[str, list[int]] = {"root": [], "nobody": []}
    for name, actor in (("root", root), ("nobody", nobody)):
        for _ in range(2):
            truth = actor.bind(actor.socket("udp", reuseaddr=True, reuseport=True), "127.0.0.1", port)
            assert truth.ok, truth.describe()
            udp[name].append(truth.inode)
    tcp: dict[bool, list[int]] = {False: [], True: []}
    for v6only in (False, True):
        for _ in range(2):
            fd = root.socket("tcp", "ipv6", reuseport=True, v6only=v6only)
            truth = root.bind(fd, "::", port)
            assert truth.ok and root.listen(fd).ok, truth.describe()
            tcp[v6only].append(truth.inode)

    seen = by_inode(read_ns(iterators, netns))
    for members in (*udp.values(), *tcp.values()):
        assert [seen[i].group_size for i in members] == [2, 2], "the kernel made a group of two"
    ids = [{seen[i].group for i in members} for members in (*udp.values(), *tcp.values())]
    assert all(len(one) == 1 and 0 not in one for one in ids), ids
    assert len(set().union(*ids)) == 4, f"four groups, four ids: {ids}"


def test_time_wait_socket_keeps_its_reuseaddr_flag(iterators: SocketIterators,
                                                   netns: Netns) -> None:
    server, client = Actor(netns), Actor(netns)
    port = random.randint(20000, 30000)
    listener = server.socket("tcp", reuseaddr=True)
    server.bind(listener, "127.0.0.1", port)
    server.listen(listener)
    conn = client.socket("tcp")
    client.connect(conn, "127.0.0.1", port)
    accepted = server.accept(listener)
    server.close(accepted)  # the server closes first: its side enters TIME_WAIT
    client.close(conn)
    server.close(listener)
    server.wait_tcp_states(port, lambda states: states == ["TIME_WAIT"])

    tw = [r for r in read_ns(iterators, netns) if r.port == port]
    assert len(tw) == 1, tw
    assert tw[0].state == "TIME_WAIT" and tw[0].inode == 0
    assert tw[0].options == frozenset({"reuseaddr"}), "inherited from the listener"


def _engine_after_one_bind() -> Engine:
    """An engine that has traced one successful bind (its counters moved)."""
    engine = open_engine(EngineConfig(errors_only=False))
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.close()
    engine.poll(100)
    return engine


def test_counters_read_in_batch_equal_single_lookups(root: None) -> None:
    """Batched lookups over the per-CPU counter array agree with one-key reads."""
    with _engine_after_one_bind() as engine:
        counters = engine.counters()
        cpus = libbpf.possible_cpus()
        ring_map = engine._counters  # the per-CPU array of enum ps_counter
        batch = {struct.unpack("I", k)[0]: sum(struct.unpack(f"{cpus}Q", v))
                 for k, v in ring_map.lookup_batch(8 * cpus)}
    assert set(batch) == {int(c) for c in PsCounter if c != PsCounter.MAX}
    assert batch[PsCounter.EMITTED] == counters.emitted >= 1
    assert batch[PsCounter.LOST] == counters.lost


def test_maps_are_read_key_by_key_where_the_kernel_has_no_batches(
        root: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Debian 11's 5.10 answers ENOTSUPP (524) to a batched lookup of a
    per-CPU array: the reader then walks the map one key at a time, and
    gets what a batch would have given. Proven here on the running kernel's
    counters by making the batched call answer as 5.10 does (5.10 itself is
    not in the matrix yet)."""
    with _engine_after_one_bind() as engine:
        cpus = libbpf.possible_cpus()
        counters = engine._counters
        batched = sorted(counters.lookup_batch(8 * cpus))
        each = sorted(libbpf.lookup_each(counters.fd, 4, 8 * cpus, "ps_counters"))
        handle = libbpf.lib()
        real = handle.bpf_map_lookup_batch
        calls = []

        def refuse(*args: object) -> int:
            calls.append(args)
            return -524

        monkeypatch.setattr(handle, "bpf_map_lookup_batch", refuse)
        try:
            fallen_back = sorted(counters.lookup_batch(8 * cpus))
        finally:
            monkeypatch.setattr(handle, "bpf_map_lookup_batch", real)
    assert calls, "the batched call was not tried first"
    assert len(each) == len(batched) > 1
    assert [k for k, _ in each] == [k for k, _ in batched] == [k for k, _ in fallen_back]
    # The counters move between reads only upward; the emitted one was read.
    emitted = struct.pack("I", PsCounter.EMITTED)
    assert sum(struct.unpack(f"{cpus}Q", dict(fallen_back)[emitted])) >= 1
