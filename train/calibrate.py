"""Per-class temperatures (NLL on the run's validation logits) and thresholds by a named policy."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cxr_edge.atomic import atomic_write_json
from cxr_edge.calibration import fit_calibration
from cxr_edge.findings import sigmoid
from cxr_edge.labels import LABELS, NO_FINDING
from cxr_edge.metrics import bootstrap_mean_auroc_ci, calibration_report, decision_report, per_class_auroc
from cxr_edge.operating_points import DEFAULT_POLICY


def calibrate_run(run_dir: str | Path, policy: str = DEFAULT_POLICY) -> dict:
    """Fit on validation, report on test; writes RUN/calibration.json (export puts it in the manifest).

    Temperature and logit shift per class (Platt scaling; export folds the shifts into the head's
    bias): a model trained with pos_weight has every logit shifted up, which a temperature alone
    cannot undo."""
    run_dir = Path(run_dir)
    val, test = np.load(run_dir / "logits_val.npz"), np.load(run_dir / "logits_test.npz")
    fit = fit_calibration(val["labels"], val["logits"], policy, shift=True)
    temperatures, thresholds = np.asarray(fit["temperatures"]), np.asarray(fit["thresholds"])
    shifts = np.asarray(fit["logit_shifts"])
    test_auroc = per_class_auroc(test["labels"], test["logits"])
    findings = np.array([label != NO_FINDING for label in LABELS])
    decided = decision_report(test["labels"], sigmoid((test["logits"] + shifts) / temperatures), thresholds, findings)
    on_val = decision_report(val["labels"], sigmoid((val["logits"] + shifts) / temperatures), thresholds, findings)
    low, high = bootstrap_mean_auroc_ci(test["labels"], test["logits"], resamples=1000)
    nan_none = lambda values: {k: (None if np.isnan(v) else round(float(v), 4)) for k, v in zip(LABELS, values)}  # noqa: E731
    result = {
        "temperatures": fit["temperatures"],
        "thresholds": fit["thresholds"],
        "threshold_policy": fit["threshold_policy"],
        "operating_points": fit["operating_points"],
        "logit_shifts": fit["logit_shifts"],
        "validation": {k: v for k, v in fit.items()
                       if k not in ("temperatures", "thresholds", "threshold_policy", "operating_points", "logit_shifts")}
        | {"described": _validation_text(run_dir, len(val["labels"]))} | _decisions(on_val),
        "test": {
            "n": int(len(test["labels"])),
            "positives": dict(zip(LABELS, test["labels"].sum(0).astype(int).tolist())),
            "auroc": nan_none(test_auroc),
            "mean_auroc": round(float(np.nanmean(test_auroc)), 4),
            "mean_auroc_ci95": [round(low, 4), round(high, 4)],
            "sensitivity_at_threshold": nan_none(decided["sensitivity"]),
            "specificity_at_threshold": nan_none(decided["specificity"]),
            **_decisions(decided),
            "calibration": calibration_report(test["labels"], test["logits"], temperatures, shifts)["mean"],
        },
    }
    atomic_write_json(run_dir / "calibration.json", result)
    return result


def _decisions(report: dict) -> dict:
    """The headline of a decision_report: means over the 14 findings, findings per image."""
    return {key: round(report[key], 4) for key in ("mean_sensitivity", "mean_specificity", "flagged_per_image",
                                                   "true_per_image")}


def _validation_text(run_dir: Path, n: int) -> str:
    """What the operating points were chosen on, in words (a staged run: out-of-fold predictions)."""
    import json

    config = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").is_file() else {}
    return config.get("validation") or f"validation split ({n} images)"
