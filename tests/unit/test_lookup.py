"""The lookup rules (tracer/lookup.py) on sockets written by hand, and the
deliver answer's text with hostile owners.

The kernel is the oracle for these rules: tests/kernel/test_deliver.py
checks each kind of answer with real connections on every kernel of the
matrix. These cases pin the rules' edges that a real scenario reaches only
with effort (equal scores, unknown IPV6_V6ONLY, VRF devices, UDP peers).
"""

from __future__ import annotations

import ipaddress

import pytest

from tests.hostile import NAMES, assert_safe
from tracer import deliver, lookup
from tracer.inventory import Socket
from tracer.lookup import Endpoint, Packet
from tracer.records import Owner
from tracer.sockdiag import SockRecord
from tracer.sockflags import SockFlags

A = ipaddress.ip_address


def ep(cookie: int, addr: str, state: str = "LISTEN", dev: int = 0, family: str | None = None,
       v6only: bool | None = False, raddr: str | None = None, rport: int = 0, group: int = 0,
       ) -> Endpoint:
    fam = family or ("ipv6" if ":" in addr else "ipv4")
    any_ = "::" if fam == "ipv6" else "0.0.0.0"
    return Endpoint(cookie, fam, state, A(addr), 80, A(raddr or any_), rport, dev, v6only,
                    reuseport=bool(group), group=group, group_size=2 if group else 0)


def packet(daddr: str = "10.0.0.5", protocol: str = "tcp", saddr: str | None = None,
           sport: int | None = None, dif: int = 0, sdif: int = 0, accept: bool = False) -> Packet:
    fam = "ipv6" if ":" in daddr else "ipv4"
    return Packet(protocol, fam, A(daddr), 80, A(saddr) if saddr else None, sport, dif, sdif, accept)


def decide(eps: list[Endpoint], p: Packet) -> lookup.Step:
    judge = lookup.judge_listener if p.protocol == "tcp" else lookup.judge_udp
    judged = [judge(e, p) for e in eps]
    exact = lookup.pick("exact", judged)
    return exact if exact.winner else lookup.pick("wildcard", judged)


def test_exact_address_is_looked_up_before_a_better_scored_wildcard() -> None:
    # The wildcard one is bound to the device (score 3), the exact one not (2):
    # the exact step still comes first.
    step = decide([ep(1, "0.0.0.0", dev=2), ep(2, "10.0.0.5")], packet(dif=2))
    assert (step.name, step.winner and step.winner.cookie) == ("exact", 2)


def test_device_and_family_scores() -> None:
    eps = [ep(1, "::", v6only=False), ep(2, "0.0.0.0"), ep(3, "0.0.0.0", dev=4)]
    assert decide(eps, packet(dif=4)).winner.cookie == 3  # type: ignore[union-attr]
    assert decide(eps, packet(dif=5)).winner.cookie == 2  # type: ignore[union-attr]
    assert decide(eps[:1], packet(dif=5)).winner.cookie == 1  # type: ignore[union-attr]


def test_ipv6_only_unknown_and_mapped_addresses() -> None:
    assert lookup.judge_listener(ep(1, "::", v6only=True), packet()).rule == "v6only"
    assert lookup.judge_listener(ep(1, "::", v6only=None), packet()).rule == "v6only_unknown"
    mapped = lookup.judge_listener(ep(1, "::ffff:10.0.0.5"), packet())
    assert (mapped.step, mapped.score) == ("exact", 1)
    assert lookup.judge_listener(ep(1, "fd00::1"), packet()).rule == "other_address"
    assert lookup.judge_listener(ep(1, "10.0.0.5"), packet("fd00::5")).rule == "other_family"


def test_vrf_ports_reach_unbound_sockets_only_with_l3mdev_accept() -> None:
    unbound, on_vrf = ep(1, "0.0.0.0"), ep(2, "0.0.0.0", dev=10)
    assert lookup.judge_listener(unbound, packet(dif=10, sdif=3)).rule == "vrf_unbound"
    assert lookup.judge_listener(unbound, packet(dif=10, sdif=3, accept=True)).score == 2
    assert lookup.judge_listener(on_vrf, packet(dif=10, sdif=3)).score == 3


def test_equal_scores_are_ties_unless_one_group() -> None:
    # Two unbound wildcard sockets of one family: possible on different
    # reuseport groups (another uid joined nothing, or v6only differs).
    tie = decide([ep(1, "0.0.0.0", group=7), ep(2, "0.0.0.0", group=8)], packet())
    assert [t.cookie for t in tie.ties] == [2]
    group = decide([ep(1, "0.0.0.0", group=7), ep(2, "0.0.0.0", group=7)], packet())
    assert group.ties == []


