"""The model package: a folder with manifest.json and artifacts, each verified by sha256.

Like an entry in Triton's model repository. The manifest carries everything the runtime needs
to turn pixels into calibrated findings: label order, the preprocessing contract, per-class
temperatures and thresholds, and the artifacts (ONNX FP32, INT8, TensorRT engines).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import copy
import datetime
import functools
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import numpy as np

from .atomic import atomic_write, publish_dir, staging_dir
from .errors import ModelPackageError
from .labels import LABELS
from .operating_points import OperatingPoint
from .preprocess import PreprocessParams

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "cxr-edge-model"
MANIFEST_FORMAT_VERSION = 1
DEFAULT_PACKAGE = Path(__file__).parent / "models" / "default"
MAX_MANIFEST_BYTES = 16 << 20  # the bundled one is 11 kB; anything near this is not a manifest
MAX_INPUT_SIZE = 4096  # preprocessing.size: pixels on a side of the model's input
ARTIFACT_FORMATS = ("onnx", "tensorrt")
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class ArtifactFormat(StrEnum):
    ONNX = "onnx"
    TENSORRT = "tensorrt"


class Precision(StrEnum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"


@dataclass(frozen=True)
class Artifact:
    """One entry of the package's `artifacts`: a file, its sha256 and what it is."""

    key: str
    file: str
    sha256: str
    format: ArtifactFormat
    precision: str  # a Precision value for what cxr-edge builds; free text is kept as it was
    cpu_ms_per_image: float | None = None  # measured at build time (CPU), to pick the faster INT8
    max_batch: int = 1  # TensorRT optimisation profile's max
    stamp: dict = field(default_factory=dict)  # TensorRT: what the engine was built for (backends.stamp)
    fields: dict = field(default_factory=dict)  # the whole entry, for reports

    @classmethod
    def from_entry(cls, key: str, entry: dict) -> "Artifact":
        return cls(key, entry["file"], str(entry["sha256"]).lower(), ArtifactFormat(entry.get("format", "onnx")),
                   str(entry.get("precision", key)),
                   float(entry["cpu_ms_per_image"]) if "cpu_ms_per_image" in entry else None,
                   int(entry.get("profile", {}).get("max_batch", 1)), copy.deepcopy(entry.get("stamp", {})),
                   copy.deepcopy(entry))


@dataclass(frozen=True)
class HeatmapSpec:
    """The manifest's `heatmaps`: the graph output holding per-class maps [B, L, rows, columns]."""

    method: str  # "cam": the linear head on each patch token (the logit is the map's mean)
    output: str
    grid: tuple[int, int]


