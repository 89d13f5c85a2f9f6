"""Every error a user can hit with `portscope trace`, provoked for real and
checked end to end: one sentence on stderr, the documented exit status, no
traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.needs import need_root, need_tool
from tracer.errors import ExitStatus

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.kernel


def portscope(*args: str, env: dict[str, str] | None = None,
              timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tracer.cli", *args],
        cwd=REPO, env={**os.environ, **(env or {})},
        capture_output=True, text=True, timeout=timeout,
    )


def assert_one_sentence(result: subprocess.CompletedProcess[str], status: int, words: str) -> None:
    assert result.returncode == status, result.stderr
    assert "Traceback" not in result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("portscope: ") and words in lines[0], lines[0]


@pytest.fixture(autouse=True)
def _root() -> None:
    need_root()


def test_not_root():
    """A real unprivileged user (nobody), with its own readable copy of the tool."""
    python = need_tool("/usr/bin/python3")
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp)
        copy.chmod(0o755)
        shutil.copytree(REPO / "tracer", copy / "tracer")
        shutil.copytree(REPO / "probes", copy / "probes")
        result = subprocess.run(
            [python, "-m", "tracer.cli", "trace", "--duration", "1"],
            cwd=copy, user=65534, group=65534, extra_groups=[],
            capture_output=True, text=True, timeout=30,
        )
    assert_one_sentence(result, ExitStatus.NO_PERMISSION, "needs root")


def test_root_without_capabilities():
    """uid 0 with every capability dropped is refused the same way."""
    setpriv = need_tool("setpriv")
    result = subprocess.run(
        [setpriv, "--bounding-set=-all", "--inh-caps=-all", "--securebits=+noroot,+noroot_locked",
         sys.executable, "-m", "tracer.cli", "trace", "--duration", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=30,
    )
    assert_one_sentence(result, ExitStatus.NO_PERMISSION, "needs root")


def test_missing_btf_file():
    result = portscope("trace", "--btf", "/nonexistent/vmlinux", "--duration", "1")
    assert_one_sentence(result, ExitStatus.UNSUPPORTED, "does not exist")


def test_garbage_btf_file(tmp_path):
    bad = tmp_path / "vmlinux"
    bad.write_bytes(b"\x7fELF not really")
    result = portscope("trace", "--btf", str(bad), "--duration", "1")
    assert_one_sentence(result, ExitStatus.UNSUPPORTED, "is not a usable BTF file")


def test_malformed_object(tmp_path):
    bad = tmp_path / "portscope.bpf.o"
    bad.write_bytes(os.urandom(4096))
    result = portscope("trace", "--duration", "1", env={"PORTSCOPE_OBJECT": str(bad)})
    assert_one_sentence(result, ExitStatus.USAGE, "is not a valid BPF object")


def test_missing_object(tmp_path):
    result = portscope("trace", "--duration", "1",
                       env={"PORTSCOPE_OBJECT": str(tmp_path / "gone.bpf.o")})
    assert_one_sentence(result, ExitStatus.USAGE, "is missing")


def test_verifier_rejection_is_summarised(tmp_path):
    """Build a variant of the real object that the verifier must refuse."""
    clang = need_tool("clang")
    obj = tmp_path / "rejected.bpf.o"
    subprocess.run(
        [clang, "-g", "-O2", "-target", "bpf", "-D__TARGET_ARCH_x86", "-DPS_TEST_VERIFIER_REJECT",
         f"-I{REPO / 'probes'}", "-c", str(REPO / "probes" / "portscope.bpf.c"), "-o", str(obj)],
        check=True,
    )
    result = portscope("trace", "--duration", "1", env={"PORTSCOPE_OBJECT": str(obj)})
    assert_one_sentence(result, ExitStatus.ERROR, "the kernel verifier rejected probe program")
    assert "unbounded memory access" in result.stderr
    # --debug keeps the whole log for whoever must dig.
    debug = portscope("--debug", "trace", "--duration", "1", env={"PORTSCOPE_OBJECT": str(obj)})
    assert "BEGIN PROG LOAD LOG" in debug.stderr or "processed" in debug.stderr


def test_plan_that_cannot_run_here_is_named():
    """Every plan this kernel refuses is named as such when asked for."""
    doctor = portscope("doctor", "--json")
    assert doctor.returncode == 0, doctor.stderr
    import json

    report = json.loads(doctor.stdout)
    for refused in [p["plan"] for p in report["plans"] if p["attach"] != "ok"]:
        result = portscope("trace", "--plan", refused, "--duration", "1")
        assert_one_sentence(result, ExitStatus.UNSUPPORTED,
                            f"the {refused} plan cannot run on this kernel")


def test_kprobes_hidden_is_named():
    """Where perf kprobes are missing (here: the kprobe PMU hidden in a
    private mount namespace, so that it holds on every kernel), asking for
    the kprobe plan is one sentence."""
    unshare = need_tool("unshare")
    script = ("if [ -d /sys/bus/event_source/devices/kprobe ]; then "
              "mount -t tmpfs none /sys/bus/event_source/devices/kprobe || exit 9; fi; "
              f"exec {sys.executable} -m tracer.cli trace --plan kprobe --duration 1")
    result = subprocess.run([unshare, "-m", "--propagation", "private", "sh", "-c", script],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert_one_sentence(result, ExitStatus.UNSUPPORTED, "kprobes are not available")


def test_tracefs_not_mounted_is_mounted_for_the_user():
    """In a private mount namespace without tracefs, portscope mounts it and works."""
    need_tool("unshare")
    # debugfs re-mounts tracefs under /sys/kernel/debug/tracing on access
    # (an automount), so it goes too.
    script = (
        "umount /sys/kernel/tracing 2>/dev/null; umount /sys/kernel/debug/tracing 2>/dev/null; "
        "umount /sys/kernel/debug 2>/dev/null; "
        "test ! -d /sys/kernel/tracing/events || exit 9; "
        "test ! -d /sys/kernel/debug/tracing/events || exit 9; "
        f"exec {sys.executable} -m tracer.cli doctor"
    )
    result = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "mounted tracefs at /sys/kernel/tracing" in result.stdout
    assert "tracepoint  yes    yes" in result.stdout
