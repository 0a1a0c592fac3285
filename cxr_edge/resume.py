"""Is an input done already? The backfill's resume rule, asked once its bytes are hashed.

An input is done when its JSON record (written last, so its presence marks a complete set)
is for the same bytes (sha256) and the same model (name, version, artifact sha256), and
every output asked for now is there: the SR of a DICOM input (or the reason it could not be
made), the heatmaps (or theirs), and every file the record names. An error record counts as
done only when its error is permanent: the same bytes fail the same way again. Anything else
(a transient error, another model, a missing file) is done again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import PERMANENT
from .outputs import output_stem
from .records import FindingsRecord
from .sinks import RecordWriter


@dataclass(frozen=True)
class CompletedOutputs:
    """`prepare(..., earlier=CompletedOutputs(...))`: the record of complete outputs for
    (item, sha256), or None."""

    out_dir: Path
    model: dict  # ModelPackage.describe(artifact sha256): what a record's `model` must equal
    write_sr: bool
    heatmaps: bool

    def record_path(self, item) -> Path:
        return RecordWriter().path_for(self.out_dir / output_stem(item.relative))

    def __call__(self, item, sha256: str) -> FindingsRecord | None:
        record = FindingsRecord.read(self.record_path(item))
        if record is None or record.input_sha256 != sha256 or record.model != self.model:
            return None
        if not record.ok:
            return record if record.error is not None and record.error.kind == PERMANENT else None
        if self.write_sr and record.input.get("format") == "dicom" and not (record.sr or record.sr_error):
            return None
        if self.heatmaps and not (record.outputs.get("heatmaps") or record.output_errors.get("heatmaps")):
            return None
        files = [record.sr.get("path"), *record.heatmap_files]
        if not all(Path(path).is_file() for path in files if path):
            return None
        return record
