"""``portscope deliver`` against the kernel: each answer is checked by
sending a real connection (or datagram) and seeing which socket got it.

A server namespace and a client namespace are joined by a veth pair (the
server's end, SRV_DEV, has two addresses; a second veth pair gives the
server a second device). Sockets are made in the server namespace; the
client connects (or sends) for real; the socket that received is the one
whose receive queue holds it (a listener's accept queue, a UDP socket's
buffer) as sock_diag reports it. ``deliver`` is asked in-process (and once
through the command line) before each connection, and must name that
socket, or for a reuseport group the group it is in.
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import struct
import subprocess
import sys
import time
from typing import Any, Iterator

import pytest
from harness import Actor, Netns
from steering import attach_steer

from tests.needs import SLOWDOWN, need_root, need_tool
from tracer import deliver, sockdiag
from tracer.cli import main
from tracer.lookup import address
from tracer.nsenter import in_netns
from tracer.sockflags import SharedIterators

SRV_DEV, CLI_DEV, OTHER_DEV, OTHER_PEER = "psd0", "psd1", "psd2", "psd3"
SERVER, SERVER2, CLIENT = "10.88.0.1", "10.88.0.3", "10.88.0.2"
SERVER6, CLIENT6 = "fd88::1", "fd88::2"
OTHER = "10.89.0.1"
FOREIGN = "10.88.50.1"  # an address no namespace has
PORTSCOPE = [sys.executable, "-m", "tracer.cli"]
SO_ATTACH_REUSEPORT_CBPF = 51


class Scene:
    def __init__(self, server: Netns, client: Netns) -> None:
        self.server, self.client = server, client
        self.kept: list[socket.socket] = []

    def _in(self, ns: Netns, fn: Any) -> Any:
        fd = os.open(ns.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return in_netns(fd, fn)
        finally:
            os.close(fd)

    def sock(self, addr: str, port: int, udp: bool = False, listen: bool = True,
             **opts: Any) -> socket.socket:
        """A socket of the server namespace, bound (and listening, for TCP)."""
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        s = self._in(self.server, lambda: socket.socket(
            family, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM))
        self.kept.append(s)
        for name, level, opt in (("reuseport", socket.SOL_SOCKET, socket.SO_REUSEPORT),
                                 ("reuseaddr", socket.SOL_SOCKET, socket.SO_REUSEADDR),
                                 ("v6only", socket.IPPROTO_IPV6, socket.IPV6_V6ONLY),
                                 ("transparent", socket.SOL_IP, 19)):
            if opts.get(name):
                s.setsockopt(level, opt, 1)
        if opts.get("dev"):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, opts["dev"].encode())
        s.bind((addr, port))
        if listen and not udp:
            s.listen(64)
        if opts.get("cbpf") is not None:  # after listen(): the program then steers the group
            _attach_cbpf(s, opts["cbpf"])  # (before it, the socket would start a group of its own)
        return s

    def connect(self, daddr: str, port: int, from_server: bool = False) -> socket.socket:
        family = socket.AF_INET6 if ":" in daddr else socket.AF_INET

        def go() -> socket.socket:
            c = socket.socket(family, socket.SOCK_STREAM)
            c.settimeout(10 * SLOWDOWN)
            c.connect((daddr, port))
            return c
        c = self._in(self.server if from_server else self.client, go)
        self.kept.append(c)
        return c

    def connect_nowait(self, daddr: str, port: int) -> None:
        def go() -> socket.socket:
            c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            c.setblocking(False)
            c.connect_ex((daddr, port))
            return c
        self.kept.append(self._in(self.client, go))

    def send(self, daddr: str, port: int, sport: int) -> None:
        def go() -> None:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
                c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                c.bind((CLIENT, sport))
                c.sendto(b"x", (daddr, port))
        self._in(self.client, go)

    def received(self, port: int, udp: bool = False, expect: int = 1) -> dict[int, int]:
        """cookie -> what waits in its queue (connections, or bytes), once
        ``expect`` connections (datagrams) have arrived."""
        deadline = time.monotonic() + 5 * SLOWDOWN
        while True:
            fd = os.open(self.server.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                records = sockdiag.dump(fd, protocols=("udp" if udp else "tcp",), port=port,
                                        states=None if udp else ("LISTEN",))
            finally:
                os.close(fd)
            got = {r.cookie: r.rqueue for r in records if r.rqueue}
            # TCP: connections waiting in accept queues; UDP: sockets holding a datagram.
            arrived = len(got) if udp else sum(got.values())
            if arrived >= expect or time.monotonic() > deadline:
                return got
            time.sleep(0.05)

    def ask(self, daddr: str, port: int, udp: bool = False, src: str | None = None,
            sport: int | None = None, dev: str | None = None) -> deliver.Answer:
        return deliver.ask(deliver.Question(
            "udp" if udp else "tcp", address(daddr), port,
            address(src) if src else None, sport, dev, self.server.path))

    def close(self) -> None:
        for s in self.kept:
            s.close()
        self.kept.clear()


def cookie(s: socket.socket, udp: bool = False) -> int:
    """The kernel's cookie of a socket of ours (SO_COOKIE)."""
    return struct.unpack("<Q", s.getsockopt(socket.SOL_SOCKET, 57, 8))[0]


