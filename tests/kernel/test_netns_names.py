"""Network namespaces named beside their inode (tracer/nsnames.py), as a user
sees them in `portscope ports` and `why --json`, against namespaces and
sockets made for real: an `ip netns` name, the host's namespace, a private
namespace with no name, a name made of escape sequences, and a container's
namespace (podman, --network=none) labelled with its id.

What these prove is portscope's reading of /run/netns and of cgroup paths,
not the kernel: scripts/kernel-matrix runs them natively only."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest
from harness import Netns, pick_port

from tests.needs import SLOWDOWN, missing, need_tool
from tracer.cgroups import cgroup_of
from tracer.nsnames import identity_label
from tracer.text import printable

REPO = Path(__file__).resolve().parents[2]
LISTENER = """
import socket, sys
s = socket.socket()
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen()
print("ready", flush=True)
sys.stdin.read()
"""


def portscope(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tracer.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60 * SLOWDOWN,
                          errors="surrogateescape")


def listener_in(prefix: list[str], port: int) -> subprocess.Popen[str]:
    """A python3 listener on ``port``, started under ``prefix`` (a command
    that enters or makes a namespace); ready when this returns."""
    proc = subprocess.Popen([*prefix, sys.executable, "-c", LISTENER, str(port)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready", \
        f"the listener under {prefix} did not start"
    return proc


def stop(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.wait(timeout=30)


def listed(port: int, netns: str) -> tuple[dict, str]:
    """The listener on ``port`` in ``netns`` as `ports --json` shows it, and
    its line of the text table."""
    result = portscope("ports", str(port), "--netns", netns, "--json")
    assert result.returncode == 0, result.stderr
    found = [s for s in json.loads(result.stdout)["sockets"] if s["state"] == "LISTEN"]
    assert len(found) == 1, result.stdout
    text = portscope("ports", str(port), "--netns", netns)
    assert text.returncode == 0, text.stderr
    rows = [line for line in text.stdout.splitlines() if " LISTEN " in line]
    assert len(rows) == 1, text.stdout
    return found[0], rows[0]


def row_starts(row: str, netns: str) -> bool:
    """The table's row begins with this NETNS cell, then the listener's protocol and state."""
    return re.match(re.escape(netns) + r" +tcp4 +LISTEN ", row) is not None


def test_an_ip_netns_name_is_shown_beside_the_inode(netns: Netns) -> None:
    port = pick_port()
    proc = listener_in(["ip", "netns", "exec", netns.name], port)
    try:
        sock, row = listed(port, netns.name)
        assert (sock["netns"], sock["netns_name"]) == (netns.inode, netns.name)
        assert list(sock)[:2] == ["netns", "netns_name"], "netns_name comes next to netns"
        assert row_starts(row, f"{netns.inode} ({netns.name})"), row
        # why --json names the blocker's namespace the same way.
        why = portscope("why", str(port), "--netns", netns.name, "--json")
        assert why.returncode == 5, why.stderr  # a conflict (ExitStatus.CONFLICT)
        blocker = json.loads(why.stdout)["blockers"][0]
        assert (blocker["netns"], blocker["netns_name"]) == (netns.inode, netns.name)
    finally:
        stop(proc)


def host_inode() -> int:
    """The host's namespace as the test finds it: PID 1's, else kthreadd's
    (a kernel thread's namespace is always the initial one)."""
    for pid in (1, 2):
        try:
            return os.stat(f"/proc/{pid}/ns/net").st_ino
        except OSError:
            continue
    missing("neither PID 1's nor kthreadd's network namespace can be read here")
    return 0


def test_the_hosts_namespace_is_labelled_host(root: None) -> None:
    ours = os.stat("/proc/self/ns/net").st_ino
    if ours != host_inode():
        missing("the tests do not run in the host's network namespace")
    port = pick_port()
    proc = listener_in([], port)
    try:
        sock, row = listed(port, f"pid:{proc.pid}")
        assert (sock["netns"], sock["netns_name"]) == (ours, "host")
        assert row_starts(row, f"{ours} (host)"), row
    finally:
        stop(proc)


def test_a_private_namespace_without_a_name_has_no_label(root: None) -> None:
    """unshare --net: no /run/netns entry, no container: the inode alone."""
    need_tool("unshare")
    if identity_label(cgroup_of(os.getpid())):
        missing("the tests run inside a container: a namespace they make would be labelled with it")
    port = pick_port()
    proc = listener_in(["unshare", "--net"], port)
    try:
        inode = os.stat(f"/proc/{proc.pid}/ns/net").st_ino
        assert not any(os.stat(p).st_ino == inode for p in Path("/run/netns").glob("*")
                       if not p.is_symlink())
        sock, row = listed(port, f"pid:{proc.pid}")
        assert (sock["netns"], sock["netns_name"]) == (inode, None)
        assert row_starts(row, f"{inode}"), row
    finally:
        stop(proc)


def test_a_hostile_name_is_printed_escaped(root: None) -> None:
    """`ip netns add` takes a name with escape sequences and a newline (it is
    only a file name): JSON keeps it exact, the table shows it escaped."""
    name = f"portscope-t-{secrets.token_hex(4)}\x1b]2;PWND\x07\x1b[2J\nforged"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, timeout=30)
    port = pick_port()
    proc = None
    try:
        inode = os.stat(f"/run/netns/{name}").st_ino
        proc = listener_in(["ip", "netns", "exec", name], port)
        sock, row = listed(port, str(inode))
        assert sock["netns_name"] == name
        assert row_starts(row, f"{inode} ({printable(name)})"), row
        text = portscope("ports", str(port), "--netns", str(inode)).stdout
        assert "\x1b" not in text and "\x07" not in text and "\nforged" not in text
        assert "\\x1b]2;PWND\\x07\\x1b[2J\\nforged" in text
    finally:
        if proc is not None:
            stop(proc)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


