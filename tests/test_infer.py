"""End-to-end `cxr-edge infer`: real files in, JSON + DICOM SR out, exit codes scripts can trust."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from cxr_edge.labels import FINDINGS, LABELS
from cxr_edge.records import SCHEMA, SCHEMA_VERSION
from cxr_edge.sr import read_sr_findings

from .conftest import SAMPLES, need_tool, shared


def run_cli(*args: str, check_rc: int | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "cxr_edge", *args], capture_output=True, text=True, timeout=600)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stderr[-3000:]
    return proc


def load_records(out: Path) -> dict[str, dict]:
    return {p.relative_to(out).as_posix(): json.loads(p.read_text()) for p in out.rglob("*.json")}


def assert_valid_record(record: dict) -> None:
    assert record["schema"] == SCHEMA and record["schema_version"] == SCHEMA_VERSION
    assert record["status"] == "ok"
    assert [f["label"] for f in record["findings"]] == list(FINDINGS)
    for f in record["findings"] + [record["no_finding"]]:
        assert 0.0 <= f["probability"] <= 1.0
        assert f["positive"] == (f["probability"] >= f["threshold"])
    assert record["positive_findings"] == [f["label"] for f in record["findings"] if f["positive"]]
    assert len(record["input"]["sha256"]) == 64
    assert len(record["model"]["sha256"]) == 64 and record["model"]["name"]
    assert record["backend"]["name"] == "onnxruntime" and record["backend"]["precision"] == "fp32"
    for stage in ("decode", "preprocess", "queue", "inference_batch", "write"):
        assert record["timings_ms"][stage] >= 0


def test_samples_with_bundled_model(tmp_path):
    out = tmp_path / "out"
    proc = run_cli("infer", str(SAMPLES), "--out", str(out), "--json", check_rc=0)
    summary = json.loads(proc.stdout)
    n_images = len(list(SAMPLES.rglob("*.png"))) + len(list(SAMPLES.rglob("*.dcm")))
    assert summary["inputs"] == n_images and summary["failed"] == 0
    records = load_records(out)
    assert len(records) == n_images
    for name, record in records.items():
        assert_valid_record(record)
        is_dicom = name.endswith(".dcm.json")
        assert (record["dicom"] is not None) == is_dicom
        if is_dicom:
            sr_path = Path(record["outputs"]["sr"]["path"])
            assert sr_path.is_file() and sr_path.name.endswith(".sr.dcm")
    lines = [json.loads(line) for line in (out / "summary.jsonl").read_text().splitlines()]
    assert sorted(line["input"] for line in lines) == [line["input"] for line in lines]
    assert {line["status"] for line in lines} == {"ok"}
    assert not list(out.rglob("*.part")), "temp files left behind"
    # What a new user sees (issue #12): the bundled model's operating points do not flag most
    # findings on every image. Every finding carries its operating point from the manifest.
    flagged = [set(r["positive_findings"]) for r in records.values()]
    assert not set.intersection(*flagged), "a finding flagged on every sample"
    assert sum(map(len, flagged)) / len(flagged) <= 3.0, flagged
    assert all(f["operating_point"]["policy"] for r in records.values() for f in r["findings"])


def test_mixed_folder_reports_each_bad_file(tmp_path):
    from pydicom.data import get_testdata_file

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    shutil.copy(SAMPLES / "nih" / "00001873_000.png", inbox / "good.png")
    shutil.copy(SAMPLES / "dicom" / "rsna_cr_pa_jpeg_baseline_mono2.dcm", inbox / "good.dcm")
    shutil.copy(get_testdata_file("CT_small.dcm"), inbox / "ct_slice.dcm")
    data = (SAMPLES / "dicom" / "rsna_cr_pa_jpeg_baseline_mono2.dcm").read_bytes()
    (inbox / "truncated.dcm").write_bytes(data[: len(data) // 2])
    (inbox / "notes.dcm").write_text("this is a text file, not DICOM\n" * 20)
    shutil.copy(get_testdata_file("DICOMDIR"), inbox / "DICOMDIR")
    (inbox / "empty.png").write_bytes(b"")
    (inbox / "README.txt").write_text("not an image name: skipped, not an error")

    out = tmp_path / "out"
    proc = run_cli("infer", str(inbox), "--out", str(out), "--json", check_rc=1)
    summary = json.loads(proc.stdout)
    assert (summary["inputs"], summary["succeeded"], summary["failed"], summary["skipped"]) == (7, 2, 5, 1)
    errors = {line["input"]: line["error"] for line in summary["results"] if line["status"] == "error"}
    expected = {
        "inbox/ct_slice.dcm": ("decode", "modality CT is not accepted for chest analysis"),
        "inbox/truncated.dcm": ("decode", "truncated DICOM file"),
        "inbox/notes.dcm": ("decode", "not a DICOM file"),
        "inbox/DICOMDIR": ("decode", "DICOMDIR"),
        "inbox/empty.png": ("decode", "empty file"),
    }
    assert set(errors) == set(expected)
    for name, (stage, phrase) in expected.items():
        assert errors[name]["stage"] == stage
        assert phrase in errors[name]["reason"], errors[name]
        assert errors[name]["file"].endswith(name.split("/")[-1])
        record = json.loads((out / (name + ".json")).read_text())
        assert record["status"] == "error" and record["error"] == errors[name]
    for good in ("inbox/good.png.json", "inbox/good.dcm.json"):
        assert_valid_record(json.loads((out / good).read_text()))
    assert (out / "inbox" / "good.dcm.sr.dcm").is_file()
    assert len(list(out.rglob("*.sr.dcm"))) == 1
    assert "PatientName" not in proc.stderr and "16d7f894" not in proc.stderr  # no patient data in logs


def test_usage_errors_exit_2(tmp_path):
    proc = run_cli("infer", str(tmp_path / "missing"), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "input not found" in proc.stderr
    proc = run_cli("infer", str(SAMPLES), "--out", str(tmp_path / "out"), "--model", str(tmp_path))
    assert proc.returncode == 2 and "manifest.json" in proc.stderr
    proc = run_cli("infer", "--out", str(tmp_path / "out"))
    assert proc.returncode == 2


def test_tampered_model_is_refused(tmp_path):
    from cxr_edge.manifest import DEFAULT_PACKAGE

    package = tmp_path / "pkg"
    shutil.copytree(DEFAULT_PACKAGE, package)
    manifest = json.loads((package / "manifest.json").read_text())
    model = package / manifest["artifacts"]["fp32"]["file"]
    model.write_bytes(model.read_bytes()[:-1] + b"\x00")
    proc = run_cli("infer", str(SAMPLES / "nih"), "--out", str(tmp_path / "out"), "--model", str(package))
    assert proc.returncode == 2
    assert "does not match the manifest" in proc.stderr
    assert not (tmp_path / "out" / "nih").exists()


@pytest.mark.slow
def test_shared_data_end_to_end_with_valid_srs(tmp_path):
    why = "all 250 full-size NIH images and the 4 DICOMs of the shared set, end to end, every SR validated"
    nih, dicom = shared("nih", why=why), shared("dicom", why=why)
    dciodvfy, dsrdump = need_tool("dciodvfy"), need_tool("dsrdump")
    out = tmp_path / "out"
    run_cli("infer", str(nih), str(dicom), "--out", str(out), check_rc=0)
    records = load_records(out)
    n_png, n_dcm = len(list(nih.rglob("*.png"))), len(list(dicom.glob("*.dcm")))
    assert len(records) == n_png + n_dcm
    srs = sorted(out.rglob("*.sr.dcm"))
    assert len(srs) == n_dcm
    for sr_path in srs:
        record = json.loads(sr_path.with_name(sr_path.name.replace(".sr.dcm", ".json")).read_text())
        assert_valid_record(record)
        verify = subprocess.run([dciodvfy, str(sr_path)], capture_output=True, text=True)
        errors = [line for line in (verify.stdout + verify.stderr).splitlines() if line.startswith("Error")]
        assert errors == [], f"{sr_path.name}: {errors}"
        dump = subprocess.run([dsrdump, str(sr_path)], capture_output=True, text=True)
        assert dump.returncode == 0 and "Error" not in dump.stderr and "Warning" not in dump.stderr, dump.stderr
        sr = pydicom.dcmread(sr_path)
        source = pydicom.dcmread(record["input"]["path"], stop_before_pixels=True)
        assert sr.StudyInstanceUID == source.StudyInstanceUID
        assert sr.SeriesInstanceUID != source.SeriesInstanceUID
        assert sr.VerificationFlag == "UNVERIFIED"
        found = read_sr_findings(sr)
        assert set(found) == set(LABELS)
        expected = {f["label"]: f for f in record["findings"] + [record["no_finding"]]}
        for label, (probability, present) in found.items():
            assert probability == pytest.approx(expected[label]["probability"], abs=5e-4 + 1e-6)  # shown at 3 decimals
            assert present == expected[label]["positive"]


@pytest.mark.parametrize("umask,mode", [(0o027, 0o640), (0o077, 0o600)])
def test_outputs_follow_the_umask(tmp_path, umask, mode):
    """Results carry patient data (the SR): who may read them is the site's umask, not ours."""
    import os

    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "cxr_edge", "infer", str(SAMPLES / "dicom" / "rsna_cr_pa_jpeg_baseline_mono2.dcm"),
                           "--out", str(out)], capture_output=True, text=True, timeout=600,
                          preexec_fn=lambda: os.umask(umask))
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in files} == {"rsna_cr_pa_jpeg_baseline_mono2.dcm.json",
                                       "rsna_cr_pa_jpeg_baseline_mono2.dcm.sr.dcm", "summary.jsonl"}
    assert {p.name: p.stat().st_mode & 0o777 for p in files} == {p.name: mode for p in files}