def _attach_cbpf(s: socket.socket, index: int) -> None:
    """SO_ATTACH_REUSEPORT_CBPF with a classic program returning ``index``:
    the group's member at that place takes every connection."""
    insns = (ctypes.c_uint64 * 1)(struct.unpack("<Q", struct.pack("<HBBI", 0x06, 0, 0, index))[0])
    prog = struct.pack("@HxxxxxxP", 1, ctypes.addressof(insns))
    s.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, prog)


def sh(ns: Netns, *cmd: str, input: str | None = None) -> None:
    proc = subprocess.run(["ip", "netns", "exec", ns.name, *cmd], input=input, text=True,
                          capture_output=True, timeout=60 * SLOWDOWN)
    assert proc.returncode == 0, f"{' '.join(cmd)}: {proc.stderr}"


@pytest.fixture(scope="module")
def scene() -> Iterator[Scene]:
    need_root()
    server, client = Netns(), Netns()
    iterators = SharedIterators()  # every ask shares one load of the iterator programs
    try:
        subprocess.run(["ip", "link", "add", SRV_DEV, "netns", server.name, "type", "veth",
                        "peer", "name", CLI_DEV, "netns", client.name], check=True, timeout=60)
        subprocess.run(["ip", "link", "add", OTHER_DEV, "netns", server.name, "type", "veth",
                        "peer", "name", OTHER_PEER, "netns", server.name], check=True, timeout=60)
        for ns, dev, addrs in ((server, SRV_DEV, (f"{SERVER}/24", f"{SERVER2}/24")),
                               (client, CLI_DEV, (f"{CLIENT}/24",)),
                               (server, OTHER_DEV, (f"{OTHER}/24",))):
            for a in addrs:
                sh(ns, "ip", "addr", "add", a, "dev", dev)
            sh(ns, "ip", "link", "set", dev, "up")
        sh(server, "ip", "-6", "addr", "add", f"{SERVER6}/64", "dev", SRV_DEV, "nodad")
        sh(client, "ip", "-6", "addr", "add", f"{CLIENT6}/64", "dev", CLI_DEV, "nodad")
        sh(server, "ip", "link", "set", OTHER_PEER, "up")
        scene = Scene(server, client)
        yield scene
        scene.close()
    finally:
        iterators.close()
        client.close()
        server.close()


@pytest.fixture
def s(scene: Scene) -> Iterator[Scene]:
    yield scene
    scene.close()


def winner(a: deliver.Answer) -> int | None:
    return a.winner.diag.cookie if a.winner else None


def rule_of(a: deliver.Answer, c: int) -> str:
    return next(rule for j, rule in deliver.losers(a) if j.endpoint.cookie == c)


# ---- TCP -------------------------------------------------------------------------------