# ---- a container's namespace ----------------------------------------------------


def podman(*args: str, check: bool = True) -> str:
    out = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=120 * SLOWDOWN)
    if check:
        assert out.returncode == 0, f"podman {' '.join(args)}: {out.stderr}"
    return out.stdout.strip()


@pytest.fixture
def rootfs(root: None) -> Iterator[str]:
    """A root filesystem of one statically linked busybox: no image, no registry."""
    for tool in ("podman", "runc"):
        need_tool(tool)
    busybox = need_tool("busybox")
    if b"statically linked" not in subprocess.run(["file", "-L", busybox], capture_output=True,
                                                  timeout=30).stdout:
        missing(f"{busybox} is not statically linked (install busybox-static)")
    with tempfile.TemporaryDirectory(prefix="portscope-t-rootfs-") as d:
        shutil.copy(busybox, f"{d}/busybox")
        yield d


def test_a_containers_namespace_is_labelled_with_its_id(rootfs: str) -> None:
    """podman, --network=none: a namespace of its own, no name; the listener
    in it is the container's own process (busybox httpd)."""
    import resource

    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    name = f"portscope-t-{secrets.token_hex(4)}"
    port = pick_port()
    try:
        cid = podman("run", "--detach", "--name", name, "--runtime=runc",
                     f"--ulimit=nofile={nofile}:{nofile}", "--ulimit=nproc=4096:4096",
                     "--network=none", "--rootfs", rootfs,
                     "/busybox", "httpd", "-f", "-p", f"0.0.0.0:{port}")
        pid = podman("inspect", "-f", "{{.State.Pid}}", name)
        assert pid.isdigit() and pid != "0", pid
        inode = os.stat(f"/proc/{pid}/ns/net").st_ino
        deadline = time.monotonic() + 30 * SLOWDOWN
        while True:  # httpd listens a moment after it starts
            result = portscope("ports", str(port), "--netns", str(inode), "--json")
            assert result.returncode == 0, result.stderr
            if json.loads(result.stdout)["sockets"] or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        sock, row = listed(port, str(inode))
        label = f"container {cid[:12]}"
        assert (sock["netns"], sock["netns_name"]) == (inode, label)
        assert row_starts(row, f"{inode} ({label})"), row
    finally:
        podman("rm", "-f", "-t", "0", name, check=False)
