"""Every errno of a traced bind() or listen() gets the explanation `why`
gives, against the kernel.

Each refusal is made for real in a private namespace (a privileged port as
an unprivileged user, an address the namespace does not have, a link-local
address without a device, a v4-mapped address on a V6ONLY socket, a device
deleted under a bound socket, a port taken); the traced event is explained
on the spot (what `trace`, the TUI, the journal and `report` carry), and the
general rule is checked: the explanation's first reason has the errno the
kernel returned, and its rules are those `why` gives for the same question.
"""

from __future__ import annotations

import errno
import subprocess
from typing import Callable

import pytest
from harness import Actor, EventCollector, Netns, Truth, expect_outcome, pick_port

from tracer.explain import explain
from tracer.onthespot import OnTheSpot, request_of

pytestmark = pytest.mark.kernel

NOBODY = 65534
DUMMY = "ps-dummy0"


def ip(ns: Netns, *args: str) -> None:
    subprocess.run(["ip", "-n", ns.name, *args], check=True, capture_output=True, timeout=30)


def privileged_port(ns: Netns) -> Truth:
    a = Actor(ns, uid=NOBODY)
    return a.bind(a.socket("tcp"), "0.0.0.0", 80)


def address_not_local(ns: Netns) -> Truth:
    a = Actor(ns)
    return a.bind(a.socket("udp", "ipv6"), "2001:db8::9", pick_port())


def link_local_without_device(ns: Netns) -> Truth:
    a = Actor(ns)
    return a.bind(a.socket("tcp", "ipv6"), "fe80::1", pick_port())


def mapped_on_v6only(ns: Netns) -> Truth:
    a = Actor(ns)
    return a.bind(a.socket("tcp", "ipv6", v6only=True), "::ffff:127.0.0.1", pick_port())


def device_gone(ns: Netns) -> Truth:
    try:
        ip(ns, "link", "add", DUMMY, "type", "dummy")
    except subprocess.CalledProcessError:  # a kernel without CONFIG_DUMMY: a veth pair
        ip(ns, "link", "add", DUMMY, "type", "veth", "peer", "name", DUMMY + "p")
    ip(ns, "link", "set", DUMMY, "up")
    a = Actor(ns)
    fd = a.socket("tcp", "ipv6", bindtodevice=DUMMY)
    ip(ns, "link", "del", DUMMY)  # the socket keeps the index of a device that is gone
    return a.bind(fd, "::1", pick_port())


def port_taken(ns: Netns) -> Truth:
    a = Actor(ns)
    port = pick_port()
    s = a.socket("udp")
    expect_outcome(a.bind(s, "0.0.0.0", port), 0)
    return a.bind(a.socket("udp"), "127.0.0.1", port)


def listen_port_taken(ns: Netns) -> Truth:
    a = Actor(ns)
    port = pick_port()
    s1, s2 = a.socket("tcp", reuseaddr=True), a.socket("tcp", reuseaddr=True)
    for fd in (s1, s2):
        expect_outcome(a.bind(fd, "127.0.0.1", port), 0)
    expect_outcome(a.listen(s1), 0)
    return a.listen(s2)


REFUSALS: dict[str, tuple[int, Callable[[Netns], Truth]]] = {
    "privileged_port": (errno.EACCES, privileged_port),
    "address_not_local": (errno.EADDRNOTAVAIL, address_not_local),
    "link_local_needs_device": (errno.EINVAL, link_local_without_device),
    "mapped_on_v6only": (errno.EINVAL, mapped_on_v6only),
    "device_gone": (errno.ENODEV, device_gone),
    "conflict": (errno.EADDRINUSE, port_taken),
    "listen_conflict": (errno.EADDRINUSE, listen_port_taken),
}


@pytest.mark.parametrize("name", REFUSALS)
def test_the_traced_refusal_is_explained_like_why(tracer: EventCollector, netns: Netns,
                                                  name: str) -> None:
    expected, provoke = REFUSALS[name]
    truth = provoke(netns)
    expect_outcome(truth, expected, f"the scenario {name} must make the kernel refuse")
    (event,) = tracer.wait_for(truth)
    spot = OnTheSpot()
    try:
        x = spot.explain(event)
    finally:
        spot.close()
    assert x is not None and x.error is None, x
    doc = x.to_json()
    assert doc["errno"] == errno.errorcode[expected]
    assert doc["reasons"][0]["errno"] == errno.errorcode[expected]
    assert not [n for n in doc["notes"] if n["kind"] in ("answer_changed", "rules_disagree")]
    # The same question asked of `why` (the explainer without the event).
    asked = explain(request_of(event), netns=str(netns.inode))
    assert [r.rule for r in asked.reasons] == [r["rule"] for r in doc["reasons"]]
    if expected != errno.EADDRINUSE:
        assert doc["reasons"][0]["rule"] == name
