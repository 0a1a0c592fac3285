"""The per-input JSON record (schema cxr-edge/findings v1) and the run summary line.

Only identifiers leave the image: DICOM UIDs (each checked to be a valid UID, else null), file
path and sha256. No names, dates or other patient attributes are written to JSON or logs.
"""

from __future__ import annotations

import datetime

from . import __version__
from .findings import Finding
from .labels import NO_FINDING
from .outputs import SCHEMA, SCHEMA_VERSION

DICOM_UID_KEYS = {
    "study_instance_uid": "StudyInstanceUID",
    "series_instance_uid": "SeriesInstanceUID",
    "sop_instance_uid": "SOPInstanceUID",
    "sop_class_uid": "SOPClassUID",
}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


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


def base_record(prepared, model: dict, backend: dict) -> dict:
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "status": "ok",
        "created": _now(),
        "cxr_edge_version": __version__,
        "input": input_section(prepared),
        "dicom": dicom_section(prepared.dicom_header),
        "image": prepared.info or None,
        "model": model,
        "backend": backend,
    }


def findings_record(prepared, findings: list[Finding], model: dict, backend: dict, timings_ms: dict) -> dict:
    record = base_record(prepared, model, backend)
    by_label = {f.label: f for f in findings}
    record["findings"] = [f.as_dict() for f in findings if f.label != NO_FINDING]
    record["no_finding"] = by_label[NO_FINDING].as_dict()
    record["positive_findings"] = [f.label for f in findings if f.positive and f.label != NO_FINDING]
    record["timings_ms"] = {k: round(v, 3) for k, v in timings_ms.items()}
    record["outputs"] = {}
    return record


def error_record(prepared, stage: str, reason: str, model: dict, backend: dict, kind: str = "permanent") -> dict:
    """`kind` (permanent, incomplete, transient, unexpected: see cxr_edge.errors) says whether
    the same input may succeed later."""
    record = base_record(prepared, model, backend)
    record["status"] = "error"
    record["error"] = {"stage": stage, "reason": reason, "kind": kind, "file": str(prepared.item.path)}
    return record


def summary_line(record: dict, outputs: dict) -> dict:
    line = {
        "input": record["input"]["relative_path"],
        "path": record["input"]["path"],
        "sha256": record["input"]["sha256"],
        "status": record["status"],
        "outputs": outputs,
    }
    if record["status"] == "ok":
        line["positive_findings"] = record["positive_findings"]
        line["no_finding"] = record["no_finding"]["positive"]
        if record["dicom"]:
            line["sop_instance_uid"] = record["dicom"]["sop_instance_uid"]
        if record.get("sr_error"):
            line["sr_error"] = record["sr_error"]
    else:
        line["error"] = record["error"]
    return line
