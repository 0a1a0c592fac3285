"""The per-input JSON record (schema cxr-edge/findings v1) as a typed class, and the run summary line.

Only identifiers leave the image: DICOM UIDs (each checked to be a valid UID, else null), file
path and sha256. No names, dates or other patient attributes are written to JSON or logs.
The writer (pipeline), the daemon's recovery and the tests read and write records through
`FindingsRecord` only, so the schema lives in one place.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from . import __version__
from .findings import Finding
from .labels import NO_FINDING

SCHEMA = "cxr-edge/findings"
SCHEMA_VERSION = 1


class Status(StrEnum):
    """An input's outcome: the record's and the pipeline result's `status`."""

    OK = "ok"
    ERROR = "error"


DICOM_UID_KEYS = {
    "study_instance_uid": "StudyInstanceUID",
    "series_instance_uid": "SeriesInstanceUID",
    "sop_instance_uid": "SOPInstanceUID",
    "sop_class_uid": "SOPClassUID",
}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class StageError:
    """Why an input failed (`error`), or why one of its outputs could not be made (`<sink>_error`)."""

    stage: str
    reason: str
    kind: str | None = None  # cxr_edge.errors kinds; an output's error has none
    file: str | None = None

    def to_json(self) -> dict:
        return {k: v for k, v in (("stage", self.stage), ("reason", self.reason), ("kind", self.kind),
                                  ("file", self.file)) if v is not None}

    @classmethod
    def from_json(cls, data: dict) -> "StageError":
        return cls(data["stage"], data["reason"], data.get("kind"), data.get("file"))


@dataclass
class FindingsRecord:
    status: Status
    input: dict  # path, relative_path, sha256, size_bytes, format
    model: dict
    backend: dict
    dicom: dict | None = None  # the source's UIDs
    image: dict | None = None
    findings: list[Finding] = field(default_factory=list)  # every label but No Finding, in label order
    no_finding: Finding | None = None
    timings_ms: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)  # sink name -> {"path", ...}
    error: StageError | None = None
    output_errors: dict[str, StageError] = field(default_factory=dict)  # sink name -> why it has no output
    created: str = field(default_factory=_now)
    cxr_edge_version: str = __version__

    # --- what readers ask -------------------------------------------------------------------
    @property
    def ok(self) -> bool:
        return self.status == Status.OK

    @property
    def positive_findings(self) -> list[str]:
        return [f.label for f in self.findings if f.positive]

    @property
    def input_sha256(self) -> str | None:
        return self.input.get("sha256")

    @property
    def sr(self) -> dict:
        """The SR output's entry ({} when there is none): path, sop_instance_uid, series_instance_uid."""
        return self.outputs.get("sr") or {}

    @property
    def sr_error(self) -> StageError | None:
        return self.output_errors.get("sr")

    @property
    def heatmap_files(self) -> list[str]:
        """Every heatmap file the record names (PNG and DICOM)."""
        maps = (self.outputs.get("heatmaps") or {}).get("maps") or []
        return [m[key] for m in maps for key in ("png", "dicom") if m.get(key)]

    @property
    def heatmap_dicoms(self) -> list[tuple[str, str | None]]:
        """(path, SOP Instance UID) of each heatmap's DICOM object, in the record's order."""
        maps = (self.outputs.get("heatmaps") or {}).get("maps") or []
        return [(m["dicom"], m.get("sop_instance_uid")) for m in maps if m.get("dicom")]

    # --- JSON -------------------------------------------------------------------------------
    def to_json(self) -> dict:
        data = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "status": self.status, "created": self.created,
                "cxr_edge_version": self.cxr_edge_version, "input": self.input, "dicom": self.dicom,
                "image": self.image, "model": self.model, "backend": self.backend}
        if self.ok:
            data["findings"] = [f.as_dict() for f in self.findings]
            data["no_finding"] = self.no_finding.as_dict() if self.no_finding else None
            data["positive_findings"] = self.positive_findings
            data["timings_ms"] = {k: round(v, 3) for k, v in self.timings_ms.items()}
            data["outputs"] = self.outputs
        else:
            data["error"] = self.error.to_json() if self.error else None
        for name, error in self.output_errors.items():
            data[f"{name}_error"] = error.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict) -> "FindingsRecord":
        """Raises ValueError when `data` is not a cxr-edge/findings v1 record."""
        if not isinstance(data, dict) or data.get("schema") != SCHEMA or data.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"not a {SCHEMA} v{SCHEMA_VERSION} record")
        try:
            findings = [_finding(f) for f in data.get("findings") or []]
            no_finding = _finding(data["no_finding"]) if data.get("no_finding") else None
            errors = {key.removesuffix("_error"): StageError.from_json(value) for key, value in data.items()
                      if key.endswith("_error") and isinstance(value, dict)}
            return cls(Status(data["status"]), data["input"], data["model"], data["backend"], data.get("dicom"),
                       data.get("image"), findings, no_finding, data.get("timings_ms") or {}, data.get("outputs") or {},
                       StageError.from_json(data["error"]) if data.get("error") else None, errors,
                       data.get("created", ""), data.get("cxr_edge_version", ""))
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"malformed {SCHEMA} record ({type(exc).__name__}: {exc})") from exc

    @classmethod
    def read(cls, path: Path) -> "FindingsRecord | None":
        """The record in `path`, or None when it is missing, unreadable or not a record."""
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except (OSError, ValueError):
            return None


