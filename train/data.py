"""NIH ChestX-ray14 CSVs (Data_Entry_2017 format), patient-wise splits, preprocessed tensors."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path, PurePath
from typing import NamedTuple

import numpy as np

from cxr_edge.atomic import atomic_write_json, current_umask, publish_dir
from cxr_edge.labels import LABELS, parse_finding_labels
from cxr_edge.preprocess import PreprocessParams
from cxr_edge.sources import InputItem
from cxr_edge.workers import WorkerPool, tensors_for

log = logging.getLogger(__name__)


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

    def splits(self) -> dict[Split, list[Record]]:
        records = read_records(list(self.data))
        if self.test_list:
            if not self.train_val_list:
                raise ValueError("--test-list needs --train-val-list")
            return official_split(records, self.train_val_list, self.test_list, self.val_fraction, self.split_seed)
        return patient_split(records, seed=self.split_seed)


def labels_of(records: list[Record]) -> np.ndarray:
    return np.array([r.labels for r in records], dtype=np.float32).reshape(len(records), len(LABELS))


class LeftOut(NamedTuple):
    """An image that did not decode: left out of the tensors, with its label."""

    path: Path
    reason: str  # "stage: reason", as the runtime reports it


@dataclass(frozen=True)
class Decoded:
    """The records whose images decoded (in order), their tensors, and the ones left out."""

    records: list[Record]
    images: np.ndarray  # [len(records), C, H, W]: float32 in memory, float16 memory-mapped from a cache
    left_out: list[LeftOut]


def _items(records: list[Record]) -> list[InputItem]:
    return [InputItem(r.path.absolute(), PurePath(r.path.name)) for r in records]


def _decoded(records: list[Record], images: np.ndarray, left_out: dict[int, str]) -> Decoded:
    if records and len(left_out) == len(records):  # nothing to train or evaluate on: say why
        examples = "; ".join(f"{records[i].path}: {reason}" for i, reason in list(left_out.items())[:3])
        raise ValueError(f"none of the {len(records)} images decoded ({examples})")
    kept = [r for i, r in enumerate(records) if i not in left_out]
    return Decoded(kept, images, [LeftOut(records[i].path, reason) for i, reason in sorted(left_out.items())])


def _failed_rows(n: int, ok: np.ndarray, failures: list) -> dict[int, str]:
    """Index -> reason of the failures of a TensorSet (failures come in input order)."""
    failed = sorted(set(range(n)) - set(ok.tolist()))
    return {i: reason for i, (_, reason) in zip(failed, failures)}


def load_tensors(records: list[Record], params: PreprocessParams, workers: int = 2) -> Decoded:
    """Decode + preprocess every record once, in the runtime's crash-isolated workers, into memory."""
    tensor_set = tensors_for(_items(records), params, workers)
    return _decoded(records, tensor_set.tensors, _failed_rows(len(records), tensor_set.ok, tensor_set.failures))


CACHE_IMAGES, CACHE_INDEX = "images.npy", "index.json"
CACHE_CHUNK = 256  # images decoded per tensors_for call: the build holds one chunk in memory, not the set


def cache_key(records: list[Record], params: PreprocessParams) -> str:
    """Covers the preprocessing contract and parameters and every file's path, size and mtime,
    so a changed image or contract builds a new cache instead of reusing a stale one."""
    source = json.dumps({"params": params.to_manifest(),
                         "files": [(str(r.path), r.path.stat().st_size, r.path.stat().st_mtime_ns) for r in records]})
    return hashlib.sha256(source.encode()).hexdigest()[:20]


def cached_tensors(records: list[Record], params: PreprocessParams, cache_dir: str | Path, workers: int = 2) -> Decoded:
    """Preprocessed images as a float16 memory-mapped .npy in `cache_dir/<key>/`, built once.

    The folder also lists the images that failed to decode (index.json), so a cache hit leaves
    out and reports the same ones without decoding again.
    """
    cache_dir = Path(cache_dir)
    entry = cache_dir / cache_key(records, params)
    if entry.is_dir():
        log.info("tensor cache hit: %s (%d images)", entry, len(records))
    else:
        _build_cache(records, params, cache_dir, entry, workers)
    index = json.loads((entry / CACHE_INDEX).read_text())
    left_out = {row["index"]: row["reason"] for row in index["left_out"]}
    images = np.load(entry / CACHE_IMAGES, mmap_mode="r")[: index["images"]]  # rows past it were never written
    return _decoded(records, images, left_out)


def _build_cache(records: list[Record], params: PreprocessParams, cache_dir: Path, entry: Path, workers: int) -> None:
    """Built in a staging folder of its own (two DDP ranks may build the same cache at once) and
    published whole: a killed build leaves only a `.partial` folder, never a half cache."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".partial", dir=cache_dir))
    try:
        os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp's 0700 would hide a shared cache from its users
        shape = (len(records), params.channels, params.size, params.size)
        array = np.lib.format.open_memmap(staging / CACHE_IMAGES, mode="w+", dtype=np.float16, shape=shape)
        items, rows, left_out = _items(records), 0, {}
        with WorkerPool(workers, params, min_side=0) as pool:
            for start in range(0, len(items), CACHE_CHUNK):
                part = tensors_for(items[start : start + CACHE_CHUNK], params, workers, pool=pool)
                array[rows : rows + len(part.ok)] = part.tensors
                rows += len(part.ok)
                failed = _failed_rows(len(items[start : start + CACHE_CHUNK]), part.ok, part.failures)
                left_out |= {start + i: reason for i, reason in failed.items()}
        array.flush()
        del array
        with open(staging / CACHE_IMAGES, "rb") as f:  # publish_dir syncs the folders, not file contents
            os.fsync(f.fileno())
        atomic_write_json(staging / CACHE_INDEX, {
            "images": rows,
            "left_out": [{"index": i, "file": str(records[i].path), "reason": r} for i, r in sorted(left_out.items())]})
        try:
            publish_dir(staging, entry)
        except OSError:
            if not entry.is_dir():
                raise
            log.info("tensor cache %s was built by another process meanwhile; using it", entry)
            return
        log.info("tensor cache built: %s (%d images, %d left out)", entry, rows, len(left_out))
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone after a publish; a failed build's leftovers
