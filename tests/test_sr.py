"""SRs built for the real radiographs validate, read back, and are highdicom's document.

build_sr fills in a template (cxr_edge.sr_template); build_sr_reference builds the same SR with
highdicom's constructors. With highdicom's clock fixed to the `now` given to build_sr, the two
must be equal element by element at every level, and so must their encoded files.
"""

from __future__ import annotations

import datetime
import html
import multiprocessing
import random
import re
import shutil
import subprocess
import threading
import types
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import highdicom as hd
import highdicom.base
import highdicom.base_content
import highdicom.sr.sop
import pydicom
import pytest
from pydicom.charset import convert_encodings
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.tag import Tag
from pydicom.uid import generate_uid

from cxr_edge.dicom_splice import elements
from cxr_edge.findings import Finding, summary_text
from cxr_edge.labels import LABELS
from cxr_edge.outputs import dicom_bytes
from cxr_edge.sr import (
    FINDING_CODES, ModelIdentity, build_sr, build_sr_reference, read_sr_findings,
)  # fmt: skip
from cxr_edge.sr_template import _template, template_for

from .conftest import SAMPLES, SHARED_DATA

# The repo's samples (MONOCHROME1 DX, J2K CR, JPEG CR), and the shared files not among them.
_SAMPLE_FILES = sorted((SAMPLES / "dicom").glob("*.dcm"))
_SHARED_DIR = SHARED_DATA / "dicom"
SOURCES = _SAMPLE_FILES + sorted(
    p for p in (_SHARED_DIR.glob("*.dcm") if _SHARED_DIR.is_dir() else [])
    if p.name not in {s.name for s in _SAMPLE_FILES})
MODEL = ModelIdentity(name="cxr-densenet121", version="1.0.0", sha256="0123abcd" * 8)
NOW = datetime.datetime(2024, 5, 6, 7, 8, 9, 123456)
UIDS = {"series_instance_uid": generate_uid(entropy_srcs=["test_sr", "series"]),
        "sop_instance_uid": generate_uid(entropy_srcs=["test_sr", "instance"])}


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


