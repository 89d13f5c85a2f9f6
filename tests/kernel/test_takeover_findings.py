"""`portscope record` and `portscope report` against four takeovers that need
no port conflict: a device-bound socket beside another process's unbound
one, an IP_TRANSPARENT listener, an sk_lookup program attached to a network
namespace, a cgroup sock_addr program attached to a cgroup.

As in test_journal.py (whose actors, recorder and report this module
reuses), every scenario is played for real while `portscope record` runs:
separate programs in a private network namespace, real BPF programs. The
report must list exactly the expected finding with its evidence, and the
same shape done harmlessly must list none.
"""

# ruff: noqa: F811  (the tests take the fixture `scene` imported below as a parameter)
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import steering
from harness import Netns
from test_journal import ACTOR, REPO, ExecActor, Programs, Scene, summary
from test_journal import can_record, scene  # noqa: F401  (fixtures: scene uses our programs)

from tracer import libbpf
from tracer.cgroups import cgroup2_root

pytestmark = pytest.mark.kernel

# The actors of test_journal, with two more options: "transparent"
# (IP_TRANSPARENT) and "dev=NAME" (SO_BINDTODEVICE).
_OPTIONS = '            for name in req.get("options", []):\n                s.setsockopt(*OPTS[name], 1)\n'
assert _OPTIONS in ACTOR
SCRIPT = ACTOR.replace(_OPTIONS, '''            for name in req.get("options", []):
                if name.startswith("dev="):
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, name[4:].encode())
                elif name == "transparent":
                    s.setsockopt(socket.SOL_IP, 19, 1)  # IP_TRANSPARENT
                else:
                    s.setsockopt(*OPTS[name], 1)
''')


@pytest.fixture(scope="module")
def programs() -> Iterator[Programs]:
    p = Programs()
    Path(p.script).write_text(SCRIPT)
    try:
        yield p
    finally:
        p.close()


def veth(scene: Scene) -> int:
    """A veth device in the scene's namespace, up: its ifindex."""
    subprocess.run(["ip", "-n", scene.ns.name, "link", "add", "pst0", "type", "veth", "peer", "name",
                    "pst1"], check=True, capture_output=True)
    subprocess.run(["ip", "-n", scene.ns.name, "link", "set", "pst0", "up"], check=True)
    out = subprocess.run(["ip", "netns", "exec", scene.ns.name, "cat", "/sys/class/net/pst0/ifindex"],
                         check=True, capture_output=True, text=True)
    return int(out.stdout)


# ---- device_shadow -------------------------------------------------------------------


def device_scenario(scene: Scene, proto: str, another: bool,
                    extra: tuple[str, ...] = ()) -> tuple[int, ExecActor, ExecActor]:
    """A service on the wildcard of port 8053, then a second process on the
    same wildcard bound to the device pst0: another executable (same uid,
    so that the kernel's reuseport uid check lets a TCP one bind) or, when
    not ``another``, a second worker of the same program. Returns the
    device's ifindex, the service and the device-bound process."""
    share = "reuseport" if proto == "tcp" else "reuseaddr"
    rec = scene.record()
    ifindex = veth(scene)
    service = scene.actor()
    service.serve("0.0.0.0", 8053, proto=proto, options=(share,))
    rec.wait_snapshot()
    bound = scene.actor(exe=scene.programs.impostor if another else None)
    bound.serve("0.0.0.0", 8053, proto=proto, options=(share, "dev=pst0", *extra))
    rec.wait_snapshot()
    return ifindex, service, bound


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_device_bound_socket_shadows_another_process_wildcard(scene: Scene, proto: str) -> None:
    ifindex, service, shadow = device_scenario(scene, proto, another=True)

    doc = scene.report()
    assert summary(doc["findings"]) == [("device_shadow", [shadow.pid], [service.pid])]
    f = doc["findings"][0]
    assert (f["protocol"], f["port"], f["netns"]) == (proto, 8053, scene.ns.inode)
    rows = [(e["local"], e["dev"], e["owners"][0]["pid"]) for e in f["evidence"]
            if e["type"] == "snapshot"]
    assert rows == [("0.0.0.0:8053", ifindex, shadow.pid), ("0.0.0.0:8053", 0, service.pid)]
    calls = {(e["pid"], e["dev"]) for e in f["evidence"] if e["type"] == "event"}
    assert (shadow.pid, ifindex) in calls
    assert f"device {ifindex}" in f["summary"]


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_the_kernel_gives_the_device_bound_socket_what_arrives_on_its_device(proto: str) -> None:
    """The fact device_shadow states: of two sockets on 0.0.0.0:port, the one
    bound to a device receives what arrives on that device; the unbound one
    still receives what arrives elsewhere (here: on lo)."""
    import socket

    with Netns() as here, Netns() as there:
        subprocess.run(["ip", "-n", here.name, "link", "add", "pst0", "type", "veth", "peer", "name",
                        "pst1", "netns", there.name], check=True, capture_output=True)
        for ns, dev, addr in ((here, "pst0", "10.9.0.1/24"), (there, "pst1", "10.9.0.2/24")):
            subprocess.run(["ip", "-n", ns.name, "addr", "add", addr, "dev", dev], check=True)
            subprocess.run(["ip", "-n", ns.name, "link", "set", dev, "up"], check=True)
        sockets = []
        for device in (None, b"pst0"):
            s = steering.ns_socket(here.path, proto)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT if proto == "tcp"
                         else socket.SO_REUSEADDR, 1)
            if device:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device)
            s.bind(("0.0.0.0", 8053))
            if proto == "tcp":
                s.listen(4)
            s.setblocking(False)
            sockets.append(s)
        plain, bound = sockets
        try:
            for ns, addr, receiver in ((there, "10.9.0.1", bound), (here, "127.0.0.1", plain)):
                peer = steering.ns_socket(ns.path, proto)
                peer.settimeout(5)
                if proto == "tcp":
                    peer.connect((addr, 8053))
                else:
                    peer.sendto(b"x", (addr, 8053))
                deadline = time.monotonic() + 5
                got = []
                while not got and time.monotonic() < deadline:
                    for s in sockets:
                        try:
                            got.append((s, s.accept()[0] if proto == "tcp" else s.recv(16)))
                        except BlockingIOError:
                            pass
                    time.sleep(0.01)
                peer.close()
                assert [s for s, _ in got] == [receiver], f"to {addr}"
        finally:
            for s in sockets:
                s.close()


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_device_binding_by_the_same_service_is_no_finding(scene: Scene, proto: str) -> None:
    device_scenario(scene, proto, another=False)
    assert scene.report()["findings"] == []


