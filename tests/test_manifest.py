"""The model package: manifest validation and sha256 verification before anything is loaded."""

from __future__ import annotations

import json
import os
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
    m = package.to_manifest()
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
        create_backend(package).activate()


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


# --- every malformed manifest is one ModelPackageError, never a traceback (issue #10 items 4, 8) ---
def light_package(tmp_path, name: str = "pkg"):
    """The bundled package's manifest in a new folder, its 85 MB model linked, not copied."""
    target = tmp_path / name
    target.mkdir()
    shutil.copy(DEFAULT_PACKAGE / "manifest.json", target / "manifest.json")
    (target / "model.onnx").symlink_to(DEFAULT_PACKAGE / "model.onnx")
    return target


def _set(block, key, value):
    return lambda m: m[block].update({key: value})


def _del(*path):
    def change(m):
        for key in path[:-1]:
            m = m[key]
        del m[path[-1]]
    return change


N = len(LABELS)
BROKEN = {  # id: (change to the manifest dict, or raw manifest bytes; a phrase of the message)
    "no calibration": (_del("calibration"), "calibration"),
    "no temperatures": (_del("calibration", "temperatures"), "calibration.temperatures"),
    "calibration a list": (lambda m: m.update(calibration=[1.0] * N), "calibration"),
    "temperatures short": (_set("calibration", "temperatures", [1.0] * (N - 1)), "temperatures"),
    "temperatures long": (_set("calibration", "temperatures", [1.0] * (N + 1)), "temperatures"),
    "temperatures a number": (_set("calibration", "temperatures", 1.0), "temperatures"),
    "temperatures a dict": (_set("calibration", "temperatures", {"a": 1}), "temperatures"),
    "temperatures strings": (_set("calibration", "temperatures", ["1.0"] * N), "temperatures"),
    "temperatures null": (_set("calibration", "temperatures", [None] * N), "temperatures"),
    "temperatures booleans": (_set("calibration", "temperatures", [True] * N), "temperatures"),
    "temperatures nested": (_set("calibration", "temperatures", [[1.0]] * N), "temperatures"),
    "temperatures NaN": (_set("calibration", "temperatures", [float("nan")] * N), "temperatures"),
    "temperatures Infinity": (_set("calibration", "temperatures", [1.0] * (N - 1) + [float("inf")]), "temperatures"),
    "temperatures 1e400": (("calibration", "temperatures", "1e400"), "temperatures"),
    "temperatures 10**400": (("calibration", "temperatures", "1" + "0" * 400), "temperatures"),
    "temperature zero": (_set("calibration", "temperatures", [0.0] * N), "positive"),
    "temperature negative": (_set("calibration", "temperatures", [1.0] * (N - 1) + [-1.0]), "positive"),
    "no thresholds": (_del("thresholds"), "thresholds"),
    "no threshold values": (_del("thresholds", "values"), "thresholds.values"),
    "thresholds a list": (lambda m: m.update(thresholds=[0.5] * N), "thresholds"),
    "thresholds short": (_set("thresholds", "values", [0.5] * 3), "thresholds"),
    "thresholds above 1": (_set("thresholds", "values", [1.5] * N), r"\[0, 1\]"),
    "thresholds below 0": (_set("thresholds", "values", [0.5] * (N - 1) + [-0.1]), r"\[0, 1\]"),
    "thresholds NaN": (_set("thresholds", "values", [float("nan")] * N), "thresholds"),
    "thresholds strings": (_set("thresholds", "values", ["x"] * N), "thresholds"),
    "no labels": (_del("labels"), "labels"),
    "labels reversed": (lambda m: m.update(labels=m["labels"][::-1]), "labels"),
    "labels a string": (lambda m: m.update(labels="Atelectasis"), "labels"),
    "labels a number": (lambda m: m.update(labels=15), "labels"),
    "labels one short": (lambda m: m.update(labels=m["labels"][:-1]), "labels"),
    "no name": (_del("name"), "name"),
    "name a number": (lambda m: m.update(name=5), "name"),
    "name empty": (lambda m: m.update(name=""), "name"),
    "no version": (_del("version"), "version"),
    "version null": (lambda m: m.update(version=None), "version"),
    "version a list": (lambda m: m.update(version=[1]), "version"),
    "no preprocessing": (_del("preprocessing"), "preprocessing"),
    "preprocessing a string": (lambda m: m.update(preprocessing="cxr-preprocess/v1"), "preprocessing"),
    "preprocessing v99": (_set("preprocessing", "version", 99), "preprocessing"),
    "preprocessing other contract": (_set("preprocessing", "contract", "other"), "preprocessing"),
    "preprocessing no contract": (_del("preprocessing", "contract"), "preprocessing"),
    "size a string": (_set("preprocessing", "size", "224"), "preprocessing.size"),
    "size a float": (_set("preprocessing", "size", 224.5), "preprocessing.size"),
    "size zero": (_set("preprocessing", "size", 0), "preprocessing.size"),
    "size huge": (_set("preprocessing", "size", 10**9), "preprocessing.size"),
    "size true": (_set("preprocessing", "size", True), "preprocessing.size"),
    "resize unknown": (_set("preprocessing", "resize", "zoom"), "resize"),
    "resize a number": (_set("preprocessing", "resize", 5), "resize"),
    "mean a string": (_set("preprocessing", "mean", "0.5"), "preprocessing.mean"),
    "mean NaN": (_set("preprocessing", "mean", float("nan")), "preprocessing.mean"),
    "std zero": (_set("preprocessing", "std", 0), "preprocessing.std"),
    "std negative": (_set("preprocessing", "std", -0.25), "preprocessing.std"),
    "channels 2": (_set("preprocessing", "channels", 2), "preprocessing.channels"),
    "channels true": (_set("preprocessing", "channels", True), "preprocessing.channels"),
    "no artifacts": (_del("artifacts"), "artifacts"),
    "artifacts a list": (lambda m: m.update(artifacts=[m["artifacts"]["fp32"]]), "artifacts"),
    "artifacts empty": (lambda m: m.update(artifacts={}), "artifacts"),
    "artifact a string": (lambda m: m["artifacts"].update(fp32="model.onnx"), "fp32"),
    "artifact without file": (_del("artifacts", "fp32", "file"), "'file'"),
    "artifact without sha256": (_del("artifacts", "fp32", "sha256"), "'sha256'"),
    "artifact file a number": (lambda m: m["artifacts"]["fp32"].update(file=5), "file"),
    "artifact file empty": (lambda m: m["artifacts"]["fp32"].update(file=""), "file"),
    "artifact file absolute": (lambda m: m["artifacts"]["fp32"].update(file="/etc/passwd"), "leaves the package"),
    "artifact file outside": (lambda m: m["artifacts"]["fp32"].update(file="../model.onnx"), "leaves the package"),
    "artifact sha256 short": (lambda m: m["artifacts"]["fp32"].update(sha256="abc"), "sha256"),
    "artifact sha256 a number": (lambda m: m["artifacts"]["fp32"].update(sha256=5), "sha256"),
    "artifact format unknown": (lambda m: m["artifacts"]["fp32"].update(format="pickle"), "format"),
    "artifact precision a number": (lambda m: m["artifacts"]["fp32"].update(precision=32), "precision"),
    "artifact timing a string": (lambda m: m["artifacts"]["fp32"].update(cpu_ms_per_image="fast"), "cpu_ms_per_image"),
    "artifact stamp a string": (lambda m: m["artifacts"]["fp32"].update(stamp="trt10"), "stamp"),
    "artifact profile a list": (lambda m: m["artifacts"]["fp32"].update(profile=[1, 8, 32]), "profile"),
    "artifact max_batch a string": (lambda m: m["artifacts"]["fp32"].update(profile={"max_batch": "8"}), "max_batch"),
    "architecture a string": (lambda m: m.update(architecture="vit"), "architecture"),
    "no format": (_del("format"), "format"),
    "format v2": (lambda m: m.update(format_version=2), "format"),
    "manifest a list": (lambda m: [m], "not an object"),
    "manifest a string": (lambda m: "cxr-edge-model", "not an object"),
    "manifest null": (b"null", "not an object"),
    "manifest a number": (lambda m: 1, "not an object"),
    "invalid JSON": (b'{"format": "cxr-edge-model",', "unreadable manifest"),
    "empty file": (b"", "unreadable manifest"),
    "not UTF-8": (b'{"name": "\xff\xfe"}', "unreadable manifest"),
    "nested too deep": (b"[" * 100_000 + b"]" * 100_000, "unreadable manifest"),
    "too large": (b'{"pad": "' + b"x" * (17 << 20) + b'"}', "larger than"),
}