def test_udp_connected_scores_and_unknown_peers() -> None:
    conn = ep(1, "10.0.0.5", state="ESTABLISHED", raddr="10.0.0.9", rport=5555)
    plain = ep(2, "10.0.0.5")
    from_peer = packet(protocol="udp", saddr="10.0.0.9", sport=5555)
    assert decide([plain, conn], from_peer).winner.cookie == 1  # type: ignore[union-attr]
    other = packet(protocol="udp", saddr="10.0.0.9", sport=6666)
    assert lookup.judge_udp(conn, other).rule == "other_peer"
    assert lookup.judge_udp(conn, packet(protocol="udp")).rule == "peer_unknown"
    assert lookup.judge_udp(plain, other).score == 2 + 4


def test_established_needs_the_whole_four_tuple() -> None:
    conn = ep(1, "10.0.0.5", state="ESTABLISHED", raddr="10.0.0.9", rport=40000)
    assert lookup.established(packet(saddr="10.0.0.9", sport=40000), [conn]) == conn
    assert lookup.established(packet(saddr="10.0.0.9", sport=40001), [conn]) is None
    assert lookup.established(packet(saddr="10.0.0.9"), [conn]) is None


def test_beats_names_the_rule() -> None:
    p = packet(dif=4)
    win = lookup.judge_listener(ep(1, "0.0.0.0", dev=4), p)
    assert lookup.beats(win, lookup.judge_listener(ep(2, "0.0.0.0"), p)) == "device"
    exact = lookup.judge_listener(ep(3, "10.0.0.5"), p)
    assert lookup.beats(exact, win) == "step"


# ---- the answer's text -----------------------------------------------------------------


def _socket(cookie: int, name: str, addr: str = "0.0.0.0", pid: int = 812) -> Socket:
    diag = SockRecord(4026531840, "tcp", "ipv4", "LISTEN", addr, 80, "0.0.0.0", 0, 0, 128,
                      None, 0, 1000, 5151 + cookie, cookie, 0)
    flags = SockFlags(4026531840, "tcp", "ipv4", "LISTEN", addr, 80, cookie, 5151 + cookie, 1000,
                      frozenset({"reuseport"}), 0, 7, 2, False, False)
    owner = Owner(pid=pid, comm=name, exe=f"/opt/{name}", cmdline=f"{name} --serve")
    return Socket(diag, flags, (owner,))


@pytest.mark.parametrize("name", list(NAMES))
def test_hostile_owners_are_shown_escaped(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from tracer import netprogs

    monkeypatch.setattr(netprogs, "sk_lookup_programs",
                        lambda netns=None: netprogs.ProgramScan([], []))
    hostile = NAMES[name]
    socks = [_socket(1, hostile), _socket(2, hostile, pid=813), _socket(3, hostile, "10.0.0.5")]
    p = packet()
    a = deliver.Answer(p, 4026531840, "nobody", "", by_cookie={s.diag.cookie: s for s in socks})
    deliver.decide(a, socks, local=True, from_host=True, known_dev=True)
    assert a.winner is socks[2]
    text = deliver.render(a, verbose=True)
    assert_safe(text, f"deliver with an owner named {name!r}")
    assert text.count("\n") >= 4  # the winner, its rule, and the two it wins over


# ---- the command's arguments -------------------------------------------------------------


@pytest.mark.parametrize("args, says", [
    (["10.0.0.5"], "has no port"),
    (["300.1.1.1:80"], "not an IPv4 or IPv6 address"),
    (["10.0.0.5:0"], "from 1 to 65535"),
    (["10.0.0.5:http"], "from 1 to 65535"),
    (["[fd00::1:80"], "needs its ']'"),
    (["[fd00::1]80"], "write [ADDR]:PORT"),
    (["fd00::1"], "has no port"),
    (["10.0.0.5:80", "--from", "fd00::2"], "one family"),
    (["10.0.0.5:80", "--from", "10.0.0.9:99999"], "from 1 to 65535"),
    (["\x1b]2;x\x07:80"], "not an IPv4 or IPv6 address"),
])
def test_bad_arguments_are_one_sentence(args: list[str], says: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    from tracer.cli import main

    assert main(["deliver", *args]) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1, err
    assert_safe(err, "the refusal")


def test_endpoints_parse_as_the_kernel_writes_them() -> None:
    assert deliver.endpoint("[fd00::1]:443", "x", True) == (A("fd00::1"), 443)
    assert deliver.endpoint("::ffff:10.0.0.5", "x", False) == (A("10.0.0.5"), None)
    assert deliver.endpoint("[::ffff:10.0.0.5]:80", "x", True) == (A("10.0.0.5"), 80)
    assert deliver.endpoint("10.0.0.9", "x", False) == (A("10.0.0.9"), None)
