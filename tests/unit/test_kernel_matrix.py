"""The kernel matrix's decisions (scripts/kernel-matrix): which plans a
kernel should allow, what counts as a failing cell. The matrix itself is
the test of the kernels; these pin down its rules on recorded inputs."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest

from tests.scripts import load_script


@pytest.fixture(scope="module")
def km() -> ModuleType:
    return load_script("kernel-matrix")


def test_expected_plans_follow_the_config(km: ModuleType) -> None:
    full = {"CONFIG_KPROBES": "y", "CONFIG_DEBUG_INFO_BTF": "y",
            "CONFIG_DYNAMIC_FTRACE_WITH_DIRECT_CALLS": "y"}
    assert km.expected_plans(full) == {"fentry": None, "kprobe": None, "tracepoint": None}
    bare = {"CONFIG_DEBUG_INFO_BTF": "y"}
    got = km.expected_plans(bare)
    assert got["kprobe"] == "CONFIG_KPROBES off"
    assert "CONFIG_DYNAMIC_FTRACE_WITH_DIRECT_CALLS" in got["fentry"]
    assert got["tracepoint"] is None
    unknown = km.expected_plans(None)
    assert unknown["fentry"] and unknown["kprobe"] and unknown["tracepoint"] is None


def test_policy_refusal_is_not_a_verifier_rejection(km: ModuleType) -> None:
    assert km.refused_by_policy("the kernel refused the fentry program x (EPERM): BPF "
                                "trampolines are not allowed here")
    assert not km.refused_by_policy("verifier rejected ps_exit_bind: invalid mem access")
    assert not km.refused_by_policy("ps_fexit_get_port needs the kernel hook x")


def test_keyword_expressions_are_combined(km: ModuleType) -> None:
    assert km.with_keyword(["-x"], "not a") == ["-x", "-k", "not a"]
    assert km.with_keyword(["-k", "b", "-q"], "not a") == ["-q", "-k", "(b) and not a"]
    assert km.with_keyword(["-kc"], "not a") == ["-k", "(c) and not a"]


def test_marker_expressions_are_combined_apart_from_keywords(km: ModuleType) -> None:
    assert km.with_keyword(["-k", "b"], "not g", "-m") == ["-k", "b", "-m", "not g"]
    assert km.with_keyword(["-m", "h"], "not g", "-m") == ["-m", "(h) and not g"]


def test_a_plan_that_cannot_count_groups_runs_without_the_counting_tests(
        km: ModuleType) -> None:
    assert km.without_group_counting(["-q"], {"groups": "ok"}) == (["-q"], "")
    extra, note = km.without_group_counting(["-q"], {"groups": "ps_x calls the BPF helper y"})
    assert extra == ["-q", "-m", "not counts_groups"]
    assert note == "groups not counted with this plan here: ps_x calls the BPF helper y"


def test_junit_counts(km: ModuleType, tmp_path: Path) -> None:
    report = tmp_path / "j.xml"
    report.write_text('<testsuites><testsuite tests="10" failures="2" errors="1" skipped="3"/>'
                      '<testsuite tests="5" failures="0" errors="0" skipped="0"/></testsuites>')
    assert km.junit_counts(report) == {"passed": 9, "failed": 2, "errors": 1, "skipped": 3}
    report.write_text("<testsuites")
    assert km.junit_counts(report) is None


@pytest.mark.parametrize("packaged, ok", [(True, False), (False, True)])
def test_bcc_cell_without_headers(km: ModuleType, monkeypatch: pytest.MonkeyPatch,
                                  packaged: bool, ok: bool, tmp_path: Path) -> None:
    """A Debian kernel without its headers fails the bcc cell (setup-vm
    installs them); another kernel simply has none."""
    monkeypatch.setattr(km, "debian_packaged", lambda release: packaged)
    report = {"bcc": {"problem": "none are installed for 9.9"}}
    cell = km.run_bcc("9.9", report, [], tmp_path, [])
    assert cell.plan == "bcc" and cell.ok is ok
    assert ("none are installed" in cell.result) is packaged


def test_tests_line_counts_a_failing_cell_without_tests(km: ModuleType) -> None:
    cells = [km.Cell("6.18", "tracepoint", "298 passed", True, passed=298),
             km.Cell("6.1", "fentry", "295 passed, 1 failed", False, passed=295, failed=1),
             km.Cell("6.1", "-", "no result: timed out", False)]
    assert km.tests_line(cells) == "kernel-matrix: 593 passed, 2 failed"
    cells[0].skipped = 3
    assert km.tests_line(cells[:1]) == "kernel-matrix: 298 passed, 0 failed, 3 skipped"


def test_a_silent_guest_is_a_stall_named_by_its_cell(km: ModuleType, capsys, tmp_path: Path) -> None:
    """run_vm's watchdog, on a stand-in for vm-run that prints a cell's
    header, a kernel message and then nothing: killed after the stall time,
    with the cell; the kernel's line is in the console file, not echoed."""
    import time

    script = ("echo '=== kernel-matrix: 6.1.0-57-amd64, kprobe: -m pytest'; echo ....; "
              "echo '..[  444.721153] IPv6: ADDRCONF(NETDEV_CHANGE): v0: link becomes ready'; "
              "echo '[  123.456789] rcu: INFO: rcu_preempt self-detected stall'; sleep 60")
    console = tmp_path / "console.log"
    start = time.monotonic()
    code, cell = km.run_vm(["sh", "-c", script], {"PATH": "/usr/bin:/bin"}, stall=1.0,
                           console=console, tag="[6.1] ")
    assert (code, cell) == (-1, "kprobe")
    assert time.monotonic() - start < 30
    out = capsys.readouterr().out
    assert "[6.1] ....\n" in out  # the guest's output is passed on, tagged
    assert "rcu_preempt" not in out and "rcu_preempt self-detected" in km.console_tail(console)
    assert "[6.1] ..\n" in out and "IPv6" not in out  # one in the middle of the tests' line
    assert "...." in console.read_text()


