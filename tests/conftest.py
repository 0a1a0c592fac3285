"""Shared test fixtures: paths to the real data, in the repo (samples/, tests/data/) and beside it (../shared)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples"
# 241 real NIH ChestX-ray14 images at 64x64 (labels.csv + images/): for the tests that need many
# labeled images (INT8 calibration and its gate, training, a daemon burst). See its README.md.
NIH_TINY64 = REPO / "tests" / "data" / "nih_tiny64"
SHARED_DATA = REPO.parent / "shared" / "data"


def shared(*parts: str, why: str = "") -> Path:
    """A path under ../shared/data; skips the test, saying what it needs and `why`, when it is
    absent. Only for what samples/ and tests/data cannot hold (the whole 98 MB NIH set)."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path}{': ' + why if why else ''} (../shared/data is present in CI, not in a user's clone)")
    return path


def need_tool(name: str) -> str:
    path = shutil.which(name)
    if not path:
        pytest.skip(f"needs `{name}` on PATH (Debian: dcmtk / dicom3tools; .ci/run installs them)")
    return path


def _descendants(root: int) -> list[int]:
    from .daemon_helpers import live_processes

    children: dict[int, list[int]] = {}
    for pid, parent, _ in live_processes():
        children.setdefault(parent, []).append(pid)
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def pytest_sessionfinish(session, exitstatus):
    """A child process that outlives the suite (a leaked daemon, a stuck pool worker) would keep
    pytest from exiting and CI waiting forever: name it, kill it, and fail the run."""
    import os
    import signal

    if not Path("/proc").is_dir():
        return
    leftovers = _descendants(os.getpid())
    for pid in leftovers:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            os.kill(pid, signal.SIGKILL)
        except OSError:
            continue
        print(f"\nconftest: killed process {pid} left running by the tests: {cmdline[:200]}")
    if leftovers and session.exitstatus == 0:
        session.exitstatus = 1
