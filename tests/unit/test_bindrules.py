"""The bind rules as a pure function: address overlap and the option rules.

A few cases only, to pin the function's contract; the proof that these
rules are the kernel's is tests/kernel/test_explainer_matrix.py, which
performs every bind for real.
"""

from __future__ import annotations

import pytest

from tracer.bindrules import (
    LISTEN,
    TIME_WAIT,
    Overlap,
    Rule,
    Sock,
    blockers,
    fast_path_candidates,
    overlap,
    tcp_rule,
    udp_rule,
)


def sock(protocol: str, addr: str, **kw: object) -> Sock:
    family = "ipv6" if ":" in addr else "ipv4"
    return Sock(protocol, family, addr, 7000, **kw)  # type: ignore[arg-type]


def tcp(addr: str, **kw: object) -> Sock:
    return sock("tcp", addr, **kw)


def udp(addr: str, **kw: object) -> Sock:
    return sock("udp", addr, **kw)


@pytest.mark.parametrize("new, old, expected", [
    (tcp("127.0.0.1"), tcp("127.0.0.1"), Overlap.SAME_ADDRESS),
    (tcp("127.0.0.1"), tcp("127.0.0.2"), None),
    (tcp("127.0.0.1"), tcp("0.0.0.0"), Overlap.WILDCARD),
    (tcp("0.0.0.0"), tcp("127.0.0.1"), Overlap.WILDCARD),
    (tcp("0.0.0.0"), tcp("::"), Overlap.DUAL_STACK),
    (tcp("::"), tcp("0.0.0.0"), Overlap.DUAL_STACK),
    (tcp("0.0.0.0"), tcp("::", v6only=True), None),
    (tcp("::", v6only=True), tcp("0.0.0.0"), None),
    (tcp("::", v6only=True), tcp("::1"), Overlap.WILDCARD),
    (tcp("::1"), tcp("0.0.0.0"), None),
    (tcp("::ffff:127.0.0.1"), tcp("127.0.0.1"), Overlap.SAME_ADDRESS),
    (tcp("127.0.0.1"), tcp("::ffff:127.0.0.1"), Overlap.SAME_ADDRESS),
    (tcp("::ffff:127.0.0.1"), tcp("::", v6only=True), None),
])
def test_overlap(new: Sock, old: Sock, expected: Overlap | None) -> None:
    assert overlap(new, old) == expected


@pytest.mark.parametrize("new, old, expected", [
    (tcp("0.0.0.0"), tcp("0.0.0.0"), Rule.NO_REUSE),
    (tcp("0.0.0.0", reuseaddr=True), tcp("127.0.0.1", reuseaddr=True), None),
    (tcp("0.0.0.0", reuseaddr=True), tcp("0.0.0.0", reuseaddr=True, state=LISTEN), Rule.LISTENER),
    (tcp("0.0.0.0", reuseaddr=True), tcp("0.0.0.0"), Rule.REUSEADDR_ONE_SIDE),
    (tcp("0.0.0.0", reuseport=True, uid=1002), tcp("0.0.0.0", reuseport=True, uid=1001,
                                                    state=LISTEN), Rule.REUSEPORT_OTHER_UID),
    (tcp("0.0.0.0", reuseport=True, uid=1001), tcp("0.0.0.0", reuseport=True, uid=1001,
                                                    state=LISTEN), None),
    # TIME_WAIT: Linux needs the option on both sides; SO_REUSEPORT needs no uid match.
    (tcp("127.0.0.1", reuseaddr=True), tcp("127.0.0.1", state=TIME_WAIT), Rule.TIME_WAIT),
    (tcp("127.0.0.1", reuseaddr=True), tcp("127.0.0.1", reuseaddr=True, state=TIME_WAIT), None),
    (tcp("127.0.0.1", reuseport=True, uid=1002),
     tcp("127.0.0.1", reuseport=True, uid=1001, state=TIME_WAIT), None),
])
def test_tcp_rule(new: Sock, old: Sock, expected: Rule | None) -> None:
    assert tcp_rule(new, old) == expected


def test_udp_rule() -> None:
    assert udp_rule(udp("0.0.0.0", reuseaddr=True, uid=1), udp("0.0.0.0", reuseaddr=True)) is None
    assert udp_rule(udp("0.0.0.0", reuseport=True, uid=2), udp("0.0.0.0", reuseport=True, uid=1)) \
        == Rule.REUSEPORT_OTHER_UID
    assert udp_rule(udp("0.0.0.0", reuseport=True), udp("0.0.0.0")) == Rule.REUSEPORT_ONE_SIDE


def test_blockers_devices_and_ephemeral() -> None:
    on = lambda dev, **kw: tcp("0.0.0.0", bound_dev_if=dev, **kw)  # noqa: E731
    assert blockers(on(2), [on(3)]) == []
    assert [b.rule for b in blockers(on(2), [on(0)])] == [Rule.NO_REUSE]
    # Port 0: the kernel shares no automatically chosen port, whatever the options.
    shared = [tcp("0.0.0.0", reuseaddr=True)]
    assert blockers(tcp("0.0.0.0", reuseaddr=True), shared) == []
    assert [b.rule for b in blockers(tcp("0.0.0.0", reuseaddr=True), shared, ephemeral=True)] \
        == [Rule.EPHEMERAL]


def test_fast_path_candidates() -> None:
    new = tcp("127.0.0.1", reuseport=True, uid=1001)
    a = tcp("127.0.0.1", reuseaddr=True, reuseport=True, uid=1001)
    wild = tcp("0.0.0.0", reuseport=True, uid=1001)
    other_uid = tcp("127.0.0.1", reuseaddr=True, reuseport=True, uid=1002)
    tw = tcp("127.0.0.1", reuseport=True, uid=1001, state=TIME_WAIT)
    assert fast_path_candidates(new, [a, wild, other_uid, tw]) == [a, wild]
    assert fast_path_candidates(tcp("0.0.0.0", reuseport=True, uid=1001), [a]) == []
    assert fast_path_candidates(tcp("127.0.0.1", uid=1001), [a]) == []
