"""connect() failures explained with numbers, against the kernel.

A connect() that finds no local port towards its destination fails with
EADDRNOTAVAIL: the explanation must count what the kernel counted (the
ports of the range in use towards that destination, against the usable
range) and name who holds them; its fix, applied, must let the same
connect() succeed. A connect() from a socket bound to a port whose 4-tuple
already exists fails too: the explanation must name the connection that has
the 4-tuple.
"""

from __future__ import annotations

import errno

from harness import Actor, EventCollector, Netns, expect_outcome

from tracer.onthespot import OnTheSpot

SERVER = ("127.0.0.1", 9000)


def _server(ns: Netns) -> Actor:
    server = Actor(ns)
    fd = server.socket("tcp")
    server.bind(fd, *SERVER)
    server.listen(fd, 64)
    return server


def test_no_port_left_towards_a_destination(netns: Netns, tracer: EventCollector) -> None:
    netns.sysctl("net/ipv4/ip_local_port_range", "40000 40001")
    _server(netns)
    client = Actor(netns)
    for _ in range(2):
        expect_outcome(client.connect(client.socket("tcp"), *SERVER), 0)
    third = client.connect(client.socket("tcp"), *SERVER)
    expect_outcome(third, errno.EADDRNOTAVAIL, "two ports, both in use towards the server")
    (ev,) = tracer.wait_for(third)
    spot = OnTheSpot()
    try:
        x = spot.explain(ev)
    finally:
        spot.close()
    assert x is not None and x.error is None
    (reason,) = x.reasons
    assert (reason.errno, reason.rule) == ("EADDRNOTAVAIL", "ephemeral_exhausted")
    facts = reason.facts
    assert (facts["destination"], facts["in_use"], facts["capacity"]) == ("127.0.0.1:9000", 2, 2)
    assert facts["range"] == [40000, 40001]
    assert facts["top_holders"][0]["count"] == 2
    assert f"[{client.pid}]" in facts["top_holders"][0]["holder"]
    kinds = {(f.kind, f.params.get("name")) for f in x.fixes}
    assert ("sysctl", "net.ipv4.ip_local_port_range") in kinds
    # The fix, applied: two more ports, and the same connect() succeeds.
    netns.sysctl("net/ipv4/ip_local_port_range", "40000 40003")
    expect_outcome(client.connect(client.socket("tcp"), *SERVER), 0)


def test_a_repeated_four_tuple_names_its_connection(netns: Netns, tracer: EventCollector) -> None:
    _server(netns)
    first, second = Actor(netns), Actor(netns)
    a = first.socket("tcp", reuseaddr=True)
    expect_outcome(first.bind(a, "127.0.0.1", 40500), 0)
    expect_outcome(first.connect(a, *SERVER), 0)
    b = second.socket("tcp", reuseaddr=True)
    expect_outcome(second.bind(b, "127.0.0.1", 40500), 0)  # both SO_REUSEADDR, neither listening
    t = second.connect(b, *SERVER)
    assert t.errno in (errno.EADDRNOTAVAIL, errno.EADDRINUSE), t.describe()
    (ev,) = tracer.wait_for(t)
    spot = OnTheSpot()
    try:
        x = spot.explain(ev)
    finally:
        spot.close()
    assert x is not None and x.error is None
    assert [r.rule for r in x.reasons] == ["four_tuple_taken"]
    assert x.reasons[0].errno == ev.errno_name
    (holder,) = x.blockers
    assert holder.pids == (first.pid,) and holder.local == "127.0.0.1:40500"
    assert holder.remote == "127.0.0.1:9000" and holder.state == "ESTABLISHED"
    assert {f.kind for f in x.fixes} == {"option", "port"}
