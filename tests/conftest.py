"""Shared test fixtures: paths to the real data, in the repo (samples/) and beside it (../shared)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples"
SHARED_DATA = REPO.parent / "shared" / "data"


def shared(*parts: str) -> Path:
    """A path under ../shared/data; skips the test with a reason when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path} (../shared/data is present in CI, not in a user's clone)")
    return path


def need_tool(name: str) -> str:
    path = shutil.which(name)
    if not path:
        pytest.skip(f"needs `{name}` on PATH (Debian: dcmtk / dicom3tools; .ci/run installs them)")
    return path
