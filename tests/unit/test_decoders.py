"""The fast paths that a busy port takes give the same answers as the plain
ones: the iterator decoder (struct rows) against ctypes field by field, and
the bind rules asked once per kind of socket against once per socket."""

from __future__ import annotations

import ctypes
import itertools
import random

from tracer import bindrules
from tracer.bindrules import Sock
from tracer.layout import PsSockinfo
from tracer.sockflags import _one, decode_sockets

RECORD = ctypes.sizeof(PsSockinfo)


def random_records(rng: random.Random, n: int) -> bytes:
    """Records with every byte random, and family, protocol and state from
    the values the kernel writes (and a few it never does)."""
    out = bytearray()
    for _ in range(n):
        r = PsSockinfo.from_buffer_copy(rng.randbytes(RECORD))
        r.family = rng.choice((2, 10, 2, 10, 99))
        r.protocol = rng.choice((6, 17, 6, 17, 132))
        r.state = rng.choice((1, 6, 7, 10, 6, 0, 250))
        r.opts &= rng.choice((0xFF, 0, 1, 3))
        out += bytes(r)
    return bytes(out)


def test_struct_decoder_equals_ctypes_field_by_field() -> None:
    rng = random.Random(7)
    raw = random_records(rng, 2000)
    by_ctypes = [_one(PsSockinfo.from_buffer_copy(raw, off)) for off in range(0, len(raw), RECORD)]
    assert decode_sockets(raw) == by_ctypes


def test_cookie_filter_keeps_exactly_the_asked_sockets_in_order() -> None:
    rng = random.Random(11)
    raw = random_records(rng, 500)
    every = decode_sockets(raw)
    wanted = {f.cookie for f in rng.sample(every, 50)}
    assert decode_sockets(raw, wanted) == [f for f in every if f.cookie in wanted]
    assert decode_sockets(raw, set()) == []


def test_a_ragged_buffer_is_refused() -> None:
    try:
        decode_sockets(b"\0" * (RECORD + 1))
    except ValueError:
        return
    raise AssertionError("a buffer that is not whole records decoded")


def socks(rng: random.Random, n: int, port: int) -> list[Sock]:
    """Sockets on one port with every rule-relevant field varied, many of
    them of the same kind (as a busy port's TIME_WAIT sockets are)."""
    out = []
    for i in range(n):
        family = rng.choice(("ipv4", "ipv6"))
        addr = rng.choice(("0.0.0.0", "127.0.0.1", "10.0.0.1") if family == "ipv4"
                          else ("::", "::1", "::ffff:127.0.0.1"))
        out.append(Sock(rng.choice(("tcp", "udp")), family, addr, port,
                        rng.choice(("CLOSE", "LISTEN", "TIME_WAIT", "ESTABLISHED", "SYN_RECV")),
                        rng.random() < 0.5, rng.random() < 0.5, rng.random() < 0.3,
                        rng.choice((0, 0, 1, 2)), rng.choice((0, 1000)), rng.random() < 0.2,
                        key=i))
    return out


def test_rules_once_per_kind_equal_rules_once_per_socket() -> None:
    rng = random.Random(3)
    existing = socks(rng, 3000, 8080)
    for new, ephemeral in itertools.product(socks(rng, 40, 8080), (False, True, "autobind_reuse")):
        rule_of = (bindrules._tcp_autobind_reuse_rule if ephemeral == "autobind_reuse"
                   else bindrules._tcp_ephemeral_rule if ephemeral else bindrules.tcp_rule)
        if new.protocol == "udp":
            rule_of = bindrules.udp_rule
        one_by_one = [(old.key, v) for old in existing
                      if (v := bindrules._verdict(new, old, rule_of)) is not None]
        got = [(b.sock.key, (b.rule, b.overlap)) for b in bindrules.blockers(new, existing, ephemeral)]
        assert got == one_by_one
        assert bindrules.refused(new, existing, ephemeral) == bindrules.refused(
            new, bindrules.distinct(existing), ephemeral)


def test_kind_is_every_field_but_the_handle() -> None:
    a = Sock("tcp", "ipv4", "0.0.0.0", 80, key=1)
    assert a.kind() == Sock("tcp", "ipv4", "0.0.0.0", 80, key=2).kind()
    for field, value in (("state", "LISTEN"), ("reuseaddr", True), ("reuseport", True),
                         ("v6only", True), ("bound_dev_if", 3), ("uid", 5), ("in_group", True),
                         ("addr", "127.0.0.1"), ("family", "ipv6"), ("protocol", "udp"), ("port", 81)):
        other = Sock(**{**a.__dict__, field: value})
        assert other.kind() != a.kind(), field
