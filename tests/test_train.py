"""The train path: patient-wise splits, a tiny finetune -> calibrate -> export chain, parity."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from .conftest import SAMPLES, shared

torch = pytest.importorskip("torch", reason="needs the train extra (torch + timm)")
pytest.importorskip("timm", reason="needs the train extra (torch + timm)")

from train.data import patient_split, read_nih_csv  # noqa: E402


def write_nih_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Image Index", "Finding Labels", "Follow-up #", "Patient ID"])
        writer.writerows(rows)


def test_patient_split_keeps_each_patient_in_one_split(tmp_path):
    (tmp_path / "images").mkdir()
    rows = []
    for patient in range(60):
        for follow_up in range(patient % 5 + 1):  # 1 to 5 images per patient, as in NIH
            name = f"{patient:08d}_{follow_up:03d}.png"
            (tmp_path / "images" / name).write_bytes(b"")
            rows.append([name, "No Finding" if patient % 3 else "Effusion|Mass", follow_up, patient])
    write_nih_csv(tmp_path / "Data_Entry_2017.csv", rows)
    records = read_nih_csv(tmp_path / "Data_Entry_2017.csv")
    splits = patient_split(records, seed=3)
    patients = {name: {r.patient_id for r in split} for name, split in splits.items()}
    assert all(patients.values())
    assert not (patients["train"] & patients["val"]) and not (patients["train"] & patients["test"])
    assert not (patients["val"] & patients["test"])
    assert sum(len(s) for s in splits.values()) == len(records)
    assert patient_split(records, seed=3) == splits  # seeded: reproducible
    assert patient_split(records, seed=4) != splits


def test_patient_split_on_real_nih_csv():
    records = read_nih_csv(shared("nih_tiny64", "labels.csv"))
    assert len({r.patient_id for r in records}) < len(records)  # some patients have several images
    splits = patient_split(records, seed=0)
    seen = {}
    for name, split in splits.items():
        for r in split:
            assert seen.setdefault(r.patient_id, name) == name, f"patient {r.patient_id} in two splits"


def test_unknown_label_is_refused(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"")
    write_nih_csv(tmp_path / "labels.csv", [["a.png", "Effusion|Cancer", 0, 1]])
    with pytest.raises(ValueError, match="Cancer"):
        read_nih_csv(tmp_path / "labels.csv")


@pytest.mark.slow
def test_finetune_calibrate_export_then_infer(tmp_path):
    """Tiny real run on 64x64 NIH images; the exported package then runs under `cxr-edge infer`."""
    data = shared("nih_tiny64", "labels.csv")
    run, package = tmp_path / "run", tmp_path / "pkg"
    train = [sys.executable, "-m", "train"]
    subprocess.run(train + ["finetune", "--data", str(data), "--out", str(run), "--arch", "vit_tiny_patch16_224",
                            "--img-size", "32", "--epochs", "1", "--batch-size", "64"], check=True, timeout=600)
    assert (run / "model.safetensors").is_file() and (run / "logits_val.npz").is_file()
    subprocess.run(train + ["calibrate", str(run)], check=True, capture_output=True, timeout=300)
    calibration = json.loads((run / "calibration.json").read_text())
    # temperature scaling is fitted to minimise validation NLL: it cannot make it worse
    assert sum(calibration["validation"]["nll_after"]) <= sum(calibration["validation"]["nll_before"]) + 1e-9
    subprocess.run(train + ["export", str(run), "--out", str(package), "--name", "tiny-test"], check=True,
                   capture_output=True, timeout=300)
    manifest = json.loads((package / "manifest.json").read_text())
    assert manifest["export"]["parity_vs_torch"]["max_abs_dprob"] < 1e-4

    # Backend parity on real images through the whole runtime path (decode -> ORT -> JSON)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "cxr_edge", "infer", str(SAMPLES / "nih"), "--out", str(out),
                           "--model", str(package), "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from cxr_edge.decode import decode_file
    from cxr_edge.findings import calibrated_probabilities
    from cxr_edge.manifest import ModelPackage
    from cxr_edge.preprocess import preprocess
    from train.export import load_run_model

    pkg = ModelPackage.load(package)
    model, _, params = load_run_model(run)
    images = sorted((SAMPLES / "nih").glob("*.png"))
    x = np.stack([preprocess(decode_file(p).pixels, params) for p in images])
    with torch.no_grad():
        torch_probs = calibrated_probabilities(model(torch.from_numpy(x)).numpy(), pkg.temperatures)
    for image, expected in zip(images, torch_probs):
        record = json.loads((out / "nih" / (image.name + ".json")).read_text())
        got = [f["probability"] for f in record["findings"]] + [record["no_finding"]["probability"]]
        assert np.max(np.abs(np.array(got) - expected)) < 1e-4
