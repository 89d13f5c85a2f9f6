"""Fixtures for the tests against the running kernel (root, BPF, netns).

These tests prove the tracer against what the kernel really does, so they
need root and a kernel that loads the probes. Where that is missing they
skip with the reason, except under ``CI=true``, where a skipped kernel test
would hide a broken CI machine: there they fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Iterator

import pytest
from harness import EventCollector, Netns

from tests.needs import SLOWDOWN, missing

KERNEL_TESTS = Path(__file__).resolve().parent


def _stretch_subprocess_deadlines(factor: float) -> None:
    """Under software emulation, every deadline a test gives a command it runs
    (subprocess.run, Popen.wait and communicate: ``portscope doctor`` must
    finish within 30 s, and so on) is ``factor`` times longer. A deadline
    there bounds how long a command may take, which emulation stretches; none
    is a claim about speed (those are the benchmarks'), and one that would
    never end still fails."""
    communicate, wait = subprocess.Popen.communicate, subprocess.Popen.wait
    inside = threading.local()  # communicate() waits through wait(): stretch once

    def stretched(call, self, timeout, *args):  # type: ignore[no-untyped-def]
        if getattr(inside, "depth", 0) or timeout is None:
            return call(self, *args, timeout=timeout)
        inside.depth = 1
        try:
            return call(self, *args, timeout=timeout * factor)
        finally:
            inside.depth = 0

    def patient_communicate(self, input=None, timeout=None):  # type: ignore[no-untyped-def]
        return stretched(communicate, self, timeout, input)

    def patient_wait(self, timeout=None):  # type: ignore[no-untyped-def]
        return stretched(wait, self, timeout)

    subprocess.Popen.communicate = patient_communicate  # type: ignore[method-assign]
    subprocess.Popen.wait = patient_wait  # type: ignore[method-assign]


if SLOWDOWN > 1:
    _stretch_subprocess_deadlines(SLOWDOWN)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test in this folder needs the kernel: mark it so ``-m`` can select it.

    Tests marked ``bcc`` need the running kernel's headers, which CI's own
    kernel lacks: they belong to the kernel matrix's bcc cell
    (PORTSCOPE_ENGINE=bcc), and are deselected (not skipped) elsewhere."""
    bcc_cell = os.environ.get("PORTSCOPE_ENGINE") == "bcc"
    kept, dropped = [], []
    for item in items:
        if KERNEL_TESTS in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.kernel)
        (dropped if item.get_closest_marker("bcc") and not bcc_cell else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.fixture(scope="session")
def root() -> None:
    if os.geteuid() != 0:
        missing("needs root (network namespaces, other uids, BPF); run as root")
    if shutil.which("ip") is None:
        missing("needs the ip command (iproute2) for network namespaces")


@pytest.fixture(scope="session")
def tracer(root: None) -> Iterator[EventCollector]:
    """One engine for the whole session, tracing every call, failed or not."""
    from tracer.engine import EngineConfig
    from tracer.errors import PortscopeError
    from tracer.loader import open_engine

    try:
        engine = open_engine(EngineConfig(errors_only=False))
    except (PortscopeError, OSError) as exc:
        missing(f"the BPF probes cannot be loaded: {type(exc).__name__}: {exc}")
    try:
        yield EventCollector(engine)
    finally:
        engine.close()


@pytest.fixture
def netns(request: pytest.FixtureRequest, root: None) -> Iterator[Netns]:
    """A fresh namespace, deleted (with its actors) even when the test fails.

    If the test also uses ``tracer``, the collector forgets older events and
    keeps only this namespace's, so that events are matched to this test.
    """
    collector = request.getfixturevalue("tracer") if "tracer" in request.fixturenames else None
    ns = Netns()
    try:
        if collector is not None:
            collector.follow(ns.inode)
        yield ns
    finally:
        ns.close()
