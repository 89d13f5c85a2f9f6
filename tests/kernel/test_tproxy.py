"""TPROXY rules (tracer/tproxy.py) against the kernel: the rules are made for
real with nft and iptables in a private namespace, read back by
tproxy_rules(), and then a real connection (and a real datagram) from a second
namespace over a veth pair shows where the kernel delivers it.

The kernel is the oracle for what a rule does: with an IP_TRANSPARENT listener
on the rule's port the connection to 10.77.0.2:8080 is accepted there (and its
local address is still 8080); with a plain listener on that port the kernel
ignores the rule and the listener on 8080 gets it. matches() must agree with
the rule's reach (8080 on the veth, not 8081).

Lean on purpose: one pair of namespaces for the module, a flushed ruleset per
test, so that it stays within ~90 s under software emulation."""

from __future__ import annotations

import select
import socket
import subprocess
from typing import Any, Iterator

import pytest
from harness import Actor, Netns, _ActorServer

from tests.needs import SLOWDOWN, missing, need_root, need_tool
from tracer.tproxy import matches, policy_routing, tproxy_rules

SERVER, CLIENT = "10.77.0.2", "10.77.0.1"
SERVER_DEV, CLIENT_DEV = "tpv0", "tpv1"
PORT, TPROXY_PORT, OTHER_PORT = 8080, 9090, 8081
UDP_PORT, UDP_TPROXY_PORT = 5353, 9091
WAIT_S = 5.0 * SLOWDOWN


# ---- steps the actors take for these tests (the harness forks actors from this
# process, so methods added to its server class here exist in the children) -----


def _op_tp_which(self: _ActorServer, fds: list[int], timeout: float) -> dict[str, Any]:
    """Which of the sockets ``fds`` got the connection (TCP, accepted) or the
    datagram (UDP), and the local and remote address of what arrived."""
    socks = [self.sockets[fd] for fd in fds]
    ready = select.select(socks, [], [], timeout)[0]
    if not ready:
        raise TimeoutError(f"nothing arrived on {fds} within {timeout}s")
    sock = ready[0]
    if sock.type == socket.SOCK_STREAM:
        conn, peer = sock.accept()
        local = conn.getsockname()
        conn.close()
    else:
        _, peer = sock.recvfrom(2048)
        local = sock.getsockname()
    return {"fd": sock.fileno(), "local": list(local), "peer": list(peer),
            "also_ready": [s.fileno() for s in ready[1:]]}


def _op_tp_send(self: _ActorServer, fd: int, addr: str, port: int) -> None:
    self.sockets[fd].sendto(b"portscope", (addr, port))


_ActorServer.op_tp_which = _op_tp_which  # type: ignore[attr-defined]
_ActorServer.op_tp_send = _op_tp_send  # type: ignore[attr-defined]


def which(actor: Actor, fds: list[int]) -> dict[str, Any]:
    return actor._call("tp_which", fds, WAIT_S)


# ---- the two namespaces ---------------------------------------------------------


