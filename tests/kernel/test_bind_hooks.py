"""BPF programs on a cgroup that refuse binds, made for real.

A cgroup/bind4 program (tests/kernel/bpf/deny_bind.bpf.c, compiled here
with clang against probes/vmlinux.h) refuses every bind() to port 7777 of
the processes of a test cgroup. A process there binds for real: the kernel
says EPERM; the traced event's explanation must name the program (id, name,
hook, cgroup) as the cause; ``why`` asked for that cgroup must name it as a
caveat; ``doctor`` must list it; and a process outside the cgroup binds the
same port fine, with no program named.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
from harness import Actor, EventCollector, Netns

from tests.needs import missing, need_tool
from tracer.cgroups import cgroup2_root
from tracer.onthespot import OnTheSpot

ROOT = Path(__file__).resolve().parents[2]
PORTSCOPE = [sys.executable, "-m", "tracer.cli"]
PORT = 7777


@pytest.fixture(scope="module")
def denying_cgroup(root: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    clang, bpftool = need_tool("clang"), need_tool("bpftool")
    cg_root = cgroup2_root()
    if not cg_root:
        missing("needs cgroup v2")
    obj = tmp_path_factory.mktemp("bpf") / "deny_bind.bpf.o"
    subprocess.run([clang, "-O2", "-g", "-target", "bpf", "-D__TARGET_ARCH_x86",
                    f"-I{ROOT / 'probes'}", "-c", str(ROOT / "tests/kernel/bpf/deny_bind.bpf.c"),
                    "-o", str(obj)], check=True)
    name = f"portscope-test-hook-{os.getpid()}"
    cgroup = os.path.join(cg_root, name)
    pin = f"/sys/fs/bpf/{name}"
    os.mkdir(cgroup)
    try:
        subprocess.run([bpftool, "prog", "load", str(obj), pin, "type", "cgroup/bind4"],
                       check=True)
        subprocess.run([bpftool, "cgroup", "attach", cgroup, "bind4", "pinned", pin],
                       check=True)
        yield "/" + name
    finally:
        subprocess.run([bpftool, "cgroup", "detach", cgroup, "bind4", "pinned", pin],
                       capture_output=True)
        if os.path.exists(pin):
            os.unlink(pin)
        os.rmdir(cgroup)


def _into(cgroup: str, pid: int) -> None:
    with open(os.path.join(cgroup2_root() or "", cgroup.lstrip("/"), "cgroup.procs"), "w") as f:
        f.write(str(pid))


def test_a_refusing_program_is_named(denying_cgroup: str, netns: Netns,
                                     tracer: EventCollector) -> None:
    inside, outside = Actor(netns), Actor(netns)
    _into(denying_cgroup, inside.pid)
    t = inside.bind(inside.socket("tcp"), "0.0.0.0", PORT)
    assert t.errno == errno.EPERM, t.describe()  # the program said no
    assert outside.bind(outside.socket("tcp"), "127.0.0.1", PORT).errno == 0
    (ev,) = tracer.wait_for(t)
    spot = OnTheSpot()
    try:
        x = spot.explain(ev)
    finally:
        spot.close()
    assert x is not None and [r.rule for r in x.reasons] == ["bind_hook"]
    (hook,) = x.reasons[0].facts["hooks"]
    assert hook["hook"] == "bind4" and hook["cgroup"] == denying_cgroup
    assert hook["name"] == "ps_test_deny_77"  # the kernel keeps 15 characters of a name
    assert hook["program_id"] > 0


def test_why_and_doctor_name_the_program(denying_cgroup: str) -> None:
    r = subprocess.run([*PORTSCOPE, "why", str(PORT), "--cgroup", denying_cgroup, "--json"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    doc = json.loads(r.stdout)
    (note,) = [n for n in doc["notes"] if n["kind"] == "bind_hook"]
    assert [h["cgroup"] for h in note["params"]["hooks"]] == [denying_cgroup]
    plain = subprocess.run([*PORTSCOPE, "why", str(PORT), "--cgroup", "/", "--json"], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    assert not [n for n in json.loads(plain.stdout)["notes"] if n["kind"] == "bind_hook"]
    d = subprocess.run([*PORTSCOPE, "doctor", "--json"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    hooks = json.loads(d.stdout)["bind_hooks"]
    assert [h for h in hooks if h["cgroup"] == denying_cgroup and h["hook"] == "bind4"]