def test_specific_address_on_a_device_is_wildcard_shadowed_only(scene: Scene) -> None:
    """A specific address beats a wildcard whatever the devices: one finding,
    wildcard_shadowed, not also device_shadow."""
    rec = scene.record()
    ifindex = veth(scene)
    service = scene.actor()
    service.serve("0.0.0.0", 8053, options=("reuseport",))
    rec.wait_snapshot()
    shadow = scene.actor(exe=scene.programs.impostor)
    shadow.serve("127.0.0.1", 8053, options=("reuseport", "dev=pst0"))
    rec.wait_snapshot()
    doc = scene.report()
    assert summary(doc["findings"]) == [("wildcard_shadowed", [shadow.pid], [service.pid])]
    assert [e["dev"] for e in doc["findings"][0]["evidence"] if e["type"] == "snapshot"] == [ifindex, 0]


# ---- transparent_listener --------------------------------------------------------------


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_transparent_listener_appears(scene: Scene, proto: str) -> None:
    rec = scene.record()
    plain = scene.actor()
    plain.serve("0.0.0.0", 8080, proto=proto)
    rec.wait_snapshot()
    proxy = scene.actor(exe=scene.programs.impostor)
    proxy.serve("0.0.0.0", 3129, proto=proto, options=("transparent",))
    rec.wait_snapshot()

    doc = scene.report()
    assert summary(doc["findings"]) == [("transparent_listener", [proxy.pid], [])]
    f = doc["findings"][0]
    assert (f["protocol"], f["port"], f["netns"]) == (proto, 3129, scene.ns.inode)
    assert f["notes"] == [] and "opened an IP_TRANSPARENT" in f["summary"]
    snaps = [e for e in f["evidence"] if e["type"] == "snapshot"]
    assert len(snaps) == 1 and "transparent" in snaps[0]["options"]
    assert snaps[0]["owners"][0]["pid"] == proxy.pid
    events = [e for e in f["evidence"] if e["type"] == "event"]
    assert [(e["call"], e["pid"]) for e in events] == [("listen" if proto == "tcp" else "bind", proxy.pid)]


def test_transparent_listener_present_when_recording_began(scene: Scene) -> None:
    proxy = scene.actor(exe=scene.programs.impostor)
    proxy.serve("0.0.0.0", 3129, options=("transparent",))
    rec = scene.record()
    rec.wait_snapshot()
    doc = scene.report()
    assert summary(doc["findings"]) == [("transparent_listener", [proxy.pid], [])]
    f = doc["findings"][0]
    assert "present when recording began" in f["summary"] and f["notes"]


def test_plain_listeners_are_no_transparent_finding(scene: Scene) -> None:
    rec = scene.record()
    rec.wait_snapshot()
    a = scene.actor(exe=scene.programs.impostor)
    a.serve("0.0.0.0", 3129)
    a.serve("0.0.0.0", 3129, proto="udp")
    rec.wait_snapshot()
    assert scene.report()["findings"] == []


