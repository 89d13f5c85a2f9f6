"""What a test needs from the machine, and what happens when it is missing.

Outside CI a missing need skips with the reason. Under CI=true it fails: a
test that could not run must never be counted as a pass.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _emulated() -> bool:
    """Booted by scripts/vm-run (virtme-ng, software emulation: ~50x slower)."""
    try:
        return "virtme" in Path("/proc/cmdline").read_text()
    except OSError:
        return False


# How much longer anything takes here than on the machine itself. Waits for
# something that must happen are multiplied by it; a wait only lasts that long
# when the thing never comes, so the claims stay as strict.
SLOWDOWN = 50.0 if _emulated() else 1.0


def missing(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"required for this test but missing under CI: {reason}", pytrace=False)
    pytest.skip(reason)


def need_root() -> None:
    if os.geteuid() != 0:
        missing("needs root (BPF, network namespaces)")


def need_tool(name: str) -> str:
    path = shutil.which(name)
    if not path:
        missing(f"needs the {name} command")
    return path or ""
