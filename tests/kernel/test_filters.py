"""The filters people know from ss (--sport, --dport, --src, --dst, --pid,
--comm, --uid, --unit, --netns, ss's state names), end to end: `portscope
ports/why/timewait/groups/trace` run as a user runs them against real
sockets in private namespaces, held by processes with distinct pids, names,
uids and systemd units. What each filter must return is derived from the
sockets made here, never from portscope's own output.

These prove portscope's presentation, not the kernel's behaviour: the
kernel matrix runs them natively only (NATIVE_ONLY in scripts/kernel-matrix)."""

from __future__ import annotations

import ipaddress
import json
import os
import random
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest
from harness import Actor, Netns

from tests.needs import SLOWDOWN, missing
from tracer.cgroups import cgroup2_root

REPO = Path(__file__).resolve().parents[2]
ALIAS = "10.20.30.1"  # a second IPv4 address, on lo of the namespace


def portscope(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tracer.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def addr_text(family: str, addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if family == "ipv6" else f"{addr}:{port}"


@dataclass(frozen=True)
class Made:
    """One socket made here, as the test knows it."""

    protocol: str
    family: str
    state: str
    laddr: str
    lport: int
    raddr: str
    rport: int
    owner: "Who"

    @property
    def key(self) -> tuple[str, str, str]:
        remote = addr_text(self.family, self.raddr, self.rport) if self.rport else \
            addr_text(self.family, "::" if self.family == "ipv6" else "0.0.0.0", 0)
        return (self.protocol, addr_text(self.family, self.laddr, self.lport), remote)


@dataclass(frozen=True)
class Who:
    actor: Actor
    comm: str
    uid: int
    unit: str

    @property
    def pid(self) -> int:
        return self.actor.pid


class Scene:
    """A namespace with sockets of three processes (web, db, cli)."""

    def __init__(self, ns: Netns, cgroups: list[str]) -> None:
        self.ns = ns
        self.made: list[Made] = []
        root = cgroup2_root()
        if not root or not os.access(root, os.W_OK):
            missing("needs a writable cgroup2 hierarchy (to put processes in systemd units)")
        tag = secrets.token_hex(3)
        self.web = self._who(f"psf-web{tag}", 0, f"psf-{tag}-web.service", root, cgroups)
        self.db = self._who(f"psf-db{tag}", 1000, f"psf-{tag}-db.service", root, cgroups)
        self.cli = self._who(f"psf-cli{tag}", 2000, f"psf-{tag}-cli.service", root, cgroups)
        base = random.randint(20000, 29000)
        self.p_web4, self.p_web6, self.p_udp, self.p_db, self.p_other = range(base, base + 5)
        web, db, cli = self.web, self.db, self.cli
        # web: listeners on 127.0.0.1 and [::1], an unconnected UDP socket on the alias
        l4 = self._listen(web, "ipv4", "127.0.0.1", self.p_web4)
        l6 = self._listen(web, "ipv6", "::1", self.p_web6)
        u = web.actor.socket("udp", "ipv4")
        web.actor.bind(u, ALIAS, self.p_udp)
        self.made.append(Made("udp", "ipv4", "CLOSE", ALIAS, self.p_udp, "", 0, web))
        # db (uid 1000): a listener on the alias
        ldb = self._listen(db, "ipv4", ALIAS, self.p_db)
        # cli (uid 2000): connections to each, accepted by their servers
        self._connect(cli, "ipv4", ALIAS, self.p_db, db, ldb)
        self._connect(cli, "ipv6", "::1", self.p_web6, web, l6)
        self._connect(cli, "ipv6", "::ffff:127.0.0.1", self.p_web4, web, l4, server_family="ipv4",
                      server_addr="127.0.0.1")

    def _who(self, comm: str, uid: int, unit: str, root: str, cgroups: list[str]) -> Who:
        actor = Actor(self.ns, uid=uid, comm=comm.encode())
        path = os.path.join(root, unit)
        os.mkdir(path)
        cgroups.append(path)
        with open(os.path.join(path, "cgroup.procs"), "w") as f:
            f.write(str(actor.pid))
        return Who(actor, comm[:15], uid, unit)

    def _listen(self, who: Who, family: str, addr: str, port: int) -> int:
        fd = who.actor.socket("tcp", family)
        assert who.actor.bind(fd, addr, port).ok
        who.actor.listen(fd)
        self.made.append(Made("tcp", family, "LISTEN", addr, port, "", 0, who))
        return fd

    def _connect(self, who: Who, family: str, addr: str, port: int, server: Who, lfd: int,
                 server_family: str | None = None, server_addr: str | None = None) -> None:
        fd = who.actor.socket("tcp", family)
        truth = who.actor.connect(fd, addr, port)
        assert truth.ok, truth.describe()
        server.actor.accept(lfd)
        self.made.append(Made("tcp", family, "ESTABLISHED", truth.bound_addr, truth.bound_port,
                              addr, port, who))
        sf = server_family or family
        self.made.append(Made("tcp", sf, "ESTABLISHED", server_addr or addr, port,
                              truth.bound_addr if sf == family else "127.0.0.1",
                              truth.bound_port, server))

    def expect(self, keep: Callable[[Made], bool]) -> set[tuple[str, str, str]]:
        return {m.key for m in self.made if keep(m)}


@pytest.fixture(scope="module")
def scene(root: None) -> Iterator[Scene]:
    ns = Netns()
    cgroups: list[str] = []
    try:
        subprocess.run(["ip", "-n", ns.name, "addr", "add", f"{ALIAS}/32", "dev", "lo"],
                       check=True, capture_output=True, timeout=30)
        yield Scene(ns, cgroups)
    finally:
        ns.close()
        for path in cgroups:
            for _ in range(50):
                try:
                    os.rmdir(path)
                    break
                except OSError:
                    time.sleep(0.1)


def listed(scene: Scene, *args: str) -> set[tuple[str, str, str]]:
    result = portscope("ports", "--json", "--netns", scene.ns.name, *args)
    assert result.returncode == 0, result.stderr
    return {(s["protocol"], s["local"], s["remote"]) for s in json.loads(result.stdout)["sockets"]}


def in_net(addr: str, prefix: str) -> bool:
    a = ipaddress.ip_address(addr)
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped:
        a = a.ipv4_mapped
    n = ipaddress.ip_network(prefix)
    return a.version == n.version and a in n


def test_ports_each_filter_returns_exactly_the_sockets_it_names(scene: Scene) -> None:
    s = scene
    assert listed(s) == s.expect(lambda m: True), "the scene as made, unfiltered"
    cases: list[tuple[tuple[str, ...], Callable[[Made], bool]]] = [
        (("--sport", str(s.p_web4)), lambda m: m.lport == s.p_web4),
        (("--sport", f":{s.p_db}", "--sport", str(s.p_udp)), lambda m: m.lport in (s.p_db, s.p_udp)),
        (("--dport", str(s.p_db)), lambda m: m.rport == s.p_db),
        (("--src", "10.20.30.0/24"), lambda m: in_net(m.laddr, "10.20.30.0/24")),
        (("--src", "::1"), lambda m: m.laddr == "::1"),
        (("--dst", "::1"), lambda m: m.rport and m.raddr == "::1"),
        # the IPv4-mapped client socket to 127.0.0.1 matches its IPv4 form, both ways
        (("--dst", "127.0.0.1"), lambda m: m.rport and in_net(m.raddr, "127.0.0.1/32")),
        (("--src", "::ffff:127.0.0.0/104"), lambda m: in_net(m.laddr, "127.0.0.0/8")),
        (("--pid", str(s.db.pid)), lambda m: m.owner is s.db),
        (("--comm", s.cli.comm), lambda m: m.owner is s.cli),
        (("--comm", s.web.comm, "--comm", s.db.comm), lambda m: m.owner in (s.web, s.db)),
        (("--uid", "1000"), lambda m: m.owner.uid == 1000),
        (("--unit", s.web.unit), lambda m: m.owner is s.web),
        (("--unit", s.db.unit.removesuffix(".service")), lambda m: m.owner is s.db),
        (("--comm", s.cli.comm, "--dport", str(s.p_web6)),
         lambda m: m.owner is s.cli and m.rport == s.p_web6),
        (("--state", "estab"), lambda m: m.state == "ESTABLISHED"),
        (("--state", "LISTENING", "--uid", "0"), lambda m: m.state == "LISTEN" and m.owner.uid == 0),
        (("--state", "unconn"), lambda m: m.state == "CLOSE"),
        (("--state", "connected"), lambda m: m.state not in ("LISTEN", "CLOSE")),
    ]
    for args, keep in cases:
        want = s.expect(keep)
        assert want, f"{args}: the scene has no such socket: the case proves nothing"
        assert listed(s, *args) == want, args
    assert listed(s, "--state", "estab") == listed(s, "--state", "established")
    assert listed(s, "--pid", str(s.cli.pid), "--comm", s.web.comm) == set(), \
        "every process criterion must hold for one holder"


def test_ports_netns_chooses_the_namespace(scene: Scene) -> None:
    other = Netns()
    try:
        a = Actor(other)
        fd = a.socket("tcp")
        a.bind(fd, "127.0.0.1", scene.p_web4)
        a.listen(fd)
        both = portscope("ports", "--json", "--sport", str(scene.p_web4), "--state", "listen",
                         "--netns", scene.ns.name, "--netns", str(other.inode))
        assert both.returncode == 0, both.stderr
        netns = sorted(s["netns"] for s in json.loads(both.stdout)["sockets"])
        assert netns == sorted([scene.ns.inode, other.inode])
        one = portscope("ports", "--json", "--sport", str(scene.p_web4), "--state", "listen",
                        "--netns", f"pid:{a.pid}")
        assert [s["netns"] for s in json.loads(one.stdout)["sockets"]] == [other.inode]
    finally:
        other.close()


def test_udp_is_unconn_in_text_and_close_in_json(scene: Scene) -> None:
    text = portscope("ports", "--udp", "--netns", scene.ns.name, "--sport", str(scene.p_udp))
    assert text.returncode == 0, text.stderr
    row = [line for line in text.stdout.splitlines() if f":{scene.p_udp}" in line]
    assert len(row) == 1 and " UNCONN " in row[0] and " CLOSE " not in row[0], text.stdout
    assert scene.web.comm in row[0]
    doc = json.loads(portscope("ports", "--json", "--udp", "--netns", scene.ns.name,
                               "--sport", str(scene.p_udp)).stdout)
    assert [s["state"] for s in doc["sockets"]] == ["CLOSE"]


def why(scene: Scene, port: int, addr: str, *args: str) -> dict:
    result = portscope("why", str(port), "--addr", addr, "--netns", scene.ns.name, "--json", *args)
    assert result.returncode == 5, result.stderr
    return json.loads(result.stdout)


def test_why_lists_only_the_blockers_the_filters_match(scene: Scene) -> None:
    s = scene
    port = s.p_web4
    # A bind to 127.0.0.1:port meets web's listener and the connection it accepted.
    everything = why(s, port, "127.0.0.1")
    keys = {(b["state"], b["remote"]) for b in everything["blockers"]}
    accepted = [m for m in s.made if m.owner is s.web and m.lport == port and m.rport]
    assert keys == {("LISTEN", "0.0.0.0:0")} | {("ESTABLISHED", f"127.0.0.1:{m.rport}")
                                                  for m in accepted}
    assert everything["blockers_filtered_out"] == 0
    by_peer = why(s, port, "127.0.0.1", "--dport", str(accepted[0].rport))
    assert [(b["state"], b["remote"]) for b in by_peer["blockers"]] == \
        [("ESTABLISHED", f"127.0.0.1:{accepted[0].rport}")]
    assert by_peer["blockers_filtered_out"] == 1 and by_peer["blockers_total"] == 1
    nobody = why(s, port, "127.0.0.1", "--comm", s.db.comm)
    assert nobody["blockers"] == [] and nobody["blockers_filtered_out"] == len(keys)
    assert nobody["verdict"] == "conflict", "the filters choose what is listed, not the verdict"
    for args in (("--comm", s.web.comm), ("--pid", str(s.web.pid)), ("--unit", s.web.unit),
                 ("--uid", "0"), ("--src", "127.0.0.0/8")):
        assert len(why(s, port, "127.0.0.1", *args)["blockers"]) == len(keys), args
    text = portscope("why", str(port), "--addr", "127.0.0.1", "--netns", s.ns.name,
                     "--comm", s.db.comm)
    assert f"({len(keys)} other blocker(s) do not match the filters)" in text.stdout
    udp = portscope("why", str(s.p_udp), "--udp", "--addr", ALIAS, "--netns", s.ns.name)
    assert "blocked by UNCONN" in udp.stdout, udp.stdout


def test_groups_filters(scene: Scene) -> None:
    s = scene
    tcp_port, udp_port = s.p_other, s.p_other + 1
    for _ in range(2):  # a TCP group of web's, a UDP group of db's
        fd = s.web.actor.socket("tcp", reuseport=True)
        assert s.web.actor.bind(fd, "127.0.0.1", tcp_port).ok
        s.web.actor.listen(fd)
        fd = s.db.actor.socket("udp", reuseport=True)
        assert s.db.actor.bind(fd, ALIAS, udp_port).ok

    def groups(*args: str) -> set[tuple[str, str]]:
        result = portscope("groups", "--json", "--interval", "0.2", "--netns", s.ns.name, *args)
        assert result.returncode == 0, result.stderr
        return {(g["protocol"], g["local"]) for g in json.loads(result.stdout)["groups"]}

    tcp, udp = ("tcp", f"127.0.0.1:{tcp_port}"), ("udp", f"{ALIAS}:{udp_port}")
    assert groups() == {tcp, udp}
    assert groups("--comm", s.db.comm) == {udp}
    assert groups("--pid", str(s.web.pid)) == {tcp}
    assert groups("--uid", "1000") == {udp}
    assert groups("--unit", s.web.unit) == {tcp}
    assert groups("--sport", str(tcp_port)) == {tcp}
    assert groups("--src", "10.0.0.0/8") == {udp}
    assert groups("--comm", s.cli.comm) == set()
    refused = portscope("groups", "--dport", "80", "--netns", s.ns.name)
    assert refused.returncode == 2 and "no remote end" in refused.stderr


def test_timewait_filters(scene: Scene) -> None:
    """TIME_WAIT sockets, filtered by their ends, and by the process that
    closed them (recorded by a running collector: a trace)."""
    s = scene
    collector = subprocess.Popen([sys.executable, "-m", "tracer.cli", "trace", "--netns",
                                  s.ns.name], cwd=REPO, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
    try:
        line = collector.stderr.readline() if collector.stderr else ""
        assert "tracing with" in line, line
        closed = []
        for addr, port, server in (("127.0.0.1", s.p_web4, s.web), (ALIAS, s.p_db, s.db)):
            # a fresh listener each, so that the accepted sockets of the scene stay
            lfd = server.actor.socket("tcp")
            lport = port + 100
            assert server.actor.bind(lfd, addr, lport).ok
            server.actor.listen(lfd)
            fd = s.cli.actor.socket("tcp")
            truth = s.cli.actor.connect(fd, addr, lport)
            accepted = server.actor.accept(lfd)
            s.cli.actor.close(fd)  # the client closes first: its end goes to TIME_WAIT
            server.actor.close(accepted)
            s.cli.actor.wait_tcp_states(truth.bound_port, lambda states: "TIME_WAIT" in states)
            closed.append((addr, lport, truth.bound_port))
        time.sleep(0.3 * SLOWDOWN)

        def remotes(*args: str) -> dict[str, int]:
            result = portscope("timewait", "--json", "--by", "remote", "--netns", s.ns.name, *args)
            assert result.returncode == 0, result.stderr
            return {g["key"]: g["count"] for g in json.loads(result.stdout)["groups"]}

        web_peer, db_peer = (f"{a}:{p}" for a, p, _ in closed)
        assert remotes() == {web_peer: 1, db_peer: 1}
        assert remotes("--dport", str(closed[0][1])) == {web_peer: 1}
        assert remotes("--dst", "10.20.30.0/24") == {db_peer: 1}
        assert remotes("--src", "127.0.0.1") == {web_peer: 1}
        assert remotes("--sport", str(closed[1][2])) == {db_peer: 1}
        assert remotes("--comm", s.cli.comm) == {web_peer: 1, db_peer: 1}
        assert remotes("--uid", "2000", "--dport", str(closed[1][1])) == {db_peer: 1}
        assert remotes("--pid", str(s.cli.pid)) == {web_peer: 1, db_peer: 1}
        assert remotes("--comm", s.web.comm) == {}
        tw = portscope("ports", "--json", "--netns", s.ns.name, "--state", "time-wait",
                       "--comm", s.cli.comm)
        assert len(json.loads(tw.stdout)["sockets"]) == 2, tw.stdout
    finally:
        collector.terminate()
        collector.wait(timeout=30)


CONFLICT = """
import os, socket, sys
port = int(sys.argv[1])
a = socket.socket(); a.bind(("127.0.0.1", port)); a.listen()
b = socket.socket()
try:
    b.bind(("127.0.0.1", port)); err = 0
except OSError as e:
    err = e.errno
print(os.getpid(), err, flush=True)
"""


def test_trace_netns_reports_one_namespace_only(root: None) -> None:
    first, second = Netns(), Netns()
    try:
        port = random.randint(30000, 39999)
        tracer = subprocess.Popen([sys.executable, "-m", "tracer.cli", "trace", "--json",
                                   "--netns", first.name, "--no-explain"], cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            line = tracer.stderr.readline() if tracer.stderr else ""
            assert "tracing with" in line, line
            pids = {}
            for ns in (second, first):  # the unwanted one first: it must not show
                out = subprocess.run(["ip", "netns", "exec", ns.name, sys.executable, "-c",
                                      CONFLICT, str(port)], capture_output=True, text=True,
                                     timeout=30, check=True).stdout.split()
                assert out[1] == "98", out  # EADDRINUSE
                pids[ns.name] = int(out[0])
            time.sleep(1.0 * SLOWDOWN)
        finally:
            tracer.terminate()
            stdout, _ = tracer.communicate(timeout=30)
        events = [json.loads(line) for line in stdout.splitlines() if line.strip()]
        assert [(e["pid"], e["netns"], e["port"]) for e in events] == \
            [(pids[first.name], first.inode, port)], events
    finally:
        first.close()
        second.close()


def test_trace_filters_on_events(root: None) -> None:
    """--sport, --dport, --dst and --comm on the calls of one namespace:
    two failed connects (nothing listens), two failed binds, one matching."""
    ns = Netns()
    try:
        port = random.randint(30000, 39999)
        a = Actor(ns, comm=b"psf-tracee")
        tracer = subprocess.Popen([sys.executable, "-m", "tracer.cli", "trace", "--json",
                                   "--netns", str(ns.inode), "--no-explain", "--comm",
                                   "psf-tracee", "--dport", str(port), "--dst", "127.0.0.0/8"],
                                  cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        try:
            line = tracer.stderr.readline() if tracer.stderr else ""
            assert "tracing with" in line, line
            a.connect(a.socket("tcp"), "127.0.0.1", port + 1)  # another port: not shown
            a.connect(a.socket("tcp", "ipv6"), "::1", port)  # not in 127/8: not shown
            a.bind(a.socket("tcp"), "10.9.9.9", port)  # a bind: no remote end
            a.connect(a.socket("tcp"), "127.0.0.1", port)  # shown
            time.sleep(1.0 * SLOWDOWN)
        finally:
            tracer.terminate()
            stdout, _ = tracer.communicate(timeout=30)
        events = [json.loads(line) for line in stdout.splitlines() if line.strip()]
        assert [(e["call"], e["addr"], e["port"], e["comm"]) for e in events] == \
            [("connect", "127.0.0.1", port, "psf-tracee")], events
    finally:
        ns.close()
