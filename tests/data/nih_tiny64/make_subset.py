"""How this folder was made from ../shared/data/nih_tiny64 (kept for the record; run from the repo root):

    python tests/data/nih_tiny64/make_subset.py ../shared/data/nih_tiny64 tests/data/nih_tiny64

Whole patients only (every image of a patient, so patient-wise splits mean something), of at most
12 images each, chosen deterministically, patients with fewer images first (many patients, some
with several images): first those that bring the rarest findings, until each of the 15 labels has
at least 6 positive images (or all those patients have), then the others, until there are at
least 240 images. The published thumbnails are RGB with R = G = B; each is saved
here as the same 8-bit values in one grey channel (PNG mode L), nothing else changed.
"""

from __future__ import annotations

import csv
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

TARGET_IMAGES, MIN_POSITIVES, MAX_PER_PATIENT = 240, 6, 12


def main(source: Path, target: Path) -> None:
    with open(source / "labels.csv", newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)
    by_patient = defaultdict(list)
    for row in rows:
        by_patient[int(row["Patient ID"])].append(row)
    labels_of = lambda rs: Counter(label for r in rs for label in r["Finding Labels"].split("|"))  # noqa: E731
    by_patient = {p: rs for p, rs in by_patient.items() if len(rs) <= MAX_PER_PATIENT}
    available = labels_of([r for rs in by_patient.values() for r in rs])
    chosen: list[int] = []
    have: Counter = Counter()
    order = sorted(by_patient, key=lambda p: (len(by_patient[p]), p))
    for label, _ in sorted(available.items(), key=lambda kv: (kv[1], kv[0])):  # rarest first
        for patient in order:
            if have[label] >= min(MIN_POSITIVES, available[label]):
                break
            if patient not in chosen and label in labels_of(by_patient[patient]):
                chosen.append(patient)
                have += labels_of(by_patient[patient])
    for patient in order:
        if sum(len(by_patient[p]) for p in chosen) >= TARGET_IMAGES:
            break
        if patient not in chosen:
            chosen.append(patient)
    picked = sorted((r for p in chosen for r in by_patient[p]), key=lambda r: r["Image Index"])
    (target / "images").mkdir(parents=True, exist_ok=True)
    for row in picked:
        rgb = np.asarray(Image.open(source / "images" / row["Image Index"]).convert("RGB"))
        assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all(), row["Image Index"]
        Image.fromarray(rgb[..., 0]).save(target / "images" / row["Image Index"], optimize=True)
    with open(target / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(picked)
    print(f"{len(picked)} images of {len(chosen)} patients; positives: {dict(labels_of(picked))}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
