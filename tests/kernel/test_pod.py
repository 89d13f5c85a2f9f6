"""The DaemonSet's pod, run for real: the image built by scripts/build-image
(Debian's packages, no registry), started by scripts/run-pod with exactly
the settings of deploy/portscope-daemonset.yaml (host PID and network
namespaces, all capabilities dropped but the listed ones, seccomp
unconfined, the three host mounts, a read-only root filesystem, not
privileged), then asked what an operator would ask of it: metrics on 9977,
a failed bind() of a host process counted, and one of a process in another
container counted with that container's id.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.needs import missing, need_root, need_tool
from tests.scripts import load_script

ROOT = Path(__file__).resolve().parents[2]
METRICS = "http://127.0.0.1:9977/metrics"
POD = "portscope-test-pod"
START_TIMEOUT_S = 60.0

CAP_BITS = {"BPF": 39, "PERFMON": 38, "NET_ADMIN": 12, "SYS_ADMIN": 21, "SYS_PTRACE": 19,
            "DAC_READ_SEARCH": 2}
NOBODY = 65534
GROUP_PORT = 47200


def run_pod_module():  # type: ignore[no-untyped-def]
    return load_script("run-pod")


@pytest.fixture(scope="module")
def image() -> Iterator[dict[str, float]]:
    need_root()
    for tool in ("podman", "mmdebstrap", "runc"):
        need_tool(tool)
    started = time.monotonic()
    out = subprocess.run([str(ROOT / "scripts" / "build-image")], capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    size = re.search(r", (\d+) MB$", out.stdout.strip())
    assert size, out.stdout
    yield {"build_s": time.monotonic() - started, "size_mb": float(size[1])}


def scrape() -> str:
    try:
        with urllib.request.urlopen(METRICS, timeout=5) as r:  # noqa: S310 - loopback
            return r.read().decode()
    except OSError:
        return ""


def failures(text: str) -> list[dict[str, str]]:
    """The labels and value of every portscope_failures_total sample."""
    return [{**s.labels, "value": str(s.value)} for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == "portscope_failures_total"]


def podman(*args: str, check: bool = True) -> str:
    out = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=120)
    if check:
        assert out.returncode == 0, f"podman {' '.join(args)}: {out.stderr}"
    return out.stdout.strip()


@pytest.fixture(scope="module")
def pod(image: dict[str, float]) -> Iterator[dict[str, float]]:
    with socket.socket() as probe:  # SO_REUSEADDR: TIME_WAITs of earlier scrapes do not count
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("0.0.0.0", 9977))
        except OSError:
            missing("port 9977 (the DaemonSet's metrics port) is taken on this host")
    podman("rm", "-f", POD, check=False)
    started = time.monotonic()
    out = subprocess.run([str(ROOT / "scripts" / "run-pod"), "--name", POD], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    try:
        while "portscope_probe_plan_info{" not in scrape():
            state = podman("inspect", "-f", "{{.State.Status}}", POD)
            assert state == "running" and time.monotonic() - started < START_TIMEOUT_S, \
                f"the pod is {state}:\n{podman('logs', POD, check=False)}"
            time.sleep(0.1)
        yield {**image, "start_s": time.monotonic() - started}
    finally:
        print(podman("logs", POD, check=False), file=sys.stderr)
        podman("rm", "-f", POD, check=False)


def test_the_pod_starts_with_the_manifests_settings_and_serves_metrics(pod: dict[str, float]) -> None:
    print(f"image {pod['size_mb']:.0f} MB, built in {pod['build_s']:.0f} s; "
          f"metrics served {pod['start_s']:.1f} s after podman run")
    assert pod["size_mb"] < 150
    # Not BPF, PERFMON or NET_ADMIN (the manifest says why): the probes
    # loaded and the metrics came without them.
    manifest = run_pod_module().load()
    ctx = manifest["spec"]["template"]["spec"]["containers"][0]["securityContext"]
    pid = podman("inspect", "-f", "{{.State.Pid}}", POD)
    status = Path(f"/proc/{pid}/status").read_text()
    effective = int(re.search(r"^CapEff:\s+([0-9a-f]+)$", status, re.M)[1], 16)  # type: ignore[index]
    wanted = sum(1 << CAP_BITS[c] for c in ctx["capabilities"]["add"])
    assert effective == wanted, f"CapEff {effective:#x}, the manifest's {wanted:#x}"
    assert re.search(r"^NoNewPrivs:\s+1$", status, re.M)
    assert re.search(r"^Seccomp:\s+0$", status, re.M), "seccomp: unconfined"
    # Host PID and network namespaces; the root filesystem is read-only.
    for ns in ("pid", "net"):
        assert Path(f"/proc/{pid}/ns/{ns}").stat().st_ino == Path(f"/proc/self/ns/{ns}").stat().st_ino
    touch = subprocess.run(["podman", "exec", POD, "python3", "-c", "open('/portscope-was-here', 'w')"],
                           capture_output=True, text=True, timeout=60)
    assert touch.returncode != 0 and "Read-only file system" in touch.stderr
    assert podman("inspect", "-f", "{{.HostConfig.Privileged}}", POD) == "false"


BIND_TWICE = """
import socket, sys
port = int(sys.argv[1])
a = socket.socket(); a.bind(("127.0.0.1", port)); a.listen()
b = socket.socket()
try:
    b.bind(("127.0.0.1", port))
except OSError as exc:
    print(exc.errno)