def write_broken(root, broken):
    """Apply one BROKEN entry to the package at root."""
    path = root / "manifest.json"
    if isinstance(broken, bytes):
        path.write_bytes(broken)
        return
    manifest = json.loads(path.read_text())
    if isinstance(broken, tuple):  # a raw JSON number no Python float can carry
        block, key, raw = broken
        manifest[block][key] = ["@"] * len(LABELS)
        path.write_text(json.dumps(manifest).replace('"@"', raw, 1))
        return
    changed = broken(manifest)  # edits in place (None) or returns a whole new manifest
    path.write_text(json.dumps(manifest if changed is None else changed))


def _load_error(root) -> str:
    with pytest.raises(ModelPackageError) as info:
        ModelPackage.load(root)
    message = str(info.value)
    assert "\n" not in message and str(root) in message, message
    return message


@pytest.mark.parametrize("broken, phrase", list(BROKEN.values()), ids=list(BROKEN))
def test_every_malformed_manifest_is_one_package_error(tmp_path, broken, phrase):
    import re

    root = light_package(tmp_path)
    write_broken(root, broken)
    assert re.search(phrase, _load_error(root)), phrase


def test_manifest_that_is_not_a_file_or_not_there(tmp_path):
    root = tmp_path / "pkg"
    (root / "manifest.json").mkdir(parents=True)
    assert "not a regular file" in _load_error(root)
    assert "no manifest.json" in _load_error(tmp_path / "missing")
    (tmp_path / "file").write_text("{}")
    assert "no manifest.json" in _load_error(tmp_path / "file")  # --model names a file, not a folder
    (tmp_path / "link").symlink_to(tmp_path / "link")  # a symlink loop
    assert "link" in _load_error(tmp_path / "link")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_manifest(tmp_path):
    root = light_package(tmp_path)
    (root / "manifest.json").chmod(0)
    assert "unreadable manifest" in _load_error(root)
    root.chmod(0)
    try:
        assert "unreadable manifest" in _load_error(root)
    finally:
        root.chmod(0o755)


