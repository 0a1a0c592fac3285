"""NIH ChestX-ray14 CSVs (Data_Entry_2017 format), patient-wise splits, preprocessed tensors."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
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


def read_records(specs: list[str]) -> list[Record]:
    """Records of every `CSV[:IMAGE_DIR]` spec, in order."""
    records = []
    for spec in specs:
        csv_path, _, image_dir = spec.partition(":")
        records += read_nih_csv(csv_path, image_dir or None)
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


def read_image_list(path: str | Path) -> set[str]:
    """NIH's `train_val_list.txt` / `test_list.txt`: one image file name per line."""
    return {line.strip() for line in Path(path).read_text().splitlines() if line.strip()}


def official_split(records: list[Record], train_val_list: str | Path, test_list: str | Path,
                   val_fraction: float = 0.1, seed: int = 0) -> dict[str, list[Record]]:
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
    return {"train": inner["train"], "val": inner["val"], "test": held_out}


@dataclass(frozen=True)
class SplitSpec:
    """How a run splits its data; stored in the run's config so later steps use the same split."""

    data: tuple[str, ...]
    split_seed: int = 0
    train_val_list: str | None = None
    test_list: str | None = None
    val_fraction: float = 0.1

    @classmethod
    def from_config(cls, cfg: dict) -> "SplitSpec":
        return cls(tuple(cfg["data"]), cfg.get("split_seed", 0), cfg.get("train_val_list"), cfg.get("test_list"),
                   cfg.get("val_fraction", 0.1))

    def splits(self) -> dict[str, list[Record]]:
        records = read_records(list(self.data))
        if self.test_list:
            if not self.train_val_list:
                raise ValueError("--test-list needs --train-val-list")
            return official_split(records, self.train_val_list, self.test_list, self.val_fraction, self.split_seed)
        return patient_split(records, seed=self.split_seed)


def _load_one(args) -> np.ndarray:
    path, params = args
    return preprocess(decode_file(path).pixels, params)


def labels_of(records: list[Record]) -> np.ndarray:
    return np.array([r.labels for r in records], dtype=np.float32).reshape(len(records), len(LABELS))


def load_tensors(records: list[Record], params: PreprocessParams, workers: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Decode + preprocess every record once, in worker processes, into memory."""
    with ProcessPoolExecutor(max_workers=workers) as pool:
        images = list(pool.map(_load_one, [(r.path, params) for r in records], chunksize=16))
    return np.stack(images).astype(np.float32), labels_of(records)


def cached_tensors(records: list[Record], params: PreprocessParams, cache_dir: str | Path, workers: int = 2) -> np.ndarray:
    """Preprocessed images as a float16 memory-mapped .npy in `cache_dir`, built once.

    The key covers the preprocessing contract and parameters and every file's path, size and
    mtime, so a changed image or contract builds a new cache instead of reusing a stale one.
    """
    key_source = json.dumps({"params": params.to_manifest(),
                             "files": [(str(r.path), r.path.stat().st_size, r.path.stat().st_mtime_ns) for r in records]})
    key = hashlib.sha256(key_source.encode()).hexdigest()[:20]
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"{key}.npy"
    if path.is_file():
        log.info("tensor cache hit: %s (%d images)", path, len(records))
        return np.load(path, mmap_mode="r")
    shape = (len(records), params.channels, params.size, params.size)
    tmp = path.with_name(f".{key}.{os.getpid()}.npy.tmp")
    array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=shape)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for i, image in enumerate(pool.map(_load_one, [(r.path, params) for r in records], chunksize=16)):
            array[i] = image
    array.flush()
    del array
    os.replace(tmp, path)  # complete or absent: a killed build leaves only a temp file
    log.info("tensor cache built: %s (%d images)", path, len(records))
    return np.load(path, mmap_mode="r")
