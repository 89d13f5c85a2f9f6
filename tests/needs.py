"""What a test needs from the machine, and what happens when it is missing.

Outside CI a missing need skips with the reason. Under CI=true it fails: a
test that could not run must never be counted as a pass.
"""

from __future__ import annotations

import os
import shutil

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


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