def test_exact_address_over_wildcard_and_the_established_table(s: Scene) -> None:
    port = 8101
    wild = cookie(s.sock("0.0.0.0", port, reuseport=True))
    exact = cookie(s.sock(SERVER, port, reuseport=True))
    a = s.ask(SERVER, port)
    assert (a.outcome, a.decided_by, winner(a)) == ("socket", "exact", exact)
    assert rule_of(a, wild) == "step"
    c = s.connect(SERVER, port)
    assert set(s.received(port)) == {exact}
    b = s.ask(SERVER2, port)  # the other address of the device: only the wildcard has it
    assert (b.decided_by, winner(b)) == ("wildcard", wild)
    s.connect(SERVER2, port)
    assert set(s.received(port, expect=2)) == {exact, wild}
    # That exact client's next segment goes to its connection, not a listener.
    sport = c.getsockname()[1]
    e = s.ask(SERVER, port, src=CLIENT, sport=sport)
    assert e.decided_by == "established" and e.winner is not None
    assert (e.winner.diag.remote_addr, e.winner.diag.remote_port) == (CLIENT, sport)


def test_device_bound_over_unbound(s: Scene) -> None:
    port = 8102
    unbound = cookie(s.sock("0.0.0.0", port, reuseport=True))
    bound = cookie(s.sock("0.0.0.0", port, reuseport=True, dev=SRV_DEV))
    on_dev = s.ask(SERVER, port, dev=SRV_DEV)
    assert winner(on_dev) == bound and rule_of(on_dev, unbound) == "device"
    s.connect(SERVER, port)
    assert set(s.received(port)) == {bound}
    # Without --dev: the answer for a device no socket is bound to, and who
    # wins on the bound one.
    any_dev = s.ask(SERVER, port)
    assert winner(any_dev) == unbound and rule_of(any_dev, bound) == "other_device"
    assert [d["cookie"] for d in any_dev.devices] == [bound]
    # From the host itself, to the device's address: the packet goes through
    # lo, but the kernel takes the address's device as where it came from.
    local = s.ask(SERVER, port, src=SERVER)
    assert winner(local) == bound
    s.connect(SERVER, port, from_server=True)
    assert s.received(port, expect=2) == {bound: 2}
    # To an address of another device, that device: the unbound socket.
    other = s.ask(OTHER, port, src=SERVER)
    assert winner(other) == unbound and rule_of(other, bound) == "other_device"
    s.connect(OTHER, port, from_server=True)
    assert s.received(port, expect=3) == {bound: 2, unbound: 1}


def test_ipv4_socket_over_dual_stack_and_v6only_refusal(s: Scene) -> None:
    port = 8103
    v6 = cookie(s.sock("::", port, reuseport=True))
    v4 = cookie(s.sock("0.0.0.0", port, reuseport=True))
    a = s.ask(SERVER, port)
    assert winner(a) == v4 and rule_of(a, v6) == "ipv4"
    s.connect(SERVER, port)
    assert set(s.received(port)) == {v4}
    b = s.ask(SERVER6, port)
    assert winner(b) == v6 and rule_of(b, v4) == "other_family"
    s.connect(SERVER6, port)
    assert s.received(port, expect=2) == {v4: 1, v6: 1}
    s.close()
    only6 = cookie(s.sock("::", port, v6only=True))
    c = s.ask(SERVER, port)
    assert c.outcome == "nobody" and rule_of(c, only6) == "v6only"
    with pytest.raises(ConnectionRefusedError):
        s.connect(SERVER, port)


def test_reuseport_group_by_hash_and_by_bpf(s: Scene) -> None:
    port = 8104
    members = {cookie(s.sock("0.0.0.0", port, reuseport=True)) for _ in range(3)}
    a = s.ask(SERVER, port)
    assert a.selection == "hash" and {m.diag.cookie for m in a.members} == members
    for _ in range(8):
        s.connect(SERVER, port)
    got = s.received(port, expect=8)
    assert set(got) <= members and sum(got.values()) == 8
    s.close()
    first = cookie(s.sock("0.0.0.0", port + 1, reuseport=True))
    others = {cookie(s.sock("0.0.0.0", port + 1, reuseport=True)) for _ in range(1)}
    others.add(cookie(s.sock("0.0.0.0", port + 1, reuseport=True, cbpf=0)))
    b = s.ask(SERVER, port + 1)
    assert b.selection == "bpf" and {m.diag.cookie for m in b.members} == others | {first}
    for _ in range(4):
        s.connect(SERVER, port + 1)
    # The program returns 0: the member that joined first takes them all.
    assert s.received(port + 1, expect=4) == {first: 4}