def test_a_guest_that_finishes_is_not_a_stall(km: ModuleType, tmp_path: Path) -> None:
    code, cell = km.run_vm(["sh", "-c", "printf 'done\\nno newline'; exit 3"],
                           {"PATH": "/usr/bin:/bin"}, stall=5.0, console=tmp_path / "c.log")
    assert (code, cell) == (3, None)
    assert (tmp_path / "c.log").read_text() == "done\nno newline"


def test_kernels_boot_side_by_side_and_report_in_order(km: ModuleType, monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path) -> None:
    import threading
    import time

    running, most = set(), [0]
    lock = threading.Lock()

    def fake_booted(image, outdir, extra, covered, tag="", cpus=1):  # type: ignore[no-untyped-def]
        with lock:
            running.add(image)
            most[0] = max(most[0], len(running))
        time.sleep(0.3 if image.endswith("a") else 0.1)
        with lock:
            running.discard(image)
        return [km.Cell(image, "fentry", f"tag {tag!r}", True)]

    monkeypatch.setattr(km, "run_booted", fake_booted)
    monkeypatch.setenv("KERNEL_MATRIX_LANES", "2")
    cells = km.run_side_by_side(["/boot/vmlinuz-a", "/boot/vmlinuz-b", "/boot/vmlinuz-c"],
                                tmp_path, [], [])
    assert [c.kernel for c in cells] == ["/boot/vmlinuz-a", "/boot/vmlinuz-b", "/boot/vmlinuz-c"]
    assert most[0] == 2 and cells[0].result == "tag '[a] '"
    monkeypatch.setenv("KERNEL_MATRIX_LANES", "1")
    most[0] = 0
    cells = km.run_side_by_side(["/boot/vmlinuz-a", "/boot/vmlinuz-b"], tmp_path, [], [])
    assert most[0] == 1 and cells[0].result == "tag ''"
    monkeypatch.delenv("KERNEL_MATRIX_LANES")  # by default all at once
    most[0] = 0
    km.run_side_by_side(["/boot/vmlinuz-a", "/boot/vmlinuz-b", "/boot/vmlinuz-c"], tmp_path, [], [])
    assert most[0] == 3