# --- a bad model package: one `Error:` line, exit 2, never a traceback (issue #10 items 4, 8) -----
def _model_refused(tmp_path, package) -> str:
    out = tmp_path / "out"
    proc = run_cli("infer", str(SAMPLES / "nih" / "00000100_000.png"), "--out", str(out), "--model", str(package))
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not out.exists() or not list(out.rglob("*.json"))
    return lines[0]


@pytest.mark.parametrize("case", ["no temperatures", "temperatures strings", "temperatures 1e400", "thresholds above 1",
                                  "labels a number", "preprocessing a string", "size a string",
                                  "artifact without sha256", "artifacts a list", "manifest a list", "invalid JSON",
                                  "not UTF-8"])
def test_malformed_manifest_fails_in_one_line(tmp_path, case):
    from .test_manifest import BROKEN, light_package, write_broken

    package = light_package(tmp_path)
    broken, phrase = BROKEN[case]
    write_broken(package, broken)
    line = _model_refused(tmp_path, package)
    assert str(package) in line and re.search(phrase, line), line


def test_unusable_model_folders_fail_in_one_line(tmp_path):
    (tmp_path / "dir-manifest" / "manifest.json").mkdir(parents=True)
    assert "not a regular file" in _model_refused(tmp_path, tmp_path / "dir-manifest")
    assert "no manifest.json" in _model_refused(tmp_path, tmp_path / "missing")


