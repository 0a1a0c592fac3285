"""The model package: a folder with manifest.json and artifacts, each verified by sha256.

Like an entry in Triton's model repository. The manifest carries everything the runtime needs
to turn pixels into calibrated findings: label order, the preprocessing contract, per-class
temperatures and thresholds, and the artifacts (ONNX FP32, INT8, TensorRT engines).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ModelPackageError
from .labels import LABELS
from .preprocess import PreprocessParams

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "cxr-edge-model"
MANIFEST_FORMAT_VERSION = 1
DEFAULT_PACKAGE = Path(__file__).parent / "models" / "default"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class ModelPackage:
    root: Path
    manifest: dict

    # --- loading ---------------------------------------------------------------------------
    @classmethod
    def load(cls, root: str | Path | None = None) -> "ModelPackage":
        root = Path(root) if root is not None else DEFAULT_PACKAGE
        path = root / MANIFEST_NAME
        if not path.is_file():
            raise ModelPackageError(f"{root}: no {MANIFEST_NAME}; not a cxr-edge model package")
        try:
            manifest = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelPackageError(f"{path}: unreadable manifest: {exc}") from exc
        package = cls(root, manifest)
        package.validate()
        return package

    def validate(self) -> None:
        m = self.manifest
        where = self.root / MANIFEST_NAME
        if m.get("format") != MANIFEST_FORMAT or m.get("format_version") != MANIFEST_FORMAT_VERSION:
            raise ModelPackageError(
                f"{where}: format {m.get('format')!r} v{m.get('format_version')} is not "
                f"{MANIFEST_FORMAT} v{MANIFEST_FORMAT_VERSION}"
            )
        for key in ("name", "version", "labels", "preprocessing", "calibration", "thresholds", "artifacts"):
            if key not in m:
                raise ModelPackageError(f"{where}: missing required key {key!r}")
        n = len(m["labels"])
        if tuple(m["labels"]) != LABELS:
            raise ModelPackageError(f"{where}: labels {m['labels']} differ from cxr-edge's {list(LABELS)}")
        for key, values in (("calibration.temperatures", self.temperatures), ("thresholds.values", self.thresholds)):
            if values.shape != (n,) or not np.all(np.isfinite(values)):
                raise ModelPackageError(f"{where}: {key} must be {n} finite numbers")
        if np.any(self.temperatures <= 0):
            raise ModelPackageError(f"{where}: temperatures must be positive")
        try:
            self.preprocess_params
        except (ValueError, TypeError) as exc:
            raise ModelPackageError(f"{where}: preprocessing: {exc}") from exc

    # --- contents ----------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.manifest["labels"])

    @property
    def temperatures(self) -> np.ndarray:
        return np.asarray(self.manifest["calibration"]["temperatures"], dtype=np.float64)

    @property
    def thresholds(self) -> np.ndarray:
        return np.asarray(self.manifest["thresholds"]["values"], dtype=np.float64)

    @property
    def preprocess_params(self) -> PreprocessParams:
        return PreprocessParams.from_manifest(self.manifest["preprocessing"])

    def artifact(self, key: str) -> dict:
        artifacts = self.manifest["artifacts"]
        if key not in artifacts:
            raise ModelPackageError(
                f"{self.root}: no {key!r} artifact (has: {', '.join(sorted(artifacts)) or 'none'})"
                + ("; build it with `cxr-edge build-engine`" if key != "fp32" else "")
            )
        return artifacts[key]

    def read_verified(self, key: str) -> bytes:
        """The artifact's bytes, refused unless they match the manifest's sha256."""
        entry = self.artifact(key)
        path = self.root / entry["file"]
        if Path(entry["file"]).is_absolute() or ".." in Path(entry["file"]).parts:
            raise ModelPackageError(f"{self.root}: artifact path {entry['file']!r} leaves the package")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ModelPackageError(f"{path}: cannot read artifact: {exc.strerror}") from exc
        actual = sha256_bytes(data)
        if actual != entry["sha256"]:
            raise ModelPackageError(
                f"{path}: sha256 {actual} does not match the manifest's {entry['sha256']}; "
                "the file is corrupt or was replaced, refusing to load it"
            )
        return data

    # --- writing (train export, build-engine) ------------------------------------------------
    def add_artifact(self, key: str, filename: str, **fields) -> dict:
        entry = {"file": filename, "sha256": sha256_file(self.root / filename), **fields}
        self.manifest.setdefault("artifacts", {})[key] = entry
        return entry

    def save(self) -> Path:
        self.validate()
        path = self.root / MANIFEST_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.manifest, indent=2) + "\n")
        tmp.replace(path)
        return path


def write_package_copy(source: ModelPackage, target: str | Path, manifest: dict) -> ModelPackage:
    """A new package at `target`: `source`'s artifacts (sha256-verified) under a new manifest.

    Built in a sibling staging folder and renamed into place, so `target` is complete or absent.
    """
    import shutil

    target = Path(target)
    if target.exists():
        raise ModelPackageError(f"{target}: already exists; choose a new folder for the new package")
    staging = target.with_name(f".{target.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        for key, entry in manifest["artifacts"].items():
            data = source.read_verified(key)
            (staging / entry["file"]).parent.mkdir(parents=True, exist_ok=True)
            (staging / entry["file"]).write_bytes(data)
        ModelPackage(staging, manifest).save()
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ModelPackage.load(target)