# ---- UDP -------------------------------------------------------------------------------


def _udp_trio(s: Scene, port: int) -> tuple[int, int, int]:
    """A wildcard, an exact and a connected (to CLIENT:5555) UDP socket on ``port``."""
    wild = cookie(s.sock("0.0.0.0", port, udp=True, reuseaddr=True))
    exact = cookie(s.sock(SERVER, port, udp=True, reuseaddr=True))
    conn_sock = s.sock(SERVER, port, udp=True, reuseaddr=True)
    conn_sock.connect((CLIENT, 5555))
    return wild, exact, cookie(conn_sock)


def test_udp_connected_then_exact_then_wildcard(s: Scene) -> None:
    port = 8105
    wild, exact, conn = _udp_trio(s, port)
    from_peer = s.ask(SERVER, port, udp=True, src=CLIENT, sport=5555)
    assert winner(from_peer) == conn and rule_of(from_peer, exact) == "connected"
    s.send(SERVER, port, 5555)
    assert set(s.received(port, udp=True)) == {conn}
    s.close()  # empty queues for the next datagrams
    wild, exact, conn = _udp_trio(s, port)
    other = s.ask(SERVER, port, udp=True, src=CLIENT, sport=6666)
    assert winner(other) == exact and rule_of(other, conn) == "other_peer"
    assert rule_of(other, wild) == "step"
    s.send(SERVER, port, 6666)
    assert set(s.received(port, udp=True)) == {exact}
    anywhere = s.ask(SERVER2, port, udp=True)
    assert winner(anywhere) == wild and rule_of(anywhere, exact) == "other_address"
    s.send(SERVER2, port, 6667)
    assert set(s.received(port, udp=True, expect=2)) == {exact, wild}


# ---- programs and rules ----------------------------------------------------------------


def test_sk_lookup_program_steers_and_drops(s: Scene) -> None:
    port, target_port = 8106, 8107
    plain = cookie(s.sock("0.0.0.0", port))
    target_sock = s.sock("0.0.0.0", target_port)
    target = cookie(target_sock)
    with attach_steer(s.server.path, port, target_sock.fileno()) as steer:
        a = s.ask(SERVER, port)
        (run,) = a.programs
        assert run.program.prog_id == steer.prog_id
        if run.verdict == "unknown":  # a kernel that cannot test-run sk_lookup (before 5.14)
            assert "5.14" in run.why and winner(a) == plain
            assert [c["kind"] for c in a.changers][:1] == ["program_unknown"]
        else:
            assert (a.decided_by, winner(a)) == ("sk_lookup", target)
            assert rule_of(a, plain) == "sk_lookup"
        s.connect(SERVER, port)
        assert set(s.received(target_port)) == {target}  # the kernel: the program decided
        assert not s.received(port, expect=0)
    with attach_steer(s.server.path, port, None, drop=True):
        b = s.ask(SERVER, port)
        if b.programs[0].verdict != "unknown":
            assert (b.outcome, b.decided_by) == ("refused", "sk_lookup")
        with pytest.raises(ConnectionRefusedError):
            s.connect(SERVER, port)