def test_unreadable_manifest_any_user(tmp_path, monkeypatch):
    """The same as root can see it: open() and stat() refused (EACCES), as for another user."""
    import errno

    from cxr_edge import manifest as module

    root = light_package(tmp_path)

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(module, "open", refuse, raising=False)
    assert "unreadable manifest: Permission denied" in _load_error(root)
    monkeypatch.setattr(module.Path, "exists", refuse)
    assert "unreadable manifest: Permission denied" in _load_error(root)


def test_loaded_package_properties_are_safe(tmp_path):
    """After load() returns, every property the runtime reads works, defaults included."""
    for package in (ModelPackage.load(), ModelPackage.load(DEFAULT_PACKAGE)):
        assert package.name and package.version and package.labels == LABELS
        assert package.temperatures.shape == package.thresholds.shape == (len(LABELS),)
        assert package.preprocess_params.size == package.to_manifest()["preprocessing"]["size"]
    root = light_package(tmp_path)
    edit_manifest(root, lambda m: (m["preprocessing"].pop("resize"), m["preprocessing"].pop("mean"),
                                   m.update(version=2), m.pop("architecture")))
    package = ModelPackage.load(root)
    assert package.version == "2" and package.preprocess_params.resize == "pad"
    assert package.temperatures.dtype == np.float64 and np.all(package.thresholds <= 1)


def _paths(node, prefix=()):
    yield prefix
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in children:
        yield from _paths(child, (*prefix, key))


def test_random_damage_gives_a_package_error_or_a_working_package(tmp_path):
    """Seeded random damage anywhere in the manifest (a value replaced by another JSON type, a
    key removed): load() raises ModelPackageError, or returns a package whose properties, backend
    selection and record fields all work. Never a KeyError / TypeError / ValueError."""
    import random

    from cxr_edge.backends import select_backend

    original = json.loads((DEFAULT_PACKAGE / "manifest.json").read_text())
    replacements = [None, True, False, 0, -1, 1, 2.5, 1e308, float("nan"), "", "x", [], {}, [1.0] * len(LABELS),
                    {"max_batch": 0}, [None]]
    paths = [p for p in _paths(original) if p]
    read = ("format", "format_version", "name", "version", "labels", "preprocessing", "calibration", "thresholds",
            "artifacts", "architecture")
    runtime = [p for p in paths if p[0] in read and p[:2] != ("calibration", "nll_before")]  # what the runtime reads
    rng = random.Random(10)
    root = light_package(tmp_path)
    outcomes = {"refused": 0, "loaded": 0}
    for _ in range(400):
        manifest = json.loads(json.dumps(original))
        for _ in range(rng.choice((1, 1, 2))):
            path = rng.choice(runtime if rng.random() < 0.8 else paths)
            node = manifest
            try:
                for key in path[:-1]:
                    node = node[key]
                if isinstance(node, dict) and rng.random() < 0.3:
                    node.pop(path[-1], None)
                else:
                    node[path[-1]] = rng.choice(replacements)
            except (KeyError, IndexError, TypeError):  # an earlier damage removed the way there
                pass
        (root / "manifest.json").write_text(json.dumps(manifest))
        try:
            package = ModelPackage.load(root)
        except ModelPackageError as exc:
            assert "\n" not in str(exc)
            outcomes["refused"] += 1
            continue
        outcomes["loaded"] += 1
        assert package.name and package.version and package.labels == LABELS
        assert package.temperatures.shape == package.thresholds.shape == (len(LABELS),)
        package.preprocess_params
        try:
            select_backend(package, "onnxruntime", "fp32")
        except ModelPackageError:
            pass
        assert package.architecture_name is None or isinstance(package.architecture_name, str)
    assert outcomes["refused"] > 100 and outcomes["loaded"] > 50, outcomes
