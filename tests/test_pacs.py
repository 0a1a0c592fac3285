"""A real PACS round trip on loopback: storescu -> cxr-edge's SCP -> SR -> C-STORE -> Orthanc."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import REPO, SAMPLES, need_tool

pytestmark = pytest.mark.slow


def test_srs_arrive_in_orthanc_in_the_source_study(tmp_path):
    need_tool("Orthanc")
    need_tool("storescu")
    need_tool("unshare")
    need_tool("ip")
    probe = subprocess.run(["unshare", "--net", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"needs a private network namespace (unshare --net, as root): {probe.stderr.strip()}")
    dicoms = sorted((SAMPLES / "dicom").glob("*.dcm"))
    proc = subprocess.run(["unshare", "--net", sys.executable, str(REPO / "tests" / "pacs_roundtrip.py"), str(tmp_path),
                           *map(str, dicoms)], capture_output=True, text=True, timeout=600, cwd=REPO)
    logs = "".join((tmp_path / name).read_text()[-2000:] for name in ("daemon.log", "orthanc.log")
                   if (tmp_path / name).exists())
    assert proc.returncode == 0, proc.stdout + proc.stderr + logs
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["srs_in_orthanc"] == len(dicoms)
    assert summary["sr_studies"] == summary["source_studies"]  # each SR in its source's study
    assert summary["sends_failed_while_pacs_down"] == len(dicoms)  # queued, retried, then delivered
    assert summary["intruder_returncode"] != 0  # a calling AE not on the allow-list is rejected
    assert len(summary["inbox_files"]) == len(dicoms)  # and nothing it sent reached the inbox
