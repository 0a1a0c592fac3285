"""The model package: manifest validation and sha256 verification before anything is loaded."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from cxr_edge.backends import create_backend
from cxr_edge.errors import CxrEdgeError, ModelPackageError
from cxr_edge.labels import LABELS
from cxr_edge.manifest import DEFAULT_PACKAGE, ModelPackage


@pytest.fixture
def package_dir(tmp_path):
    target = tmp_path / "pkg"
    shutil.copytree(DEFAULT_PACKAGE, target)
    return target


def edit_manifest(root, change):
    path = root / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def test_bundled_package_is_complete_and_honest():
    package = ModelPackage.load()
    m = package.manifest
    assert package.labels == LABELS
    assert "not a diagnostic" in m["description"].lower()
    assert m["provenance"]["training_data"] and m["provenance"]["initial_weights"]["sha256"]
    auroc = m["metrics"]["test"]["auroc"]
    assert set(auroc) == set(LABELS) and m["metrics"]["test"]["n"] > 0
    assert m["export"]["parity_vs_torch"]["max_abs_dprob"] < 1e-4
    package.read_verified("fp32")


def test_bundled_model_runs_with_dynamic_batch():
    package = ModelPackage.load()
    p = package.preprocess_params
    with create_backend(package) as backend:
        for batch in (1, 3):
            logits = backend.infer(np.zeros((batch, p.channels, p.size, p.size), np.float32))
            assert logits.shape == (batch, len(LABELS)) and np.all(np.isfinite(logits))


def test_modified_artifact_is_refused(package_dir):
    model = package_dir / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    package = ModelPackage.load(package_dir)
    with pytest.raises(ModelPackageError, match="does not match the manifest"):
        package.read_verified("fp32")
    with pytest.raises(ModelPackageError, match="does not match"):
        create_backend(package).__enter__()


@pytest.mark.parametrize(
    "change, phrase",
    [
        (lambda m: m.update(labels=m["labels"][::-1]), "labels"),
        (lambda m: m["calibration"].update(temperatures=[1.0] * 3), "temperatures"),
        (lambda m: m["calibration"].update(temperatures=[-1.0] * 15), "positive"),
        (lambda m: m["thresholds"].update(values=[float("nan")] * 15), "thresholds"),
        (lambda m: m["preprocessing"].update(version=99), "preprocessing"),
        (lambda m: m.pop("artifacts"), "artifacts"),
        (lambda m: m.update(format_version=2), "format"),
    ],
)
def test_invalid_manifest_is_refused(package_dir, change, phrase):
    edit_manifest(package_dir, change)
    with pytest.raises(ModelPackageError, match=phrase):
        ModelPackage.load(package_dir)


def test_artifact_path_cannot_leave_the_package(package_dir):
    edit_manifest(package_dir, lambda m: m["artifacts"]["fp32"].update(file="../../etc/passwd"))
    with pytest.raises(ModelPackageError, match="leaves the package"):
        ModelPackage.load(package_dir).read_verified("fp32")


def test_missing_precision_says_how_to_build_it():
    with pytest.raises(ModelPackageError, match="build-engine"):
        ModelPackage.load().artifact("int8")


def test_unknown_backend():
    with pytest.raises(CxrEdgeError, match="unknown backend"):
        create_backend(ModelPackage.load(), "nope")
