"""OUT/findings.parquet: one row per input of a backfill, made from its JSON record.

The per-input JSON stays the record of truth; the table is what a site queries over an archive
(`pandas.read_parquet`, DuckDB, Spark). A column per label holds its calibrated probability
(null for an input that failed), so "every study with p(Effusion) > 0.8" is one filter.
"""

from __future__ import annotations

from pathlib import Path

from .records import FindingsRecord

TABLE_NAME = "findings.parquet"

# identity, UIDs, outcome, model, outputs: (column, arrow type name)
FIXED_COLUMNS = (
    ("relative_path", "string"), ("path", "string"), ("sha256", "string"), ("size_bytes", "int64"),
    ("format", "string"), ("study_instance_uid", "string"), ("series_instance_uid", "string"),
    ("sop_instance_uid", "string"), ("status", "string"), ("error_stage", "string"), ("error_reason", "string"),
    ("error_kind", "string"), ("positive_findings", "list<string>"), ("no_finding", "bool"),
    ("model_name", "string"), ("model_version", "string"), ("model_sha256", "string"), ("json_path", "string"),
    ("sr_path", "string"), ("sr_error", "string"), ("heatmap_count", "int64"), ("from_earlier_run", "bool"),
    ("created", "string"),
)


def schema(labels: list[str]):
    import pyarrow as pa

    types = {"string": pa.string(), "int64": pa.int64(), "bool": pa.bool_(), "list<string>": pa.list_(pa.string())}
    return pa.schema([(name, types[kind]) for name, kind in FIXED_COLUMNS] + [(label, pa.float64()) for label in labels])


def table_row(record: FindingsRecord, json_path: str | None, labels: list[str], from_earlier_run: bool) -> dict:
    dicom = record.dicom or {}
    error = record.error
    row = {
        "relative_path": record.input.get("relative_path"), "path": record.input.get("path"),
        "sha256": record.input_sha256, "size_bytes": record.input.get("size_bytes"), "format": record.input.get("format"),
        "study_instance_uid": dicom.get("study_instance_uid"), "series_instance_uid": dicom.get("series_instance_uid"),
        "sop_instance_uid": dicom.get("sop_instance_uid"), "status": str(record.status),
        "error_stage": error.stage if error else None, "error_reason": error.reason if error else None,
        "error_kind": error.kind if error else None,
        "positive_findings": record.positive_findings if record.ok else None,
        "no_finding": record.no_finding.positive if record.ok and record.no_finding else None,
        "model_name": record.model.get("name"), "model_version": record.model.get("version"),
        "model_sha256": record.model.get("sha256"), "json_path": json_path, "sr_path": record.sr.get("path"),
        "sr_error": record.sr_error.reason if record.sr_error else None,
        "heatmap_count": len((record.outputs.get("heatmaps") or {}).get("maps") or []) if record.ok else 0,
        "from_earlier_run": from_earlier_run, "created": record.created,
    }
    # as the JSON record has them (rounded there), so a rerun's row read from the record is the same row
    probabilities = {f.label: f.as_dict()["probability"]
                     for f in [*record.findings, *([record.no_finding] if record.no_finding else [])]}
    row.update({label: probabilities.get(label) for label in labels})
    return row


def write_table(path: Path, batches: list, labels: list[str]) -> int:
    """Concatenate the row batches (pyarrow tables in `schema`), keep one row per input (the
    last seen: a retried task's), sort by input, write atomically. Returns the row count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .atomic import atomic_write

    table = pa.concat_tables([b.select(schema(labels).names).cast(schema(labels)) for b in batches]) \
        if batches else schema(labels).empty_table()
    # one row per input: the last of duplicates (Ray re-runs a task whose worker died; its rows come once,
    # but a row must never be counted twice whatever happens)
    index = pa.array(range(table.num_rows), pa.int64())
    last = table.append_column("_i", index).group_by("relative_path").aggregate([("_i", "max")])
    table = table.take(last.column("_i_max")).sort_by("relative_path")
    atomic_write(path, lambda f: pq.write_table(table, f, compression="zstd"))
    return table.num_rows