def _package_with_artifact(tmp_path, data: bytes, fix_sha: bool = True) -> Path:
    """The bundled manifest with `data` as its fp32 model; its sha256 updated to match (fix_sha)."""
    import hashlib

    from .test_manifest import light_package

    package = light_package(tmp_path)
    (package / "model.onnx").unlink()
    (package / "model.onnx").write_bytes(data)
    if fix_sha:
        manifest = json.loads((package / "manifest.json").read_text())
        manifest["artifacts"]["fp32"]["sha256"] = hashlib.sha256(data).hexdigest()
        (package / "manifest.json").write_text(json.dumps(manifest))
    return package


def test_sha256_mismatch_fails_in_one_line(tmp_path):
    package = _package_with_artifact(tmp_path, b"not the model", fix_sha=False)
    assert "does not match the manifest" in _model_refused(tmp_path, package)


def test_corrupt_onnx_with_a_matching_sha256_fails_in_one_line(tmp_path):
    """The sha256 proves the file is the one the manifest names, not that it is a model."""
    model = (SAMPLES / "nih" / "00000100_000.png").read_bytes()[:5000]
    line = _model_refused(tmp_path, _package_with_artifact(tmp_path, model))
    assert "fp32" in line


def test_onnx_the_backend_cannot_use_fails_in_one_line(tmp_path):
    """A valid ONNX model without any input: the backend fails past ONNX Runtime's own checks,
    with an exception type nobody planned for; still one line naming it."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    const = helper.make_node("Constant", [], ["logits"],
                             value=helper.make_tensor("v", TensorProto.FLOAT, [1, len(LABELS)], [0.0] * len(LABELS)))
    graph = helper.make_graph([const], "no-input", [], [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, len(LABELS)])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    line = _model_refused(tmp_path, _package_with_artifact(tmp_path, onnx.shape_inference.infer_shapes(model).SerializeToString()))
    assert "IndexError" in line and "fp32" in line
