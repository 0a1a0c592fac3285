"""NIH ChestX-ray14 CSVs (Data_Entry_2017 format), patient-wise splits, preprocessed tensors."""

from __future__ import annotations

import csv
import logging
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxr_edge.decode import decode_file
from cxr_edge.labels import LABELS, parse_finding_labels
from cxr_edge.preprocess import PreprocessParams, preprocess

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Record:
    path: Path
    patient_id: str
    labels: tuple[int, ...]  # multi-hot over LABELS


def read_nih_csv(csv_path: str | Path, image_dir: str | Path | None = None) -> list[Record]:
    """Rows of NIH's Data_Entry_2017 format: `Image Index`, `Finding Labels`, `Patient ID`."""
    csv_path = Path(csv_path)
    image_dir = Path(image_dir) if image_dir else csv_path.parent / "images"
    records = []
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"Image Index", "Finding Labels", "Patient ID"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{csv_path}: missing NIH column(s) {sorted(missing)}")
        for row in reader:
            path = image_dir / row["Image Index"]
            if not path.is_file():
                raise FileNotFoundError(f"{csv_path}: image {path} listed but not found")
            records.append(Record(path, row["Patient ID"].strip(), tuple(parse_finding_labels(row["Finding Labels"]))))
    return records


def patient_split(records: list[Record], fractions=(0.7, 0.15, 0.15), seed: int = 0) -> dict[str, list[Record]]:
    """Seeded split by patient: every image of a patient lands in the same split."""
    patients = sorted({r.patient_id for r in records})
    order = np.random.default_rng(seed).permutation(len(patients))
    n_train = int(round(fractions[0] * len(patients)))
    n_val = int(round(fractions[1] * len(patients)))
    split_of = {}
    for rank, index in enumerate(order):
        split_of[patients[index]] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
    out = {name: [] for name in SPLITS}
    for record in records:
        out[split_of[record.patient_id]].append(record)
    return out


def _load_one(args) -> np.ndarray:
    path, params = args
    return preprocess(decode_file(path).pixels, params)


def load_tensors(records: list[Record], params: PreprocessParams, workers: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Decode + preprocess every record once (the cache), in worker processes."""
    with ProcessPoolExecutor(max_workers=workers) as pool:
        images = list(pool.map(_load_one, [(r.path, params) for r in records], chunksize=16))
    x = np.stack(images).astype(np.float32)
    y = np.array([r.labels for r in records], dtype=np.float32).reshape(len(records), len(LABELS))
    return x, y