class ModelPackage:
    """A validated model package; nothing outside this module reads the manifest itself."""

    def __init__(self, root: str | Path, manifest: dict):
        """Raises ModelPackageError (naming the manifest and the field) when `manifest` is not valid."""
        self.root = Path(root)
        self._manifest = manifest
        self.validate()

    def __repr__(self) -> str:
        return f"ModelPackage({str(self.root)!r}, {self.name!r} {self.version!r})"

    # --- loading ---------------------------------------------------------------------------
    @classmethod
    def load(cls, root: str | Path | None = None) -> "ModelPackage":
        """Read and validate a package. Raises ModelPackageError (one line naming the package and
        the problem) for anything wrong with it, never another exception type; after it returns,
        every property (name, version, labels, temperatures, thresholds, preprocess_params) is safe."""
        root = Path(root) if root is not None else DEFAULT_PACKAGE
        path = root / MANIFEST_NAME
        try:
            if not path.exists():
                raise ModelPackageError(f"{root}: no {MANIFEST_NAME}; not a cxr-edge model package")
            if not path.is_file():
                raise ModelPackageError(f"{path}: not a regular file; not a cxr-edge model package")
            with open(path, "rb") as f:
                data = f.read(MAX_MANIFEST_BYTES + 1)
        except OSError as exc:
            raise ModelPackageError(f"{path}: unreadable manifest: {exc.strerror or type(exc).__name__}") from exc
        except ValueError as exc:  # a NUL in the path
            raise ModelPackageError(f"{root}: not a usable model package path: {exc}") from exc
        if len(data) > MAX_MANIFEST_BYTES:
            raise ModelPackageError(f"{path}: manifest larger than {MAX_MANIFEST_BYTES >> 20} MiB; refusing it")
        try:
            manifest = json.loads(data)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, too deep
            raise ModelPackageError(f"{path}: unreadable manifest: {_one_line(exc)}") from exc
        return cls(root, manifest)

    def validate(self) -> None:
        """Every field the runtime reads, checked for presence, type and range: a bad manifest is a
        ModelPackageError naming the manifest and the field, never a KeyError/TypeError later."""
        where = self.root / MANIFEST_NAME

        def fail(problem: str):
            raise ModelPackageError(f"{where}: {problem}")

        m = self._manifest
        if not isinstance(m, dict):
            fail(f"the manifest is a JSON {_json_type(m)}, not an object")
        if m.get("format") != MANIFEST_FORMAT or m.get("format_version") != MANIFEST_FORMAT_VERSION:
            fail(f"format {_short(m.get('format'))} v{_short(m.get('format_version'))} is not "
                 f"{MANIFEST_FORMAT} v{MANIFEST_FORMAT_VERSION}")
        for key in ("name", "version", "labels", "preprocessing", "calibration", "thresholds", "artifacts"):
            if key not in m:
                fail(f"missing required key {key!r}")
        if not isinstance(m["name"], str) or not m["name"].strip():
            fail(f"name must be a non-empty string, not {_short(m['name'])}")
        version = m["version"]
        if isinstance(version, bool) or not isinstance(version, (str, int)) or not str(version).strip():
            fail(f"version must be a non-empty string, not {_short(version)}")
        labels = m["labels"]
        if not isinstance(labels, (list, tuple)) or tuple(labels) != LABELS:
            fail(f"labels {_short(labels)} differ from cxr-edge's {list(LABELS)}")
        n = len(LABELS)
        temperatures = _numbers(fail, m, "calibration", "temperatures", n)
        if any(t <= 0 for t in temperatures):
            fail(f"calibration.temperatures must be positive (item {_first(lambda t: t <= 0, temperatures)} is not)")
        thresholds = _numbers(fail, m, "thresholds", "values", n)
        if any(not 0.0 <= t <= 1.0 for t in thresholds):
            fail(f"thresholds.values must lie in [0, 1] (item {_first(lambda t: not 0 <= t <= 1, thresholds)} does not)")
        _check_operating_points(fail, m["thresholds"], thresholds)
        _check_preprocessing(fail, m["preprocessing"])
        try:
            self.preprocess_params
        except (ValueError, TypeError, AttributeError) as exc:
            fail(f"preprocessing: {_one_line(exc)}")
        _check_artifacts(fail, m["artifacts"])
        architecture = m.get("architecture", {})  # optional; records name architecture.timm_name
        if not isinstance(architecture, dict):
            fail(f"architecture must be an object, not {_short(architecture)}")
        if not isinstance(architecture.get("timm_name", ""), (str, type(None))):
            fail(f"architecture.timm_name must be a string, not {_short(architecture['timm_name'])}")
        if "heatmaps" in m:
            _check_heatmaps(fail, m["heatmaps"])

    # --- contents ----------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self._manifest["name"]

    @property
    def version(self) -> str:
        return str(self._manifest["version"])

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self._manifest["labels"])

    @property
    def temperatures(self) -> np.ndarray:
        return np.asarray(self._manifest["calibration"]["temperatures"], dtype=np.float64)

    @property
    def thresholds(self) -> np.ndarray:
        return np.asarray(self._manifest["thresholds"]["values"], dtype=np.float64)

    @property
    def operating_points(self) -> list[OperatingPoint]:
        """Per label: its threshold, policy and expected sensitivity/specificity (a manifest from
        before operating points: the threshold and policy only)."""
        section = self._manifest["thresholds"]
        if "operating_points" in section:
            return [OperatingPoint.from_json(entry) for entry in section["operating_points"]]
        return [OperatingPoint(float(t), str(section.get("policy", "unknown")), None, None, 0, 0)
                for t in section["values"]]

    @property
    def preprocess_params(self) -> PreprocessParams:
        return PreprocessParams.from_manifest(self._manifest["preprocessing"])

    @property
    def preprocessing_id(self) -> str:
        """The preprocessing contract and its version, as records name it ("contract/vN")."""
        entry = self._manifest["preprocessing"]
        return f"{entry.get('contract')}/v{entry.get('version')}"

    @property
    def heatmap_spec(self) -> HeatmapSpec | None:
        """How the model's graph gives class maps (engines/class_maps.py); None: it does not."""
        entry = self._manifest.get("heatmaps")
        if entry is None:
            return None
        return HeatmapSpec(entry["method"], entry["output"], (int(entry["grid"][0]), int(entry["grid"][1])))

    @property
    def architecture_name(self) -> str | None:
        return self._manifest.get("architecture", {}).get("timm_name")

    def section(self, name: str) -> dict:
        """A copy of an informational section (architecture, provenance, export, metrics, ...);
        {} when absent. The runtime's own fields have typed properties instead."""
        value = self._manifest.get(name)
        return copy.deepcopy(value) if isinstance(value, dict) else {}

    def describe(self, artifact_sha256: str) -> dict:
        """The model as a findings record names it."""
        return {"name": self.name, "version": self.version, "sha256": artifact_sha256,
                "architecture": self.architecture_name, "preprocessing": self.preprocessing_id}

    # --- artifacts ---------------------------------------------------------------------------
    def artifacts(self, precision: str | None = None, format: str | None = None) -> list[Artifact]:
        """The artifacts with this precision and format (any, when None), sorted by key."""
        found = [Artifact.from_entry(key, entry) for key, entry in sorted(self._manifest["artifacts"].items())]
        return [a for a in found if (precision is None or a.precision == precision)
                and (format is None or a.format == format)]

    def artifact(self, key: str) -> Artifact:
        artifacts = self._manifest["artifacts"]
        if key not in artifacts:
            raise ModelPackageError(
                f"{self.root}: no {key!r} artifact (has: {', '.join(sorted(artifacts)) or 'none'})"
                + ("; build it with `cxr-edge build-engine`" if key != "fp32" else "")
            )
        return Artifact.from_entry(key, artifacts[key])

    def precisions(self) -> set[str]:
        return {a.precision for a in self.artifacts()}

    def read_verified(self, key: str) -> bytes:
        """The artifact's bytes, refused unless they match the manifest's sha256."""
        entry = self.artifact(key)
        path = self.root / entry.file
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ModelPackageError(f"{path}: cannot read artifact: {exc.strerror or type(exc).__name__}") from exc
        actual = sha256_bytes(data)
        if actual != entry.sha256:
            raise ModelPackageError(
                f"{path}: sha256 {actual} does not match the manifest's {entry.sha256}; "
                "the file is corrupt or was replaced, refusing to load it"
            )
        return data

    def verified_loader(self, key: str):
        """A loader (Polygraphy's habit: a callable a runner calls when it activates)."""
        self.artifact(key)  # an unknown key fails now, not at activation
        return functools.partial(self.read_verified, key)

    # --- new packages (train export, calibrate, build-engine) ----------------------------------
    def to_manifest(self) -> dict:
        """A deep copy of the manifest, to derive a new package from."""
        return copy.deepcopy(self._manifest)

    def recalibrated(self, fit: dict, fitted_on: str, version: str) -> dict:
        """This manifest with new temperatures, thresholds and report (`fit`:
        calibration.fit_calibration's result) under a new version; the old ones are kept under
        `recalibrations`."""
        out = self.to_manifest()
        previous = {"version": out["version"], "calibration": out["calibration"], "thresholds": out["thresholds"]}
        out["version"] = version
        out["calibration"] = {"method": "temperature", "temperatures": fit["temperatures"], "fitted_on": fitted_on,
                              "positives": fit["positives"], "temperature_fitted": fit["temperature_fitted"],
                              **fit["report"]}
        out["thresholds"] = {"policy": fit["threshold_policy"], "values": fit["thresholds"], "chosen_on": fitted_on,
                             "operating_points": fit["operating_points"]}
        out.setdefault("recalibrations", []).append(
            previous | {"at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
        return out

    def add_artifact(self, key: str, filename: str, **fields) -> Artifact:
        """Register a file of the package folder as an artifact (its sha256 read now), then validate."""
        entry = {"file": filename, "sha256": sha256_file(self.root / filename), **fields}
        artifacts = self._manifest.setdefault("artifacts", {})
        previous = artifacts.get(key)
        artifacts[key] = entry
        try:
            self.validate()
        except ModelPackageError:
            if previous is None:
                del artifacts[key]
            else:
                artifacts[key] = previous
            raise
        return Artifact.from_entry(key, entry)

    def save(self) -> Path:
        self.validate()
        path = self.root / MANIFEST_NAME
        atomic_write(path, (json.dumps(self._manifest, indent=2) + "\n").encode())
        return path


def write_package_copy(source: ModelPackage, target: str | Path, manifest: dict | None = None,
                       replace: dict[str, bytes] | None = None) -> ModelPackage:
    """A new package at `target`: `source`'s artifacts (sha256-verified) under `manifest`
    (default: the source's), or the bytes `replace` gives for a key (the manifest names their
    sha256). Built in a sibling staging folder and renamed into place, so `target` is complete
    or absent."""
    target = Path(target)
    if target.exists():
        raise ModelPackageError(f"{target}: already exists; choose a new folder for the new package")
    manifest = source.to_manifest() if manifest is None else manifest
    staging = staging_dir(target)
    try:
        for key, entry in manifest["artifacts"].items():
            data = (replace or {}).get(key)
            atomic_write(staging / entry["file"], source.read_verified(key) if data is None else data)
        ModelPackage(staging, manifest).save()
        publish_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ModelPackage.load(target)


# --- validation helpers --------------------------------------------------------------------------
def _one_line(exc: BaseException | str) -> str:
    text = str(exc)
    return " ".join(line.strip() for line in text.splitlines() if line.strip()) or type(exc).__name__


def _json_type(value) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _short(value, limit: int = 60) -> str:
    text = _one_line(repr(value)) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _first(predicate, values) -> int:
    return next(i for i, v in enumerate(values) if predicate(v))


def _finite(value) -> float | None:
    """A JSON number as a finite float, else None (booleans, strings, NaN, Infinity, 1e400, 10**400)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None  # (numpy numbers: a manifest built in memory by train / calibrate before save())
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _numbers(fail, m: dict, block: str, key: str, n: int) -> list[float]:
    section = m[block]
    if not isinstance(section, dict):
        fail(f"{block} must be an object with {key!r}, not {_short(section)}")
    if key not in section:
        fail(f"missing {block}.{key}")
    values = section[key]
    if not isinstance(values, list) or len(values) != n:
        count = f"{len(values)} values" if isinstance(values, list) else _short(values)
        fail(f"{block}.{key} must be {n} finite numbers (one per label), not {count}")
    numbers = [_finite(v) for v in values]
    if None in numbers:
        i = numbers.index(None)
        fail(f"{block}.{key} must be {n} finite numbers; item {i} is {_short(values[i])}")
    return numbers


def _check_operating_points(fail, section: dict, thresholds: list[float]) -> None:
    """Optional `thresholds.operating_points`: one per label, each at its label's threshold."""
    if "operating_points" not in section:
        return
    points = section["operating_points"]
    if not isinstance(points, list) or len(points) != len(thresholds):
        fail(f"thresholds.operating_points must be {len(thresholds)} objects (one per label), not {_short(points)}")
    for i, (entry, threshold) in enumerate(zip(points, thresholds)):
        try:
            point = OperatingPoint.from_json(entry)
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            fail(f"thresholds.operating_points item {i}: {_one_line(exc)}")
        if not math.isclose(point.threshold, threshold, rel_tol=0, abs_tol=1e-6):
            fail(f"thresholds.operating_points item {i} is not at thresholds.values item {i}")
        for name in ("expected_sensitivity", "expected_specificity"):
            value = getattr(point, name)
            if value is not None and not 0.0 <= value <= 1.0:
                fail(f"thresholds.operating_points item {i}: {name} must lie in [0, 1]")


def _check_preprocessing(fail, entry) -> None:
    """Types and ranges PreprocessParams does not check itself (it takes any values it is given)."""
    if not isinstance(entry, dict):
        fail(f"preprocessing must be an object, not {_short(entry)}")
    size, channels = entry.get("size", 224), entry.get("channels", 1)
    if isinstance(size, bool) or not isinstance(size, int) or not 8 <= size <= MAX_INPUT_SIZE:
        fail(f"preprocessing.size must be a whole number from 8 to {MAX_INPUT_SIZE}, not {_short(size)}")
    if isinstance(channels, bool) or channels not in (1, 3) or not isinstance(channels, int):
        fail(f"preprocessing.channels must be 1 or 3, not {_short(channels)}")
    for key in ("mean", "std"):
        if key in entry and _finite(entry[key]) is None:
            fail(f"preprocessing.{key} must be a finite number, not {_short(entry[key])}")
    if "std" in entry and entry["std"] <= 0:
        fail(f"preprocessing.std must be positive, not {_short(entry['std'])}")
    if not isinstance(entry.get("resize", "pad"), str):
        fail(f"preprocessing.resize must be a string, not {_short(entry['resize'])}")


def _check_heatmaps(fail, entry) -> None:
    if not isinstance(entry, dict):
        fail(f"heatmaps must be an object, not {_short(entry)}")
    if entry.get("method") != "cam":
        fail(f"heatmaps.method must be 'cam', not {_short(entry.get('method'))}")
    if not isinstance(entry.get("output"), str) or not entry["output"]:
        fail(f"heatmaps.output must be the name of a model output, not {_short(entry.get('output'))}")
    grid = entry.get("grid")
    if (not isinstance(grid, list) or len(grid) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 1024 for v in grid)):
        fail(f"heatmaps.grid must be [rows, columns] of whole numbers in [1, 1024], not {_short(grid)}")


def _check_artifacts(fail, artifacts) -> None:
    if not isinstance(artifacts, dict) or not artifacts:
        fail(f"artifacts must be an object with at least one artifact, not {_short(artifacts)}")
    for key, entry in artifacts.items():
        if not isinstance(entry, dict):
            fail(f"artifact {key!r} must be an object, not {_short(entry)}")
        for required in ("file", "sha256"):
            if required not in entry:
                fail(f"artifact {key!r} has no {required!r}")
        file = entry["file"]
        if not isinstance(file, str) or not file.strip() or "\0" in file:
            fail(f"artifact {key!r}: file must be a file name, not {_short(file)}")
        if Path(file).is_absolute() or ".." in Path(file).parts:
            fail(f"artifact {key!r}: path {file!r} leaves the package")
        if not isinstance(entry["sha256"], str) or not _SHA256.fullmatch(entry["sha256"]):
            fail(f"artifact {key!r}: sha256 must be 64 hex digits, not {_short(entry['sha256'])}")
        if entry.get("format", "onnx") not in ARTIFACT_FORMATS:
            fail(f"artifact {key!r}: format must be one of {ARTIFACT_FORMATS}, not {_short(entry.get('format'))}")
        if not isinstance(entry.get("precision", key), str):
            fail(f"artifact {key!r}: precision must be a string, not {_short(entry.get('precision'))}")
        if "cpu_ms_per_image" in entry and _finite(entry["cpu_ms_per_image"]) is None:
            fail(f"artifact {key!r}: cpu_ms_per_image must be a finite number")
        for section in ("stamp", "profile"):
            if section in entry and not isinstance(entry[section], dict):
                fail(f"artifact {key!r}: {section} must be an object, not {_short(entry[section])}")
        max_batch = entry.get("profile", {}).get("max_batch", 1)
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            fail(f"artifact {key!r}: profile.max_batch must be a whole number >= 1, not {_short(max_batch)}")
