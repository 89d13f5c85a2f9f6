"""Names of network namespaces (tracer/nsnames.py) from a made-up /proc: which
label wins, how the host is found when PID 1 cannot be read, cgroup paths
of containers and pods, names that pose as other labels or hold escape
sequences, and each source read once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tracer import nsnames
from tracer.netns import NetnsRef, NetnsScan
from tracer.nsnames import NetnsNames, identity_label, name_label, netns_named, with_netns_name

HOST, BLUE, BOX, POD, BARE = 4026531840, 4026532248, 4026532300, 4026532400, 4026532500
CONTAINER_ID = "1a2b3c4d5e6f" + "0" * 52
POD_UID = "0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b"
KTHREAD_FLAGS = 0x00208040  # kthreadd's flags: PF_KTHREAD among them


def stat_line(pid: int, comm: str, ppid: int, flags: int = 0x400100) -> str:
    return f"{pid} ({comm}) S {ppid} {pid} {pid} 0 -1 {flags} 0 0 0 0\n"


def fake_proc(tmp_path: Path, procs: dict[int, tuple[str, int, int, str]]) -> str:
    """pid -> (comm, ppid, flags, cgroup v2 path)."""
    for pid, (comm, ppid, flags, cgroup) in procs.items():
        d = tmp_path / "proc" / str(pid)
        d.mkdir(parents=True)
        (d / "stat").write_text(stat_line(pid, comm, ppid, flags))
        (d / "cgroup").write_text(f"4:memory:/x\n0::{cgroup}\n")
    return str(tmp_path / "proc")


def scan(*refs: tuple[int, str, tuple[int, ...]]) -> NetnsScan:
    return NetnsScan([NetnsRef(inode, path, pids) for inode, path, pids in refs], 0)


HOST_PROCS = {
    1: ("systemd", 0, 0x400100, "/init.scope"),
    2: ("kthreadd", 0, KTHREAD_FLAGS, "/"),
    500: ("sshd", 1, 0x400140, "/system.slice/ssh.service"),
    600: ("bash", 500, 0x400000, "/user.slice/session-1.scope"),
    700: ("sleep", 1, 0x400000, f"/machine.slice/libpod-{CONTAINER_ID}.scope/container"),
    800: ("pause", 1, 0x400000,
          f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod"
          f"{POD_UID.replace('-', '_')}.slice/cri-containerd-{'ab' * 32}.scope"),
    900: ("python3", 600, 0x400000, "/user.slice/session-1.scope"),
}
SCAN = scan((HOST, "/proc/1/ns/net", (1, 2, 500, 600)), (BLUE, "/run/netns/blue", ()),
            (BOX, "/proc/700/ns/net", (700,)), (POD, "/proc/800/ns/net", (800,)),
            (BARE, "/proc/900/ns/net", (900,)))


def names(tmp_path: Path, procs: dict = HOST_PROCS, netns_scan: NetnsScan = SCAN,
          self_pid: int = 600) -> NetnsNames:
    return NetnsNames(netns_scan, proc=fake_proc(tmp_path, procs), run_netns=(),
                      self_pid=self_pid)


def test_each_kind_of_namespace_gets_its_label(tmp_path: Path) -> None:
    n = names(tmp_path)
    assert [n.label(i) for i in (HOST, BLUE, BOX, POD, BARE)] == [
        "host", "blue", "container 1a2b3c4d5e6f", f"pod {POD_UID}", None]
    assert n.describe(BLUE) == f"{BLUE} (blue)" and n.describe(BARE) == str(BARE)
    assert n.label(12345) is None  # not a namespace the walk found


def test_without_pid_1_the_host_is_kthreadds_namespace(tmp_path: Path) -> None:
    procs = {pid: v for pid, v in HOST_PROCS.items() if pid != 1}
    netns_scan = scan((HOST, "/proc/2/ns/net", (2, 500, 600)), (BLUE, "/run/netns/blue", ()))
    assert names(tmp_path, procs, netns_scan).label(HOST) == "host"


def test_without_pid_1_or_a_kernel_thread_the_host_is_our_topmost_readable_ancestor(
        tmp_path: Path) -> None:
    """As in a sandbox: PID 1 unreadable, no kernel threads in sight; our
    process (900) runs in a namespace of its own under a shell (600) in
    the host's."""
    procs = {pid: v for pid, v in HOST_PROCS.items() if pid not in (1, 2)}
    netns_scan = scan((HOST, "/proc/500/ns/net", (500, 600)), (BARE, "/proc/900/ns/net", (900,)))
    n = names(tmp_path, procs, netns_scan, self_pid=900)
    assert (n.label(HOST), n.label(BARE)) == ("host", None)


