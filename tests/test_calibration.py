"""Calibration and metrics (numpy), and `cxr-edge calibrate` on real images with the deployed model."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from cxr_edge.calibration import fit_calibration
from cxr_edge.findings import sigmoid
from cxr_edge.manifest import DEFAULT_PACKAGE, ModelPackage, sha256_file
from cxr_edge.metrics import (
    auroc, average_precision, binary_nll, bootstrap_auroc_ci, brier_score, roc_curve,
)

from .conftest import NIH_TINY64, SAMPLES


def _overconfident(seed=0, n=2000, classes=15):
    """Labels and logits that rank well but are three times too sharp."""
    rng = np.random.default_rng(seed)
    true_logits = rng.normal(-1.0, 1.5, (n, classes))  # labels drawn from these: calibrated by construction
    labels = (rng.random((n, classes)) < sigmoid(true_logits)).astype(float)
    return labels, true_logits * 3.0


def test_temperature_scaling_lowers_nll_and_finds_the_sharpening():
    labels, logits = _overconfident()
    fit = fit_calibration(labels, logits)
    temperatures = np.asarray(fit["temperatures"])
    assert np.all(temperatures > 2.0) and np.all(temperatures < 4.5)  # ~3, the factor that was applied
    r = fit["report"]
    assert all(after < before for after, before in zip(r["nll_after"], r["nll_before"]))
    assert r["mean"]["ece_after"] < r["mean"]["ece_before"]
    assert r["mean"]["brier_after"] < r["mean"]["brier_before"]


def test_logit_shift_undoes_a_biased_model_that_a_temperature_cannot():
    """A model trained with pos_weight has its logits shifted up: Platt scaling written as a
    shift (folded into the head's bias at export) and a temperature recovers both."""
    labels, logits = _overconfident()  # sigmoid(logits / 3) is calibrated
    biased = logits + 2.0
    temperature_only, with_shift = fit_calibration(labels, biased), fit_calibration(labels, biased, shift=True)
    assert all(-2.6 < s < -1.4 for s in with_shift["logit_shifts"]), with_shift["logit_shifts"]
    assert all(2.0 < t < 4.5 for t in with_shift["temperatures"])
    assert temperature_only["logit_shifts"] == [0.0] * 15
    assert with_shift["report"]["mean"]["ece_after"] < 0.5 * temperature_only["report"]["mean"]["ece_after"]


def test_rare_class_keeps_temperature_one():
    labels, logits = _overconfident()
    labels[:, 7] = 0
    labels[:3, 7] = 1  # 3 positives: too few to fit
    fit = fit_calibration(labels, logits)
    assert fit["temperatures"][7] == 1.0 and fit["temperature_fitted"]["Hernia"] is False


def test_metrics_against_hand_computed_values():
    y = np.array([1, 0, 1, 0])
    s = np.array([0.9, 0.8, 0.7, 0.1])
    assert average_precision(y, s) == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert auroc(y, s) == pytest.approx(0.75)
    fpr, tpr = roc_curve(y, s)
    assert fpr.tolist() == [0, 0, 0.5, 0.5, 1] and tpr.tolist() == [0, 0.5, 0.5, 1, 1]
    assert brier_score(y, s) == pytest.approx(np.mean((s - y) ** 2))
    assert binary_nll(np.array([1.0]), np.array([0.0])) == pytest.approx(np.log(2))
    labels, logits = _overconfident(seed=2)
    low, high = bootstrap_auroc_ci(labels[:, 0], logits[:, 0], resamples=300)
    assert low < auroc(labels[:, 0], logits[:, 0]) < high


def test_calibrated_manifest_keeps_the_previous_calibration():
    package = ModelPackage.load()
    labels, logits = _overconfident()
    new = package.recalibrated(fit_calibration(labels, logits), "test data", "9.9.9")
    assert new["version"] == "9.9.9" and new["recalibrations"][-1]["version"] == package.version
    assert new["artifacts"] == package.to_manifest()["artifacts"]
    assert package.version != "9.9.9"  # the original is not modified


def _calibrate(*args):
    # Runs the CLI in-process in a fresh interpreter and reports whether torch was imported.
    code = ("import sys\nfrom cxr_edge.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    print('TORCH_IMPORTED' if 'torch' in sys.modules else 'NO_TORCH', file=sys.stderr)\n    raise\n")
    return subprocess.run([sys.executable, "-c", code, "calibrate", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def test_cxr_edge_calibrate_on_bundled_samples(tmp_path):
    out = tmp_path / "site-pkg"
    proc = _calibrate(SAMPLES / "nih", "--labels", SAMPLES / "nih" / "labels.csv", "--out", out, "--json",
                      "--version", "0.1.0+site.test")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "NO_TORCH" in proc.stderr  # the runtime's calibrate never needs torch
    report = json.loads(proc.stdout)
    assert report["images"] == 6 and report["version"] == "0.1.0+site.test"
    new, old = ModelPackage.load(out), ModelPackage.load(DEFAULT_PACKAGE)
    assert new.to_manifest()["calibration"]["fitted_on"].startswith("site data: 6 labeled images")
    # 6 images: every class has < 5 positives, so every temperature stays 1 and says so
    assert np.all(new.temperatures == 1.0)
    assert new.to_manifest()["artifacts"]["fp32"]["sha256"] == old.to_manifest()["artifacts"]["fp32"]["sha256"]
    assert sha256_file(out / "model.onnx") == old.to_manifest()["artifacts"]["fp32"]["sha256"]
    # the new package serves
    proc = subprocess.run([sys.executable, "-m", "cxr_edge", "infer", str(SAMPLES / "nih" / "00000100_000.png"),
                           "--out", str(tmp_path / "o"), "--model", str(out), "--json"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["model"]["version"] == "0.1.0+site.test"


def test_cxr_edge_calibrate_usage_errors(tmp_path):
    bad = tmp_path / "labels.csv"
    bad.write_text("Image Index,Finding Labels\nmissing.png,Effusion\n")
    proc = _calibrate(SAMPLES / "nih", "--labels", bad, "--out", tmp_path / "x")
    assert proc.returncode == 2 and "not found under the inputs" in proc.stderr
    existing = tmp_path / "exists"
    existing.mkdir()
    proc = _calibrate(SAMPLES / "nih", "--labels", SAMPLES / "nih" / "labels.csv", "--out", existing)
    assert proc.returncode == 2 and "already exists" in proc.stderr
    proc = _calibrate(SAMPLES / "nih", "--labels", SAMPLES / "nih" / "labels.csv", "--out", tmp_path / "y",
                      "--policy", "sensitivity:2")
    assert proc.returncode == 2 and "threshold policy" in proc.stderr


@pytest.mark.slow
def test_cxr_edge_calibrate_on_241_real_nih_images(tmp_path):
    out = tmp_path / "site-pkg"
    proc = _calibrate(NIH_TINY64 / "images", "--labels", NIH_TINY64 / "labels.csv", "--out", out, "--json",
                      "--policy", "specificity:0.9")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["images"] == 241 and report["policy"] == "specificity:0.90"
    package = ModelPackage.load(out)
    for label, point in zip(package.labels, package.operating_points):  # what the manifest and report say agree
        assert report["operating_points"][label]["threshold"] == point.threshold
        assert point.policy == "prevalence" or point.expected_specificity >= 0.9, (label, point)
    assert report["mean"]["nll_after"] < report["mean"]["nll_before"]
    fitted = [label for label, ok in report["temperature_fitted"].items() if ok]
    assert len(fitted) >= 5  # the common findings have enough positives in 241 images
