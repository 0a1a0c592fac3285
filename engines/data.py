"""Calibration and held-out images for build-engine, through the runtime's own decode + preprocessing.

Sources are a folder (walked like `cxr-edge infer` walks it) or a labeled NIH CSV (`CSV` or
`CSV:IMAGE_DIR`; images beside it in `images/` by default). Selection is deterministic: a seeded
choice from the sorted list, so the same command picks the same images on every machine.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxr_edge.errors import CxrEdgeError
from cxr_edge.labeled import read_labels_csv
from cxr_edge.sources import InputItem, discover

log = logging.getLogger(__name__)
LABEL_FILES = ("labels.csv", "Data_Entry_2017.csv")


@dataclass
class ImageSet:
    paths: list[Path]
    labels: np.ndarray | None  # [n, 15] multi-hot when the source was a labeled CSV


def list_source(source: str) -> ImageSet:
    """Every image of a folder, or of a labeled CSV, in a stable order."""
    head, _, image_dir = source.partition(":")
    path = Path(head) if head.lower().endswith(".csv") else Path(source)
    if path.suffix.lower() == ".csv":
        rows = read_labels_csv(path)
        folder = Path(image_dir) if image_dir else path.parent / "images"
        if not folder.is_dir():
            folder = path.parent
        missing = [name for name in rows if not (folder / name).is_file()]
        if missing:
            raise CxrEdgeError(f"{path}: {len(missing)} listed image(s) not in {folder}, e.g. {missing[:3]}")
        names = sorted(rows)
        return ImageSet([folder / n for n in names], np.stack([rows[n] for n in names]))
    items, _ = discover([path])
    paths = sorted(item.path for item in items)
    for name in LABEL_FILES:  # a folder that carries its labels (like ../shared/data/nih) gets AUROC deltas
        if (path / name).is_file():
            rows = read_labels_csv(path / name)
            if paths and all(p.name in rows for p in paths):
                log.info("labels for %s from %s", path, path / name)
                return ImageSet(paths, np.stack([rows[p.name] for p in paths]))
    return ImageSet(paths, None)


def choose(images: ImageSet, count: int, seed: int = 0, exclude: set[Path] = frozenset()) -> ImageSet:
    """`count` images chosen with a seeded RNG (all of them if fewer), returned in sorted order."""
    candidates = [i for i, p in enumerate(images.paths) if p not in exclude]
    if count < len(candidates):
        candidates = sorted(np.random.default_rng(seed).choice(candidates, size=count, replace=False).tolist())
    labels = images.labels[candidates] if images.labels is not None else None
    return ImageSet([images.paths[i] for i in candidates], labels)


def load_tensors(images: ImageSet, params, workers: int | None = None) -> tuple[np.ndarray, ImageSet]:
    """Decode + preprocess; images that fail are logged and dropped (with their labels)."""
    from cxr_edge.workers import tensors_for

    items = [InputItem(p.absolute(), Path(p.name)) for p in images.paths]
    decoded = tensors_for(items, params, workers)  # thumbnails are fine for calibration: no minimum size
    for item, reason in decoded.failures:
        log.warning("%s: not used: %s", item.path, reason)
    keep = decoded.ok.tolist()
    if not keep:
        raise CxrEdgeError("none of the images could be decoded")
    kept = ImageSet([images.paths[i] for i in keep], images.labels[keep] if images.labels is not None else None)
    return decoded.tensors, kept
