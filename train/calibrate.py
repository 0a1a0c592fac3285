"""Per-class temperatures (NLL on the run's validation logits) and thresholds by a named policy."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cxr_edge.atomic import atomic_write_json
from cxr_edge.calibration import fit_calibration
from cxr_edge.findings import sigmoid
from cxr_edge.labels import LABELS
from cxr_edge.metrics import calibration_report, per_class_auroc


def calibrate_run(run_dir: str | Path, policy: str = "youden") -> dict:
    """Fit on validation, report on test; writes RUN/calibration.json (export puts it in the manifest)."""
    run_dir = Path(run_dir)
    val, test = np.load(run_dir / "logits_val.npz"), np.load(run_dir / "logits_test.npz")
    fit = fit_calibration(val["labels"], val["logits"], policy)
    temperatures, thresholds = np.asarray(fit["temperatures"]), np.asarray(fit["thresholds"])
    test_auroc = per_class_auroc(test["labels"], test["logits"])
    decisions = sigmoid(test["logits"] / temperatures) >= thresholds
    positives = test["labels"] > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        sensitivity = (decisions & positives).sum(0) / positives.sum(0)
        specificity = (~decisions & ~positives).sum(0) / (~positives).sum(0)
    nan_none = lambda values: {k: (None if np.isnan(v) else round(float(v), 4)) for k, v in zip(LABELS, values)}  # noqa: E731
    result = {
        "temperatures": fit["temperatures"],
        "thresholds": fit["thresholds"],
        "threshold_policy": fit["threshold_policy"],
        "validation": {k: v for k, v in fit.items() if k not in ("temperatures", "thresholds", "threshold_policy")},
        "test": {
            "n": int(len(test["labels"])),
            "positives": dict(zip(LABELS, test["labels"].sum(0).astype(int).tolist())),
            "auroc": nan_none(test_auroc),
            "mean_auroc": round(float(np.nanmean(test_auroc)), 4),
            "sensitivity_at_threshold": nan_none(sensitivity),
            "specificity_at_threshold": nan_none(specificity),
            "calibration": calibration_report(test["labels"], test["logits"], temperatures)["mean"],
        },
    }
    atomic_write_json(run_dir / "calibration.json", result)
    return result