def test_tproxy_rule_hands_it_to_the_transparent_socket(s: Scene) -> None:
    need_tool("nft")
    port, tport = 8108, 8109
    sh(s.server, "ip", "rule", "add", "fwmark", "1", "lookup", "100")
    sh(s.server, "ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "100")
    sh(s.server, "nft", "-f", "-", input=(
        "table inet portscope_deliver {\n chain pre {\n"
        "  type filter hook prerouting priority mangle; policy accept;\n"
        f'  iifname "{SRV_DEV}" tcp dport {port} meta mark set 1 tproxy ip to :{tport}\n }}\n}}\n'))
    try:
        plain = cookie(s.sock(SERVER, port))
        diverted = cookie(s.sock("0.0.0.0", tport, transparent=True))
        a = s.ask(SERVER, port, dev=SRV_DEV)
        assert (a.decided_by, winner(a)) == ("tproxy", diverted)
        assert [t["result"] for t in a.tproxy] == ["transparent"]
        s.connect(SERVER, port)
        assert set(s.received(tport)) == {diverted} and not s.received(port, expect=0)
        # From the host itself there is no prerouting: the plain listener.
        local = s.ask(SERVER, port, src=SERVER)
        assert winner(local) == plain and not local.tproxy
        # A transparent socket on the port is named as what a rule could
        # hand this traffic to, though the lookup does not pick it.
        spare = cookie(s.sock(SERVER2, port, transparent=True))
        named = s.ask(SERVER, port, src=SERVER)
        assert winner(named) == plain
        assert [c["cookie"] for c in named.changers if c["kind"] == "transparent"] == [spare]
        # An address the server does not own: delivered through the fwmark
        # rule's local table only.
        sh(s.client, "ip", "route", "add", f"{FOREIGN}/32", "via", SERVER)
        far = s.ask(FOREIGN, port, dev=SRV_DEV)
        assert (far.decided_by, winner(far)) == ("tproxy", diverted)
        s.connect(FOREIGN, port)
        assert s.received(tport, expect=2) == {diverted: 2}
        sh(s.server, "ip", "rule", "del", "fwmark", "1", "lookup", "100")
        unrouted = s.ask(FOREIGN, port, dev=SRV_DEV)
        assert unrouted.outcome == "not_local"
        assert [t["result"] for t in unrouted.tproxy] == ["not_routed_locally"]
        s.connect_nowait(FOREIGN, port)  # routed on (forwarding is off): nobody takes it
        time.sleep(0.1 * SLOWDOWN)  # a veth hop takes microseconds; emulated, 5 s is ample
        assert s.received(tport, expect=0) == {diverted: 2}
    finally:
        sh(s.server, "nft", "delete", "table", "inet", "portscope_deliver")
        subprocess.run(["ip", "netns", "exec", s.server.name, "ip", "rule", "del", "fwmark", "1",
                        "lookup", "100"], capture_output=True, timeout=60 * SLOWDOWN)


# ---- the command -----------------------------------------------------------------------


def test_command_line_answers_exit_codes_and_refusals(
        s: Scene, capsys: pytest.CaptureFixture[str]) -> None:
    port = 8110
    # Two listeners of two processes (same uid, SO_REUSEPORT): the answer
    # names each one's process.
    service, intruder = Actor(s.server, comm=b"service"), Actor(s.server, comm=b"intruder")
    for actor, addr in ((service, "0.0.0.0"), (intruder, SERVER)):
        fd = actor.socket("tcp", reuseport=True)
        assert actor.bind(fd, addr, port).ok and actor.listen(fd).ok
    # Once as a process of its own, as an operator runs it.
    ok = subprocess.run([*PORTSCOPE, "deliver", f"{SERVER}:{port}", "--netns", s.server.path,
                         "--json"], capture_output=True, text=True, timeout=120 * SLOWDOWN)
    assert ok.returncode == 0, ok.stderr
    doc = json.loads(ok.stdout)
    assert (doc["outcome"], doc["decided_by"]) == ("socket", "exact")
    assert [o["pid"] for o in doc["socket"]["owners"]] == [intruder.pid]
    assert [([o["pid"] for o in other["socket"]["owners"]], other["rule"])
            for other in doc["others"]] == [([service.pid], "step")]

    # The rest through the same entry point in this process (a start of the
    # interpreter costs ~18 s on an emulated kernel).
    def run(*args: str) -> tuple[int, str, str]:
        status = main(["deliver", *args, "--netns", s.server.path])
        out, err = capsys.readouterr()
        return status, out, err

    status, out, _ = run(f"{SERVER}:{port}")
    assert status == 0 and f"goes to {SERVER}:{port} (LISTEN) of intruder[{intruder.pid}]" in out
    assert f"0.0.0.0:{port} (LISTEN) of service[{service.pid}]: loses" in out
    status, out, _ = run(f"{SERVER}:{port + 1}")
    assert status == 5 and "no socket takes it" in out
    status, out, _ = run(f"10.99.0.1:{port}", "--json")
    assert status == 5 and json.loads(out)["outcome"] == "not_local"
    # What only the namespace can refuse (the parse errors are unit tests:
    # tests/unit/test_lookup.py).
    status, _, err = run(f"{SERVER}:80", "--dev", "nosuch0")
    assert status == 2 and "no network device 'nosuch0'" in err
    assert len(err.strip().splitlines()) == 1