def sh(ns: Netns, *cmd: str, input: str | None = None) -> str:
    done = subprocess.run(["ip", "netns", "exec", ns.name, *cmd], input=input,
                          capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[Netns, Netns]]:
    need_root()
    for tool in ("nft", "iptables", "iptables-save", "ip6tables-save"):
        need_tool(tool)
    server, client = Netns(), Netns()
    try:
        subprocess.run(["ip", "link", "add", SERVER_DEV, "netns", server.name, "type", "veth",
                        "peer", "name", CLIENT_DEV, "netns", client.name], check=True, timeout=60)
        sh(server, "ip", "addr", "add", f"{SERVER}/24", "dev", SERVER_DEV)
        sh(server, "ip", "link", "set", SERVER_DEV, "up")
        sh(client, "ip", "addr", "add", f"{CLIENT}/24", "dev", CLIENT_DEV)
        sh(client, "ip", "link", "set", CLIENT_DEV, "up")
        # What TPROXY needs to deliver a destination the host does not own.
        sh(server, "ip", "rule", "add", "fwmark", "1", "lookup", "100")
        sh(server, "ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "100")
        yield server, client
    finally:
        client.close()
        server.close()


@pytest.fixture
def rules(pair: tuple[Netns, Netns]) -> Iterator[tuple[Netns, Netns]]:
    server, _ = pair
    sh(server, "nft", "flush", "ruleset")  # also the tables iptables-nft made
    yield pair
    for actor in list(server.actors) + list(pair[1].actors):
        actor.kill()
    server.actors.clear()
    pair[1].actors.clear()
    sh(server, "nft", "flush", "ruleset")


NFT_RULES = f"""
table inet portscope {{
  chain prerouting {{
    type filter hook prerouting priority mangle; policy accept;
    iifname "{SERVER_DEV}" ip daddr {SERVER} tcp dport {PORT} meta mark set 1 tproxy ip to :{TPROXY_PORT}
    udp dport {UDP_PORT} meta mark set 1 tproxy ip to :{UDP_TPROXY_PORT}
  }}
}}
"""


def add_nft(server: Netns) -> None:
    try:
        sh(server, "nft", "-f", "-", input=NFT_RULES)
    except AssertionError as exc:  # a kernel without nft_tproxy (or not loadable here)
        missing(f"the kernel refuses an nft tproxy rule: {exc}")


def listeners(server: Netns, transparent: bool) -> tuple[Actor, dict[int, str]]:
    """An actor with plain listeners on SERVER:PORT and SERVER:OTHER_PORT and
    one on *:TPROXY_PORT (IP_TRANSPARENT or not); their names by fd."""
    actor = Actor(server)
    names = {}
    for name, addr, port, options in (("plain", SERVER, PORT, {}), ("other", SERVER, OTHER_PORT, {}),
                                      ("diverted", "0.0.0.0", TPROXY_PORT,
                                       {"transparent": transparent})):
        fd = actor.socket("tcp", reuseaddr=True, **options)
        assert actor.bind(fd, addr, port).ok
        assert actor.listen(fd).ok
        names[fd] = name
    return actor, names


def delivered(server: Netns, client: Netns, transparent: bool,
              ports: tuple[int, ...] = (PORT,)) -> list[str]:
    """The listeners, then a real connection from ``client`` to SERVER:port
    for each of ``ports``: which listener accepted each one."""
    actor, names = listeners(server, transparent)
    peer = Actor(client)
    accepted = []
    for port in ports:
        fd = peer.socket("tcp")
        truth = peer.connect(fd, SERVER, port)
        assert truth.ok, truth.describe()
        got = which(actor, list(names))
        assert got["local"] == [SERVER, port]  # the client's destination, even when diverted
        assert got["peer"][0] == CLIENT
        accepted.append(names[got["fd"]])
    return accepted


def test_nft_rule_read_and_matched(rules: tuple[Netns, Netns]) -> None:
    server, _ = rules
    add_nft(server)
    scan = tproxy_rules(server.name)
    assert "nft" in scan.tools
    assert scan.problems == []
    tcp = [r for r in scan.rules if r.protocol == "tcp"]
    assert len(tcp) == 1 and len(scan.rules) == 2, scan.rules
    rule = tcp[0]
    assert (rule.netns, rule.source, rule.table, rule.chain) == \
        (server.inode, "nft", "inet portscope", "prerouting")
    assert (rule.family, rule.dports, rule.daddrs, rule.iifs) == \
        ("ipv4", ((PORT, PORT),), (f"{SERVER}/32",), (SERVER_DEV,))
    assert (rule.to_addr, rule.to_port, rule.mark, rule.understood) == (None, TPROXY_PORT, "0x1", True)
    assert f"tproxy ip to :{TPROXY_PORT}" in rule.text
    assert matches(rule, "tcp", "ipv4", SERVER, PORT, SERVER_DEV) is True
    assert matches(rule, "tcp", "ipv4", SERVER, OTHER_PORT, SERVER_DEV) is False
    assert matches(rule, "udp", "ipv4", SERVER, PORT, SERVER_DEV) is False
    assert matches(rule, "tcp", "ipv4", SERVER, PORT, "lo") is False
    assert matches(rule, "tcp", "ipv4", SERVER, PORT, None) is None
    assert rule.to_json()["dports"] == [[PORT, PORT]]
    routing = policy_routing(server.name)
    assert routing.problems == []
    assert routing.delivers(rule.mark, "ipv4") is True
    assert routing.delivers("0x2", "ipv4") is False


def test_transparent_listener_takes_the_connection(rules: tuple[Netns, Netns]) -> None:
    server, client = rules
    add_nft(server)
    # 8080 matches the rule (matches() says True), 8081 does not (False).
    assert delivered(server, client, transparent=True, ports=(PORT, OTHER_PORT)) == \
        ["diverted", "other"]


def test_rule_ignored_without_ip_transparent(rules: tuple[Netns, Netns]) -> None:
    server, client = rules
    add_nft(server)
    assert delivered(server, client, transparent=False) == ["plain"]


def test_udp_datagram_goes_to_the_transparent_socket(rules: tuple[Netns, Netns]) -> None:
    server, client = rules
    add_nft(server)
    rule = next(r for r in tproxy_rules(server.name).rules if r.protocol == "udp")
    assert (rule.family, rule.dports, rule.to_port, rule.iifs) == \
        ("ipv4", ((UDP_PORT, UDP_PORT),), UDP_TPROXY_PORT, None)
    assert matches(rule, "udp", "ipv4", SERVER, UDP_PORT, None) is True
    actor = Actor(server)
    plain = actor.socket("udp")
    assert actor.bind(plain, SERVER, UDP_PORT).ok
    diverted = actor.socket("udp", transparent=True)
    assert actor.bind(diverted, "0.0.0.0", UDP_TPROXY_PORT).ok
    sender = Actor(client)
    fd = sender.socket("udp")
    sender._call("tp_send", fd, SERVER, UDP_PORT)
    got = which(actor, [plain, diverted])
    assert got["fd"] == diverted, got
    assert got["peer"][0] == CLIENT


def test_iptables_rule_read_and_obeyed(rules: tuple[Netns, Netns]) -> None:
    server, client = rules
    try:
        sh(server, "iptables", "-t", "mangle", "-A", "PREROUTING", "-p", "tcp", "--dport", str(PORT),
           "-j", "TPROXY", "--on-port", str(TPROXY_PORT), "--tproxy-mark", "1")
    except AssertionError as exc:
        missing(f"the kernel refuses an iptables TPROXY rule: {exc}")
    scan = tproxy_rules(server.name)
    assert {"iptables-save", "ip6tables-save"} <= set(scan.tools)
    assert scan.problems == []
    # iptables-nft also shows it to nft as "xt target TPROXY": listed once.
    assert len(scan.rules) == 1, scan.rules
    rule = scan.rules[0]
    assert (rule.netns, rule.source, rule.table, rule.chain) == \
        (server.inode, "iptables", "mangle", "PREROUTING")
    assert (rule.family, rule.protocol, rule.dports, rule.daddrs, rule.iifs) == \
        ("ipv4", "tcp", ((PORT, PORT),), None, None)
    assert (rule.to_addr, rule.to_port, rule.mark, rule.understood) == (None, TPROXY_PORT, "0x1", True)
    assert "-j TPROXY" in rule.text
    assert matches(rule, "tcp", "ipv4", SERVER, PORT, SERVER_DEV) is True
    assert matches(rule, "tcp", "ipv4", SERVER, OTHER_PORT, SERVER_DEV) is False
    assert delivered(server, client, transparent=True, ports=(PORT, OTHER_PORT)) == \
        ["diverted", "other"]


def test_namespace_without_rules(rules: tuple[Netns, Netns]) -> None:
    _, client = rules
    scan = tproxy_rules(client.inode)
    assert scan.rules == [] and scan.problems == []
    assert set(scan.tools) == {"nft", "iptables-save", "ip6tables-save"}
    routing = policy_routing(client.name)
    assert routing.delivers("0x1", "ipv4") is False
