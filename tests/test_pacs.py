"""A real PACS round trip on loopback: storescu -> cxr-edge's SCP -> SR -> C-STORE -> Orthanc."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import REPO, SAMPLES, need_tool

pytestmark = pytest.mark.slow


def _need_private_network() -> None:
    for tool in ("Orthanc", "storescu", "unshare", "ip"):
        need_tool(tool)
    probe = subprocess.run(["unshare", "--net", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"needs a private network namespace (unshare --net, as root): {probe.stderr.strip()}")


def test_srs_and_heatmaps_arrive_in_orthanc_in_the_source_study(tmp_path):
    _need_private_network()
    dicoms = sorted((SAMPLES / "dicom").glob("*.dcm"))
    proc = subprocess.run(["unshare", "--net", sys.executable, str(REPO / "tests" / "pacs_roundtrip.py"), str(tmp_path),
                           *map(str, dicoms)], capture_output=True, text=True, timeout=600, cwd=REPO)
    logs = "".join(p.read_text()[-2000:] for p in [*sorted(tmp_path.glob("daemon-*.log")), tmp_path / "orthanc.log"]
                   if p.exists())
    assert proc.returncode == 0, proc.stdout + proc.stderr + logs
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["srs_in_orthanc"] == len(dicoms)
    assert summary["sr_studies"] == summary["source_studies"]  # each SR in its source's study
    # the heatmaps went with the SRs: each one the records name, once, in its source's study
    assert summary["heatmaps_expected"] >= 1 and summary["heatmaps_in_orthanc"] == summary["heatmaps_expected"]
    assert summary["heatmaps_in_their_source_study"], summary
    assert summary["sends_failed_while_pacs_down"] == len(dicoms)  # queued, retried, then delivered
    assert summary["intruder_returncode"] != 0  # a calling AE not on the allow-list is rejected
    assert len(summary["inbox_files"]) == len(dicoms)  # and nothing it sent reached the inbox


def test_sigkill_mid_batch_then_restart_every_source_gets_exactly_one_sr_in_orthanc(tmp_path):
    """Recovery queues the sends of inputs completed before the kill, and SRs made or sent again
    keep their SOP Instance UID: 20 sources, 20 SRs in Orthanc, one per study."""
    _need_private_network()
    dicoms = sorted((SAMPLES / "dicom").glob("*.dcm"))
    proc = subprocess.run(["unshare", "--net", sys.executable, str(REPO / "tests" / "pacs_crash.py"), str(tmp_path),
                           *map(str, dicoms)], capture_output=True, text=True, timeout=900, cwd=REPO)
    logs = "".join(p.read_text()[-3000:] for p in sorted(tmp_path.glob("daemon-*.log")))
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:] + logs
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["srs_in_orthanc"] == summary["sources"] == summary["studies_with_one_sr"] == 20, summary
    assert summary["done_when_killed"] < 20 and not summary["studies_with_more"], summary
    assert summary["heatmaps_expected"] >= 1 and summary["heatmaps_as_expected"], summary
    assert summary["heatmaps_in_orthanc"] == summary["heatmaps_expected"], summary
