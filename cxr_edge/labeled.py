"""Labeled images through a deployed model: logits for `cxr-edge calibrate` and `train evaluate`.

Labels come in NIH's CSV format (`Image Index`, `Finding Labels`); images are matched to rows by
file name. Decoding uses the same worker pool as `infer`; a file that fails is reported and left
out, never silently counted.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CxrEdgeError
from .labels import LABELS, parse_finding_labels
from .sources import InputItem, discover


@dataclass
class LabeledSet:
    items: list[InputItem]
    labels: np.ndarray  # [n, len(LABELS)] multi-hot
    unlabeled: int  # images found that the CSV does not list


def read_labels_csv(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path)
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = {"Image Index", "Finding Labels"} - set(reader.fieldnames or ())
            if missing:
                raise CxrEdgeError(f"{path}: missing column(s) {sorted(missing)} (NIH Data_Entry_2017 format)")
            rows = {}
            for line, row in enumerate(reader, start=2):
                try:
                    rows[row["Image Index"].strip()] = np.asarray(parse_finding_labels(row["Finding Labels"]), np.float32)
                except ValueError as exc:
                    raise CxrEdgeError(f"{path}, line {line}: {exc}") from exc
    except OSError as exc:
        raise CxrEdgeError(f"{path}: cannot read labels: {exc.strerror or exc}") from exc
    if not rows:
        raise CxrEdgeError(f"{path}: no labeled rows")
    return rows


def match_labels(inputs: list[str | Path], labels_csv: str | Path) -> LabeledSet:
    """The images under `inputs` that the CSV labels, matched by file name."""
    rows = read_labels_csv(labels_csv)
    items, _ = discover([Path(p) for p in inputs])
    by_name: dict[str, InputItem] = {}
    for item in items:
        if item.path.name in rows and item.path.name in by_name:
            raise CxrEdgeError(f"two images named {item.path.name} ({by_name[item.path.name].path}, {item.path}); "
                               "labels are matched by file name")
        by_name.setdefault(item.path.name, item)
    missing = [name for name in rows if name not in by_name]
    if missing:
        raise CxrEdgeError(f"{labels_csv}: {len(missing)} labeled image(s) not found under the inputs, e.g. {missing[:3]}")
    names = list(rows)
    return LabeledSet([by_name[n] for n in names], np.stack([rows[n] for n in names]), len(by_name) - len(names))


def logits_for(items: list[InputItem], package, runner, batch_size: int = 8, workers: int | None = None):
    """(logits [n_ok, L], index of each ok item, [(item, reason)] for failures), in input order.
    `runner` must not be active yet: the decode workers are forked first."""
    from .workers import tensors_for

    decoded = tensors_for(items, package.preprocess_params, workers)  # a site's labeled set: its own choice of sizes
    with runner:
        logits = [runner.infer(decoded.tensors[s : s + batch_size]) for s in range(0, len(decoded.tensors), batch_size)]
    out = np.concatenate(logits) if logits else np.zeros((0, len(LABELS)), np.float32)
    return out, decoded.ok, decoded.failures