"""


def wait_failure(port: int, timeout: float = 30.0) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [f for f in failures(scrape()) if f["port"] == str(port) and f["call"] == "bind"]
        if found:
            assert len(found) == 1, found
            return found[0]
        time.sleep(0.2)
    raise AssertionError(f"no failure on port {port} in the pod's metrics:\n{scrape()}")


def test_a_host_process_that_fails_a_bind_is_counted(pod: dict[str, float]) -> None:
    port = 47101
    out = subprocess.run(["/usr/bin/python3", "-c", BIND_TWICE, str(port)], capture_output=True,
                         text=True, timeout=60)
    assert out.stdout.strip() == "98", out.stdout + out.stderr  # EADDRINUSE
    found = wait_failure(port)
    assert (found["errno"], found["comm"], found["value"]) == ("EADDRINUSE", "python3", "1.0")
    assert found["container"] == ""
    assert found["netns"] == str(Path("/proc/self/ns/net").stat().st_ino)


def test_a_process_in_another_container_is_counted_with_its_container_id(
        pod: dict[str, float]) -> None:
    """A second container, in a network namespace of its own (no network):
    its failed bind is counted with its id and its namespace."""
    port = 47102
    name = "portscope-test-other"
    podman("rm", "-f", name, check=False)
    host = run_pod_module().host_options()
    try:
        cid = podman("run", "--detach", "--name", name, *host, "--network=none", "--pull=never",
                     "--entrypoint=python3", "portscope:0.1.0", "-c",
                     BIND_TWICE + "\nimport time; time.sleep(60)", str(port))
        netns = None
        deadline = time.monotonic() + 30
        while netns is None and time.monotonic() < deadline:
            pid = podman("inspect", "-f", "{{.State.Pid}}", name)
            if pid and pid != "0":
                netns = Path(f"/proc/{pid}/ns/net").stat().st_ino
            time.sleep(0.1)
        found = wait_failure(port)
        assert (found["errno"], found["comm"]) == ("EADDRINUSE", "python3")
        assert found["container"] == cid[:12], (found, cid)
        assert found["netns"] == str(netns)
    finally:
        podman("rm", "-f", name, check=False)


# ---- each capability, proven by leaving it out ---------------------------------

# A reuseport group of two listeners served by a process of another user
# (nobody), waiting in select(): who serves it is read from /proc entries
# the kernel guards.
NOBODY_SERVER = """
import select, socket, sys
listeners = []
for _ in range(2):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", int(sys.argv[1])))
    s.listen()
    listeners.append(s)
print("ready", flush=True)
while True:
    select.select(listeners, [], [], 60)
"""


@pytest.fixture(scope="module")
def nobody_group(image: dict[str, float]) -> Iterator[int]:
    server = subprocess.Popen(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                               "/usr/bin/python3", "-c", NOBODY_SERVER, str(GROUP_PORT)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout and server.stdout.readline().strip() == "ready"
        yield server.pid
    finally:
        server.kill()
        server.wait()


def groups_in_pod(without_cap: str | None) -> subprocess.CompletedProcess[str]:
    """`portscope groups PORT --json` in the pod, run as the manifest asks
    but without ``without_cap`` (None: with all the manifest lists)."""
    cmd = run_pod_module().command(name="portscope-test-cap", without_cap=without_cap,
                                   args=["groups", str(GROUP_PORT), "--json"], detach=False)
    cmd.insert(2, "--rm")
    podman("rm", "-f", "portscope-test-cap", check=False)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def takers(out: subprocess.CompletedProcess[str]) -> tuple[list[set[int]], dict[str, int]]:
    """Who accepts on each member, and the health counts, from groups --json."""
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    (group,) = [g for g in doc["groups"] if g["port"] == GROUP_PORT]
    return [{a["pid"] for a in m["acceptors"]} for m in group["members"]], doc["health"]


def test_with_the_manifests_capabilities_the_pod_names_who_accepts(nobody_group: int) -> None:
    served, health = takers(groups_in_pod(None))
    assert served == [{nobody_group}, {nobody_group}] and health["acceptors_unread"] == 0


def cannot_load_probes(out: subprocess.CompletedProcess[str], server: int) -> None:
    assert out.returncode == 3  # not permitted
    assert "needs root (or CAP_SYS_ADMIN, or CAP_BPF and CAP_PERFMON) to load its probes" \
        in out.stderr, out.stderr


def cannot_name_who_accepts(out: subprocess.CompletedProcess[str], server: int) -> None:
    served, health = takers(out)
    assert served == [set(), set()] and health["acceptors_unread"] >= 1, (served, health)


# What each capability of the manifest is for: what breaks without it.
WITHOUT = {
    # The probes (BPF and PERFMON are not granted: SYS_ADMIN stands for
    # them), and setns() into the namespaces for every inventory.
    "SYS_ADMIN": cannot_load_probes,
    "SYS_PTRACE": cannot_name_who_accepts,  # task/TID/syscall of another user's threads
    "DAC_READ_SEARCH": cannot_name_who_accepts,  # another user's fdinfo and task files
}


def test_every_capability_of_the_manifest_is_proven() -> None:
    manifest = run_pod_module().load()
    added = manifest["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"]
    assert set(added) == set(WITHOUT)


@pytest.mark.parametrize("cap", sorted(WITHOUT))
def test_without_one_capability(cap: str, nobody_group: int) -> None:
    out = groups_in_pod(cap)
    print(f"without CAP_{cap}: exit {out.returncode}; {out.stderr.strip().splitlines()[-1:]}")
    WITHOUT[cap](out, nobody_group)
