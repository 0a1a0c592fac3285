"""Per-class temperatures (NLL on held-out validation logits) and Youden-J thresholds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cxr_edge.findings import sigmoid
from cxr_edge.labels import LABELS
from cxr_edge.metrics import calibration_report, fit_temperatures, per_class_auroc, youden_threshold


# With fewer validation positives (or negatives) than this, a fitted temperature is noise:
# keep T = 1 for that class and say so in the report.
MIN_EXAMPLES_PER_SIDE = 5


def calibrate_run(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    val, test = np.load(run_dir / "logits_val.npz"), np.load(run_dir / "logits_test.npz")
    positives = val["labels"].sum(0)
    fitted = (positives >= MIN_EXAMPLES_PER_SIDE) & (len(val["labels"]) - positives >= MIN_EXAMPLES_PER_SIDE)
    temperatures = np.where(fitted, fit_temperatures(val["labels"], val["logits"]), 1.0)
    val_probs = sigmoid(val["logits"] / temperatures)
    thresholds = [youden_threshold(val["labels"][:, c], val_probs[:, c]) for c in range(len(LABELS))]
    test_auroc = per_class_auroc(test["labels"], test["logits"])
    result = {
        "temperatures": temperatures.tolist(),
        "thresholds": thresholds,
        "threshold_policy": "youden",
        "validation": {"n": int(len(val["labels"])),
                       "positives": dict(zip(LABELS, positives.astype(int).tolist())),
                       "temperature_fitted": dict(zip(LABELS, fitted.tolist())),
                       **calibration_report(val["labels"], val["logits"], temperatures)},
        "test": {
            "n": int(len(test["labels"])),
            "positives": dict(zip(LABELS, test["labels"].sum(0).astype(int).tolist())),
            "auroc": {label: (None if np.isnan(v) else round(float(v), 4)) for label, v in zip(LABELS, test_auroc)},
            "mean_auroc": round(float(np.nanmean(test_auroc)), 4),
        },
    }
    (run_dir / "calibration.json").write_text(json.dumps(result, indent=2))
    return result
