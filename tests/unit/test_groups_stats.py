"""The imbalance statistics of `portscope groups` (no privileges needed).

Reference values are the chi-square distribution's well-known critical
values and closed forms: for 2 degrees of freedom the survival function is
exp(-x/2) exactly, for 1 it is erfc(sqrt(x/2)).
"""

from __future__ import annotations

import math

import pytest

from tracer.balance import Imbalance, chi_square_sf, gamma_q, imbalance
from tracer.groups import group_lines
from tracer.records import Group, Member

# (x, dof, P(X >= x)): the 5%, 1% and 0.1% critical values of standard tables.
CRITICAL = [
    (3.841, 1, 0.05), (6.635, 1, 0.01), (10.828, 1, 0.001),
    (5.991, 2, 0.05), (9.210, 2, 0.01),
    (7.815, 3, 0.05), (11.345, 3, 0.01), (16.266, 3, 0.001),
    (18.307, 10, 0.05), (67.505, 50, 0.05), (124.342, 100, 0.05),
]


@pytest.mark.parametrize("x,dof,p", CRITICAL)
def test_chi_square_critical_values(x: float, dof: int, p: float) -> None:
    assert chi_square_sf(x, dof) == pytest.approx(p, rel=2e-3)


@pytest.mark.parametrize("x", [0.01, 0.5, 1.0, 2.0, 7.0, 30.0, 200.0])
def test_closed_forms(x: float) -> None:
    assert chi_square_sf(x, 2) == pytest.approx(math.exp(-x / 2), rel=1e-10, abs=1e-300)
    assert chi_square_sf(x, 1) == pytest.approx(math.erfc(math.sqrt(x / 2)), rel=1e-9,
                                                abs=1e-300)


def test_edges() -> None:
    assert chi_square_sf(0.0, 3) == 1.0
    assert chi_square_sf(1e6, 3) == 0.0
    assert 0.0 <= gamma_q(0.5, 1e-12) <= 1.0
    with pytest.raises(ValueError):
        chi_square_sf(1.0, 0)


def test_even_split_is_noise() -> None:
    imb = imbalance([1000, 1010, 990, 1000], 10.0)
    assert imb.verdict == "even"
    assert imb.dof == 3 and imb.total == 4000
    assert imb.chi2 == pytest.approx(0.2)
    assert imb.p_value == pytest.approx(chi_square_sf(0.2, 3))
    assert imb.max_min == pytest.approx(1010 / 990)
    assert imb.cv == pytest.approx(math.sqrt(50) / 1000)


def test_skewed_split_is_not_noise() -> None:
    imb = imbalance([1300, 900, 900, 900], 10.0)
    assert imb.verdict == "uneven" and imb.p_value < 1e-10


def test_a_member_with_nothing() -> None:
    imb = imbalance([0, 100], 1.0)
    assert imb.max_min is None and imb.verdict == "uneven"
    assert "max/min inf" in imb.text()


def test_too_little_traffic_is_said_so() -> None:
    imb = imbalance([3, 0, 1, 0], 1.0)
    assert imb.verdict == "insufficient"


def test_single_member_and_idle_group() -> None:
    assert imbalance([42], 1.0).verdict == "single"
    assert imbalance([0, 0, 0], 1.0).verdict == "idle"
    assert imbalance([0, 0, 0], 1.0).to_json()["p_value"] is None


def test_group_lines_and_json() -> None:
    members = [
        Member(cookie=c, inode=100 + c, state="LISTEN", owners=(), delivered=n, rate=n / 2.0,
               window=n, share=n / 30, queue=q, backlog=128)
        for c, n, q in ((1, 10, 0), (2, 20, 7))
    ]
    group = Group(id=0xABCDEF01, netns=4026531840, protocol="tcp", family="ipv6", addr="::",
                  port=8080, bound_dev_if=0, size=2, bpf=True, members=members,
                  window_seconds=2.0, imbalance=imbalance([10, 20], 2.0))
    text = "\n".join(group_lines(group))
    assert "tcp6 [::]:8080" in text and "group abcdef01" in text
    assert "steered by a reuseport BPF program" in text
    assert "7/128" in text and "66.7%" in text
    doc = group.to_json()
    assert doc["delivered"] == 30 and doc["rate"] == 15.0 and doc["bpf"] is True
    assert doc["local"] == "[::]:8080" and doc["id"] == "abcdef01"
    assert [m["queue"] for m in doc["members"]] == [0, 7]
    assert isinstance(Imbalance(**{**group.imbalance.__dict__}), Imbalance)
