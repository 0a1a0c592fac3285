"""SRs built for the shared real radiographs validate and read back."""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import pydicom
import pytest

from cxr_edge.findings import Finding
from cxr_edge.labels import LABELS
from cxr_edge.sr import FINDING_CODES, ModelIdentity, build_sr, read_sr_findings

DICOM_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "dicom"
SOURCES = sorted(DICOM_DIR.glob("*.dcm")) if DICOM_DIR.is_dir() else []
MODEL = ModelIdentity(name="cxr-densenet121", version="1.0.0", sha256="0123abcd" * 8)

pytestmark = pytest.mark.skipif(not SOURCES, reason=f"no shared DICOMs in {DICOM_DIR}")


def _made_up_findings(seed: int) -> list[Finding]:
    rng = random.Random(seed)
    return [Finding(label, rng.random(), rng.uniform(0.2, 0.8)) for label in LABELS]


@pytest.fixture(scope="module", params=SOURCES, ids=lambda p: p.stem)
def built(request, tmp_path_factory):
    """(source header, findings, path of the written SR) for one source image."""
    source = pydicom.dcmread(request.param, stop_before_pixels=True)
    findings = _made_up_findings(seed=len(request.param.name))
    path = tmp_path_factory.mktemp("sr") / f"{request.param.stem}_sr.dcm"
    build_sr(source, findings, MODEL).save_as(path, enforce_file_format=True)
    return source, findings, path


def test_dciodvfy_reports_no_errors(built):
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) not installed")
    _, _, path = built
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    lines = (run.stdout + run.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    assert errors == [], "\n".join(lines)


def test_dsrdump_reads_without_complaint(built):
    if shutil.which("dsrdump") is None:
        pytest.skip("dsrdump (dcmtk) not installed")
    _, _, path = built
    run = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "Error" not in run.stderr and "Warning" not in run.stderr, run.stderr


def test_findings_read_back(built):
    _, findings, path = built
    got = read_sr_findings(hd.sr.srread(path))
    assert set(got) == set(LABELS)
    for finding in findings:
        probability, present = got[finding.label]
        assert probability == pytest.approx(finding.probability, abs=1e-6)
        assert present == finding.positive


def test_codes_and_header(built):
    source, _, path = built
    sr = hd.sr.srread(path)
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.Manufacturer == "cxr-edge"
    report = hd.sr.MeasurementReport.from_sequence([sr])
    groups = report.get_image_measurement_groups()
    assert len(groups) == len(LABELS)
    for group in groups:
        assert group.finding_type == FINDING_CODES[group.tracking_identifier]
        # Each group names the source image as the one it was measured on.
        referenced = {image.referenced_sop_instance_uid for image in group.source_images}
        assert referenced == {source.SOPInstanceUID}


def test_source_image_is_evidence(built):
    source, _, path = built
    sr = hd.sr.srread(path)
    evidence = [
        image
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for image in series.ReferencedSOPSequence
    ]
    assert [(e.ReferencedSOPClassUID, e.ReferencedSOPInstanceUID) for e in evidence] == [
        (source.SOPClassUID, source.SOPInstanceUID)
    ]


def test_refuses_unknown_label():
    source = pydicom.dcmread(SOURCES[0], stop_before_pixels=True)
    with pytest.raises(ValueError, match="no code"):
        build_sr(source, [Finding("Fracture", 0.9, 0.5)], MODEL)


def test_every_code_is_a_standard_scheme():
    # Private schemes make dciodvfy warn and mean nothing to a PACS.
    assert {c.scheme_designator for c in FINDING_CODES.values()} <= {"SCT", "DCM"}
    distinct = {(c.value, c.scheme_designator) for c in FINDING_CODES.values()}
    assert len(distinct) == len(LABELS)