def test_a_name_is_preferred_to_a_container_and_host_to_a_name(tmp_path: Path) -> None:
    netns_scan = scan((HOST, "/run/netns/default", (1, 2)), (BOX, "/run/netns/blue", (700,)))
    n = names(tmp_path, netns_scan=netns_scan)
    assert (n.label(HOST), n.label(BOX)) == ("host", "blue")


@pytest.mark.parametrize("name, label", [
    ("blue", "blue"), ("host", "netns host"), ("container 1a2b3c4d5e6f", "netns container 1a2b3c4d5e6f"),
    ("pod x", "netns pod x"), ("netns x", "netns netns x"), ("hosts", "hosts"),
])
def test_a_name_that_poses_as_another_label_is_marked(name: str, label: str) -> None:
    assert name_label(name) == label


@pytest.mark.parametrize("cgroup, label", [
    (None, None), ("/", None), ("/system.slice/nginx.service", None),
    (f"/system.slice/docker-{CONTAINER_ID}.scope", "container 1a2b3c4d5e6f"),
    (f"/libpod_parent/libpod-{CONTAINER_ID}", "container 1a2b3c4d5e6f"),
    (f"/kubepods/besteffort/pod{POD_UID}/{'cd' * 32}", f"pod {POD_UID}"),
    # A podman pod's cgroup is not a Kubernetes pod uid: its container is named.
    (f"/machine.slice/machine-libpod_pod_{'ef' * 32}.slice/libpod-{CONTAINER_ID}.scope",
     "container 1a2b3c4d5e6f"),
])
def test_containers_and_pods_from_cgroup_paths(cgroup: str | None, label: str | None) -> None:
    assert identity_label(cgroup) == label


def test_a_hostile_name_is_exact_in_json_and_escaped_in_text(tmp_path: Path) -> None:
    evil = "x\x1b]2;PWND\x07\x1b[2J\nforged\u202e\udcff"
    n = names(tmp_path, netns_scan=scan((BLUE, f"/run/netns/{evil}", ())))
    assert n.label(BLUE) == evil
    text = n.text(BLUE)
    assert text == f"{BLUE} (x\\x1b]2;PWND\\x07\\x1b[2J\\nforged\\u202e\\xff)"
    assert text.isprintable()


def test_netns_name_is_added_next_to_netns(tmp_path: Path) -> None:
    n = names(tmp_path)
    doc = with_netns_name({"a": 1, "netns": BLUE, "protocol": "tcp"}, n)
    assert list(doc.items()) == [("a", 1), ("netns", BLUE), ("netns_name", "blue"), ("protocol", "tcp")]
    assert with_netns_name({"netns": BARE}, n) == {"netns": BARE, "netns_name": None}
    assert with_netns_name({"port": 80}, n) == {"port": 80}
    explanation = netns_named({"verdict": "free", "blockers": [{"netns": HOST}]}, SCAN)
    assert explanation["blockers"] == [{"netns": HOST, "netns_name": "host"}]  # PID 1's, in SCAN


def test_each_source_is_read_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No scan given: one walk for the whole run; each cgroup read once."""
    proc = fake_proc(tmp_path, HOST_PROCS)
    walks, reads = [], []
    monkeypatch.setattr(nsnames, "list_netns", lambda p: walks.append(p) or SCAN)
    real = nsnames.cgroup_of
    monkeypatch.setattr(nsnames, "cgroup_of", lambda pid, p: reads.append(pid) or real(pid, p))
    n = NetnsNames(proc=proc, run_netns=(), self_pid=600)
    for _ in range(3):
        assert [n.label(i) for i in (HOST, BLUE, BOX, BARE, 12345)] == [
            "host", "blue", "container 1a2b3c4d5e6f", None, None]
    assert walks == [proc] and sorted(reads) == [700, 900]


def test_a_long_run_looks_again_for_a_namespace_made_since(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    later = scan(*[(r.inode, r.path, r.pids) for r in SCAN.namespaces],
                 (4026532999, "/run/netns/green", ()))
    walks = [SCAN, later]
    monkeypatch.setattr(nsnames, "list_netns", lambda p: walks.pop(0))
    n = NetnsNames(proc=fake_proc(tmp_path, HOST_PROCS), run_netns=(), self_pid=600,
                   refresh_s=0.0)
    assert n.label(BLUE) == "blue" and n.label(4026532999) == "green" and not walks


def test_a_file_that_is_not_a_mounted_namespace_names_nothing(tmp_path: Path) -> None:
    """A plain file in a directory of names (a failed `ip netns add` leaves
    one) is skipped, whatever inode it has."""
    other = tmp_path / "netns"
    other.mkdir()
    (other / "fake").write_text("")
    fake_inode = os.stat(other / "fake").st_ino
    n = NetnsNames(scan(), run_netns=(str(other),), self_pid=os.getpid())
    assert n.label(fake_inode) is None
