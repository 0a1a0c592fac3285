"""Records to model tensors through the runtime's one decode path (cxr_edge.workers), in memory
or as an on-disk float16 cache. An image that fails to decode, or crashes its decoder, is left
out with its label and reported by name and reason."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import NamedTuple

import numpy as np

from cxr_edge.atomic import atomic_write_json, current_umask, publish_dir
from cxr_edge.preprocess import PreprocessParams
from cxr_edge.sources import InputItem
from cxr_edge.workers import WorkerPool, tensors_for

from .data import Record

log = logging.getLogger(__name__)


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


def input_items(records: list[Record]) -> list[InputItem]:
    """Records as the runtime's inputs (what tensors_for and the decode workers take)."""
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
    tensor_set = tensors_for(input_items(records), params, workers)
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
        log.info("building tensor cache %s (%d images)", entry, len(records))
        items, rows, left_out = input_items(records), 0, {}
        with WorkerPool(workers, params, min_side=0) as pool:
            for start in range(0, len(items), CACHE_CHUNK):
                chunk = items[start : start + CACHE_CHUNK]
                part = tensors_for(chunk, params, workers, pool=pool)
                array[rows : rows + len(part.ok)] = part.tensors
                rows += len(part.ok)
                failed = _failed_rows(len(chunk), part.ok, part.failures)
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