def test_human_report_shows_the_new_evidence(scene: Scene) -> None:
    ifindex, _, _ = device_scenario(scene, "tcp", another=True, extra=("transparent",))
    assert scene.recording is not None
    scene.recording.stop()
    out = subprocess.run([sys.executable, "-m", "tracer.cli", "report", str(scene.recording.path),
                          "--netns", str(scene.ns.inode)], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "2 findings:" in out.stdout
    assert "device_shadow" in out.stdout and "transparent_listener" in out.stdout
    assert f" dev {ifindex} " in out.stdout


# ---- sk_lookup_attached, sock_addr_attached -----------------------------------------------


def programs_of(doc: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [f for f in doc["findings"] if f["kind"] == kind]


def mine(doc: dict[str, Any], cgroup: str | None = None) -> list[dict[str, Any]]:
    """The scene's findings: sock_addr findings of other cgroups (another test
    run on this machine at the same time) left out. sk_lookup findings are
    the scene's namespace's already (report --netns)."""
    return [f for f in doc["findings"] if f["kind"] != "sock_addr_attached"
            or f["evidence"][-1]["cgroup"] == cgroup]


def test_sk_lookup_program_attached_then_replaced_twice(scene: Scene) -> None:
    rec = scene.record()
    rec.wait_snapshot()  # a snapshot that looked for programs, before any
    target = steering.listener(scene.ns.path, 8080)
    first = steering.attach_steer(scene.ns.path, 9999, target.fileno())
    spare = steering.Attached(steering.STEER_NAME)  # loaded, not attached
    third = None
    try:
        rec.wait_snapshot()
        # The same link, another program (BPF_LINK_UPDATE).
        assert first.link is not None
        ret = libbpf.lib().bpf_link_update(first.link.fd, spare.program.fd, None)
        assert ret == 0, os.strerror(-ret)
        spare_id = steering._id_of(spare.program.fd)
        rec.wait_snapshot()
        # Another program in place of that one: the link goes, a new one comes.
        first.close()
        third = steering.attach_steer(scene.ns.path, 9999, target.fileno())
        rec.wait_snapshot()
        doc = scene.report()
    finally:
        for handle in (first, spare, third):
            if handle is not None:
                handle.close()
        target.close()
    me = os.getpid()
    assert summary(mine(doc)) == [("sk_lookup_attached", [me], []),
                                  ("sk_lookup_attached", [me], [me]),
                                  ("sk_lookup_attached", [me], [me])]
    attached, updated, instead = mine(doc)
    assert all(f["netns"] == scene.ns.inode and f["port"] == 0 for f in mine(doc))
    progs = [[(e["prog_id"], e["link_id"], e["name"], e["netns"]) for e in f["evidence"]]
             for f in (attached, updated, instead)]
    ns = scene.ns.inode
    assert progs[0] == [(first.prog_id, first.link_id, "ps_steer", ns)]
    assert progs[1] == [(first.prog_id, first.link_id, "ps_steer", ns),
                        (spare_id, first.link_id, "ps_steer", ns)]
    assert progs[2] == [(spare_id, first.link_id, "ps_steer", ns),
                        (third.prog_id, third.link_id, "ps_steer", ns)]
    assert "on the same link" in updated["summary"] and "in place of" in instead["summary"]
    assert attached["evidence"][0]["holders"][0]["pid"] == me


def test_sk_lookup_program_there_before_recording_is_no_finding(scene: Scene) -> None:
    target = steering.listener(scene.ns.path, 8080)
    with steering.attach_steer(scene.ns.path, 9999, target.fileno()):
        rec = scene.record()
        rec.wait_snapshot()
        rec.wait_snapshot()
        doc = scene.report()
    target.close()
    assert mine(doc) == []


def test_connect4_program_attached_to_a_cgroup(scene: Scene) -> None:
    cgroup_dir = scene.cgroup()
    cgroup = "/" + os.path.relpath(cgroup_dir, cgroup2_root())
    rec = scene.record()
    inside = scene.actor(cgroup=cgroup_dir)  # a process of that cgroup, in the journal
    inside.serve("127.0.0.1", 7001)
    rec.wait_snapshot()
    with steering.attach_connect_rewrite(cgroup_dir, 7000, 7001) as rewrite:
        rec.wait_snapshot()
        doc = scene.report()
    assert summary(mine(doc, cgroup)) == [("sock_addr_attached", [os.getpid()], [inside.pid])]
    f = mine(doc, cgroup)[0]
    (e,) = f["evidence"]
    assert (e["kind"], e["prog_id"], e["link_id"], e["name"], e["cgroup"], e["netns"]) == (
        "connect4", rewrite.prog_id, rewrite.link_id, "ps_rewrite", cgroup, None)
    assert f"cgroup {cgroup}" in f["summary"] and "connect to" in f["summary"]


def test_no_program_no_finding(scene: Scene) -> None:
    """The same shape without a program: a listener, a process in a cgroup."""
    cgroup_dir = scene.cgroup()
    cgroup = "/" + os.path.relpath(cgroup_dir, cgroup2_root())
    rec = scene.record()
    target = steering.listener(scene.ns.path, 8080)
    inside = scene.actor(cgroup=cgroup_dir)
    inside.serve("127.0.0.1", 7001)
    rec.wait_snapshot()
    rec.wait_snapshot()
    doc = scene.report()
    target.close()
    assert mine(doc, cgroup) == []