def _finding(data: dict) -> Finding:
    return Finding(data["label"], float(data["probability"]), float(data["threshold"]), data.get("operating_point"))


# --- building records in the pipeline -----------------------------------------------------------
def input_section(prepared) -> dict:
    return {
        "path": str(prepared.item.path),
        "relative_path": prepared.item.relative.as_posix(),
        "sha256": prepared.sha256,
        "size_bytes": prepared.size_bytes,
        "format": prepared.format,
    }


def dicom_section(header) -> dict | None:
    """The source's UIDs; one that is not a valid UID is null (it could hold any text) and named
    under `invalid_uids`."""
    from .dicom_header import valid_uid

    if header is None:
        return None
    section = {key: valid_uid(header.get(tag)) for key, tag in DICOM_UID_KEYS.items()}
    invalid = [key for key, tag in DICOM_UID_KEYS.items() if header.get(tag) and section[key] is None]
    if invalid:
        section["invalid_uids"] = invalid
    return section


def findings_record(prepared, findings: list[Finding], model: dict, backend: dict, timings_ms: dict) -> FindingsRecord:
    return FindingsRecord(Status.OK, input_section(prepared), model, backend, dicom_section(prepared.dicom_header),
                          prepared.info or None, [f for f in findings if f.label != NO_FINDING],
                          next(f for f in findings if f.label == NO_FINDING), dict(timings_ms))


def error_record(prepared, stage: str, reason: str, model: dict, backend: dict, kind: str = "permanent") -> FindingsRecord:
    """`kind` (permanent, incomplete, transient, unexpected: see cxr_edge.errors) says whether
    the same input may succeed later."""
    return FindingsRecord(Status.ERROR, input_section(prepared), model, backend, dicom_section(prepared.dicom_header),
                          prepared.info or None, error=StageError(stage, reason, kind, str(prepared.item.path)))


def summary_line(record: FindingsRecord, outputs: dict) -> dict:
    line = {
        "input": record.input["relative_path"],
        "path": record.input["path"],
        "sha256": record.input_sha256,
        "status": record.status,
        "outputs": outputs,
    }
    if record.ok:
        line["positive_findings"] = record.positive_findings
        line["no_finding"] = record.no_finding.positive
        if record.dicom:
            line["sop_instance_uid"] = record.dicom["sop_instance_uid"]
        if record.sr_error:
            line["sr_error"] = record.sr_error.to_json()
    else:
        line["error"] = record.error.to_json()
    return line