def test_a_reader_sees_the_summary_and_probabilities_at_three_decimals(built):
    """dcmtk's dsr2html renders what a reader sees: the summary of the flagged findings, and each
    probability at the precision a report shows (not "0.02988488632065")."""
    if shutil.which("dsr2html") is None:
        pytest.skip("dsr2html (dcmtk) not installed")
    _, findings, path = built
    run = subprocess.run(["dsr2html", str(path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    text = html.unescape(re.sub(r"<[^>]+>", " ", run.stdout))
    assert summary_text(findings) in " ".join(text.split())
    numbers = re.findall(r"\b0\.\d+\b", text.split("Qualitative Evaluations")[0])
    assert numbers and all(len(n) <= 5 for n in numbers), numbers  # 0.xyz, thresholds too
    summary_items = [item for item in hd.sr.srread(path).ContentSequence
                     if item.ConceptNameCodeSequence[0].CodeValue == "C0034375"]  # TID 1500 row 12
    assert [i.ContentSequence[0].TextValue for i in summary_items] == [summary_text(findings)]


def test_findings_read_back(built):
    _, findings, path = built
    got = read_sr_findings(hd.sr.srread(path))
    assert set(got) == set(LABELS)
    for finding in findings:
        probability, present = got[finding.label]
        assert probability == round(finding.probability, 3)  # the precision a report shows
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


# --- the template (fast) path is highdicom's document ---------------------------------------------


@pytest.fixture
def frozen_clock(monkeypatch):
    """highdicom stamps the creation / content dates and times and the contribution date-time
    with datetime.datetime.now(): fixed to NOW, the `now` build_sr is given, so that the two
    documents can be compared whole."""
    class Frozen(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return NOW

    clock = types.SimpleNamespace(**vars(datetime))
    clock.datetime = Frozen
    for module in (highdicom.base, highdicom.sr.sop, highdicom.base_content):
        monkeypatch.setattr(module, "datetime", clock)


def _encoded(element, encodings) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_data_element(fp, element, encodings)
    return fp.getvalue()


def differences(expected, got, encodings, where: str = "") -> list[str]:
    """Every element, at every level, that is not in both datasets with the same VR and the
    same value (compared as encoded: highdicom's in-memory float behind a DS and the DS string
    the file holds are one value)."""
    found = []
    for tag in sorted(set(expected.keys()) | set(got.keys())):
        path = f"{where}{Tag(tag)}"
        if tag not in got or tag not in expected:
            found.append(f"{path} only in {'highdicom' if tag in expected else 'build_sr'}'s")
            continue
        a, b = expected[tag], got[tag]
        if a.VR != b.VR:
            found.append(f"{path}: VR {a.VR} != {b.VR}")
        elif a.VR == "SQ":
            if len(a.value) != len(b.value):
                found.append(f"{path}: {len(a.value)} != {len(b.value)} items")
            for i, (x, y) in enumerate(zip(a.value, b.value)):
                found += differences(x, y, encodings, f"{path}[{i}]/")
        elif _encoded(a, encodings) != _encoded(b, encodings):
            found.append(f"{path}: {a.value!r} != {b.value!r}")
    return found


def assert_same_document(reference, fast):
    encodings = convert_encodings(reference.get("SpecificCharacterSet", "ISO_IR 6"))
    assert differences(reference, fast, encodings) == []
    assert differences(reference.file_meta, fast.file_meta, encodings) == []
    assert reference.preamble == fast.preamble
    assert dicom_bytes(reference) == dicom_bytes(fast)


FINDING_SETS = {
    "mixed": lambda: _made_up_findings(seed=11),
    "all-positive": lambda: [Finding(label, 0.9, 0.5) for label in LABELS],
    "all-negative": lambda: [Finding(label, 0.1, 0.5) for label in LABELS],
}


@pytest.mark.parametrize("findings", list(FINDING_SETS), ids=str)
@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.stem)
def test_template_path_equals_highdicom(path, findings, frozen_clock):
    source = pydicom.dcmread(path, stop_before_pixels=True)
    made = FINDING_SETS[findings]()
    fast = build_sr(source, made, MODEL, now=NOW, **UIDS)
    reference = build_sr_reference(source, made, MODEL, **UIDS)
    assert isinstance(reference, hd.sr.ComprehensiveSR) and not isinstance(fast, hd.sr.ComprehensiveSR)
    assert_same_document(reference, fast)


def _edited(tmp_path: Path, base: Path, charset=None, name: str = "edited", **values) -> pydicom.Dataset:
    """The real file `base` with `values` set (written in `charset`), read back as a header."""
    ds = pydicom.dcmread(base)
    if charset is not None:
        ds.SpecificCharacterSet = charset
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    path = tmp_path / f"{base.stem}-{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path, stop_before_pixels=True)


def test_template_path_equals_highdicom_for_utf8_and_animal_headers(tmp_path, frozen_clock):
    """Root attributes are copied per input: a UTF-8 SR (from ISO 2022 Japanese) and the
    animal-patient attributes (a different set of Patient module attributes) included."""
    species = pydicom.Dataset()
    species.CodeValue, species.CodingSchemeDesignator = "448771007", "SCT"
    species.CodeMeaning = "Canis lupus familiaris"
    japanese = _edited(tmp_path, _SAMPLE_FILES[2], ["", "ISO 2022 IR 87"],
                       PatientName="Yamada^Tarou=山田^太郎=やまだ^たろう", PatientID="JP001")
    canine = _edited(tmp_path, _SAMPLE_FILES[0], "ISO_IR 100", PatientSpeciesDescription="Chien",
                     PatientSpeciesCodeSequence=[species], ResponsiblePerson="Dupont^Hélène",
                     ResponsibleOrganization="Clinique vétérinaire", PatientSexNeutered="ALTERED")
    findings = _made_up_findings(seed=5)
    for source in (japanese, canine):
        fast = build_sr(source, findings, MODEL, now=NOW, **UIDS)
        assert fast.SpecificCharacterSet == "ISO_IR 192"
        assert_same_document(build_sr_reference(source, findings, MODEL, **UIDS), fast)


def test_subsets_and_orders_of_labels_get_their_own_template(frozen_clock):
    source = pydicom.dcmread(SOURCES[0], stop_before_pixels=True)
    findings = _made_up_findings(seed=3)
    for chosen in (findings[:1], findings[::-1], random.Random(1).sample(findings, 5)):
        fast = build_sr(source, chosen, MODEL, now=NOW, **UIDS)
        assert_same_document(build_sr_reference(source, chosen, MODEL, **UIDS), fast)
        assert list(read_sr_findings(fast)) == [f.label for f in chosen]


def test_what_the_template_cannot_hold_is_left_to_highdicom(frozen_clock):
    """An int probability (highdicom writes no Floating Point Value then) and a model name
    that is not ASCII: build_sr gives highdicom's document all the same."""
    source = pydicom.dcmread(SOURCES[1], stop_before_pixels=True)
    whole = [Finding(label, 1, 0.5) for label in LABELS[:2]]
    assert_same_document(build_sr_reference(source, whole, MODEL, **UIDS),
                         build_sr(source, whole, MODEL, now=NOW, **UIDS))
    assert "FloatingPointValue" not in str(build_sr(source, whole, MODEL, **UIDS).ContentSequence)
    accented = ModelIdentity("modèle", "1", "ab" * 32)
    findings = _made_up_findings(seed=2)[:2]
    assert_same_document(build_sr_reference(source, findings, accented, **UIDS),
                         build_sr(source, findings, accented, now=NOW, **UIDS))


def test_every_element_is_walked():
    """cxr_edge.dicom_splice finds every element pydicom finds, nested ones included."""
    def count(ds):
        return sum(1 + (sum(count(item) for item in e.value) if e.VR == "SQ" else 0) for e in ds)

    reference = build_sr_reference(pydicom.dcmread(SOURCES[0], stop_before_pixels=True),
                                   _made_up_findings(seed=1)[:3], MODEL)
    data = dicom_bytes(reference)
    walked = [e for e in elements(data, 132) if e.tag >> 16 != 0x0002]
    assert len(walked) == count(reference)
    assert len(walked) > 300


# --- no input's values in another's SR; forked and threaded callers --------------------------------

PATIENTS = {
    "a": {"PatientName": "Alpha^Anna", "PatientID": "PID-ALPHA-1", "PatientBirthDate": "19500101",
          "PatientSex": "F", "AccessionNumber": "ACC-ALPHA", "StudyID": "STUDY-A",
          "ReferringPhysicianName": "Doctor^Aleph", "StudyDate": "20200101", "StudyTime": "101010"},
    "b": {"PatientName": "Beta^Bruno", "PatientID": "PID-BETA-2", "PatientBirthDate": "19610202",
          "PatientSex": "M", "AccessionNumber": "ACC-BETA", "StudyID": "STUDY-B",
          "ReferringPhysicianName": "Doctor^Beth", "StudyDate": "20210202", "StudyTime": "202020"},
}


def _patient(tmp_path: Path, key: str) -> pydicom.Dataset:
    uids = {k: generate_uid() for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")}
    return _edited(tmp_path, _SAMPLE_FILES[2], name=key, **PATIENTS[key], **uids)


def _own_values(source: pydicom.Dataset) -> list[bytes]:
    """The values that are the patient's, long enough to be searched for (not the sex)."""
    keywords = [k for k in PATIENTS["a"] if k != "PatientSex"]
    keywords += ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"]
    return [str(source[k].value).encode() for k in keywords]


def test_two_patients_back_to_back_keep_their_own_values(tmp_path):
    a, b = _patient(tmp_path, "a"), _patient(tmp_path, "b")
    findings = _made_up_findings(seed=4)
    srs = {"a": build_sr(a, findings, MODEL)}
    # A caller changing its SR changes nothing in the next ones (no object is shared).
    srs["a"].ContentSequence[0].ConceptNameCodeSequence[0].CodeMeaning = "TAMPERED"
    srs["b"], srs["a-again"] = build_sr(b, findings, MODEL), build_sr(a, findings, MODEL)
    assert b"TAMPERED" not in dicom_bytes(srs["b"]) + dicom_bytes(srs["a-again"])
    for key, sr in srs.items():
        own, other = (a, b) if key.startswith("a") else (b, a)
        for keyword in PATIENTS["a"]:
            assert str(sr[keyword].value) == str(own[keyword].value), keyword
        assert sr.StudyInstanceUID == own.StudyInstanceUID
        data = dicom_bytes(sr)
        assert all(value in data for value in _own_values(own))
        assert [value for value in _own_values(other) if value in data] == []
    # The cached template holds neither patient's values.
    template = template_for(MODEL, [f.label for f in findings]).data
    assert [v for v in _own_values(a) + _own_values(b) if v in template] == []


def _encoded_sr(path: str, findings, uids) -> bytes:
    """In a pool worker: the SR for the file at `path`, encoded."""
    source = pydicom.dcmread(path, stop_before_pixels=True)
    return dicom_bytes(build_sr(source, findings, MODEL, now=NOW, **uids))


def test_forked_workers_use_the_inherited_template(tmp_path):
    """As the pipeline's pool: workers forked after the parent filled its cache (and one forked
    with an empty cache) build the very SR the parent builds."""
    findings = _made_up_findings(seed=6)
    fork = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(1, mp_context=fork) as pool:  # forked before any template exists
        _template.cache_clear()
        cold = pool.submit(_encoded_sr, str(SOURCES[0]), findings, UIDS).result()
    here = _encoded_sr(str(SOURCES[0]), findings, UIDS)
    with ProcessPoolExecutor(2, mp_context=fork) as pool:  # forked with the template cached
        warm = [pool.submit(_encoded_sr, str(p), findings, UIDS) for p in SOURCES]
        warm = [future.result() for future in warm]
    assert cold == here == warm[0]
    assert warm[1:] == [_encoded_sr(str(p), findings, UIDS) for p in SOURCES[1:]]


def test_threads_building_at_once_get_their_own_sr():
    findings = _made_up_findings(seed=8)[:6]
    uids = [{"series_instance_uid": generate_uid(), "sop_instance_uid": generate_uid()}
            for _ in SOURCES]
    expected = [_encoded_sr(str(p), findings, u) for p, u in zip(SOURCES, uids)]
    _template.cache_clear()  # every thread may find the cache empty and build the template
    got: dict[int, bytes] = {}
    start = threading.Barrier(len(SOURCES))

    def build(i):
        start.wait()
        got[i] = _encoded_sr(str(SOURCES[i]), findings, uids[i])

    threads = [threading.Thread(target=build, args=(i,)) for i in range(len(SOURCES))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [got[i] for i in range(len(SOURCES))] == expected
