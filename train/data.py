"""NIH ChestX-ray14 CSVs (Data_Entry_2017 format) and patient-wise splits."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np

from cxr_edge.labels import LABELS, parse_finding_labels


class Split(StrEnum):
    """The parts of a run's data; str-valued, so `splits["test"]` and JSON keys keep working."""

    TRAIN = "train"
    VAL = "val"
    TEST = "test"


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


def read_records(specs: list[str]) -> list[Record]:
    """Records of every `CSV[:IMAGE_DIR]` spec, in order."""
    records = []
    for spec in specs:
        csv_path, _, image_dir = spec.partition(":")
        records += read_nih_csv(csv_path, image_dir or None)
    return records


def patient_split(records: list[Record], fractions=(0.7, 0.15, 0.15), seed: int = 0) -> dict[Split, list[Record]]:
    """Seeded split by patient: every image of a patient lands in the same split."""
    patients = sorted({r.patient_id for r in records})
    order = np.random.default_rng(seed).permutation(len(patients))
    n_train = int(round(fractions[0] * len(patients)))
    n_val = int(round(fractions[1] * len(patients)))
    split_of = {}
    for rank, index in enumerate(order):
        split_of[patients[index]] = Split.TRAIN if rank < n_train else Split.VAL if rank < n_train + n_val else Split.TEST
    out = {name: [] for name in Split}
    for record in records:
        out[split_of[record.patient_id]].append(record)
    return out


def read_image_list(path: str | Path) -> set[str]:
    """NIH's `train_val_list.txt` / `test_list.txt`: one image file name per line."""
    return {line.strip() for line in Path(path).read_text().splitlines() if line.strip()}


def official_split(records: list[Record], train_val_list: str | Path, test_list: str | Path,
                   val_fraction: float = 0.1, seed: int = 0) -> dict[Split, list[Record]]:
    """NIH's official test list; validation = a seeded fraction of the train_val patients."""
    train_val, test = read_image_list(train_val_list), read_image_list(test_list)
    if train_val & test:
        raise ValueError(f"{train_val_list} and {test_list} share {len(train_val & test)} images")
    held_out = [r for r in records if r.path.name in test]
    rest = [r for r in records if r.path.name in train_val]
    inner = patient_split(rest, fractions=(1.0 - val_fraction, val_fraction, 0.0), seed=seed)
    patients_test = {r.patient_id for r in held_out}
    leaked = patients_test & {r.patient_id for r in rest}
    if leaked:  # NIH's lists are patient-wise; a custom list might not be
        raise ValueError(f"{len(leaked)} patients are in both the train_val and the test list (e.g. {sorted(leaked)[:3]})")
    return {Split.TRAIN: inner[Split.TRAIN], Split.VAL: inner[Split.VAL], Split.TEST: held_out}


def held_out_split(records: list[Record], target: list[Record], test_fraction: float, seed: int) -> dict[Split, list[Record]]:
    """Test = a seeded fraction of the patients of `target` (e.g. the full-resolution set, what
    users send), their images from `target` only; train = every image of every other patient
    (no validation part: the staged recipe validates by cross-validation on train)."""
    if not target:
        raise ValueError("the test data set has no images")
    patients = sorted({r.patient_id for r in target})
    order = np.random.default_rng(seed).permutation(len(patients))
    test_patients = {patients[i] for i in order[: int(round(test_fraction * len(patients)))]}
    target_paths = {r.path for r in target}
    return {Split.TRAIN: [r for r in records if r.patient_id not in test_patients],
            Split.VAL: [],
            Split.TEST: [r for r in records if r.patient_id in test_patients and r.path in target_paths]}


@dataclass(frozen=True)
class SplitSpec:
    """How a run splits its data; stored in the run's config so later steps use the same split."""

    data: tuple[str, ...]
    split_seed: int = 0
    train_val_list: str | None = None
    test_list: str | None = None
    val_fraction: float = 0.1
    test_data: str | None = None  # one of `data`: the test split is drawn from its patients only
    test_fraction: float = 0.3

    @classmethod
    def from_config(cls, cfg: dict) -> "SplitSpec":
        return cls(tuple(cfg["data"]), cfg.get("split_seed", 0), cfg.get("train_val_list"), cfg.get("test_list"),
                   cfg.get("val_fraction", 0.1), cfg.get("test_data"), cfg.get("test_fraction", 0.3))

    def splits(self) -> dict[Split, list[Record]]:
        records = read_records(list(self.data))
        if self.test_data:
            return held_out_split(records, read_records([self.test_data]), self.test_fraction, self.split_seed)
        if self.test_list:
            if not self.train_val_list:
                raise ValueError("--test-list needs --train-val-list")
            return official_split(records, self.train_val_list, self.test_list, self.val_fraction, self.split_seed)
        return patient_split(records, seed=self.split_seed)


def labels_of(records: list[Record]) -> np.ndarray:
    return np.array([r.labels for r in records], dtype=np.float32).reshape(len(records), len(LABELS))
