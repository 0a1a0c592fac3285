"""Fit per-class temperatures and operating points on labeled logits; write them into a manifest.

numpy only: `python -m train calibrate` (validation logits from torch) and `cxr-edge calibrate`
(a site's own labeled images through the deployed ONNX model) share this code.
"""

from __future__ import annotations

import numpy as np

from .findings import sigmoid
from .labels import LABELS
from .metrics import calibration_report, fit_temperature_and_shift
from .operating_points import DEFAULT_POLICY, Policy, choose_all

# With fewer positives (or negatives) than this, a fitted temperature is noise:
# the class keeps T = 1 and the report says so.
MIN_EXAMPLES_PER_SIDE = 5


def fit_calibration(labels: np.ndarray, logits: np.ndarray, policy: str = DEFAULT_POLICY, shift: bool = False) -> dict:
    """Temperatures (NLL), operating points (policy; cxr_edge.operating_points) and the
    before/after report, on one labeled set (held-out or out-of-fold predictions).

    shift=True also fits a per-class logit shift (Platt scaling: sigmoid((logit + shift) / T)),
    for a model whose logits are biased (e.g. trained with pos_weight). The runtime applies only
    temperatures: `train export` folds the shifts into the head's bias (`logit_shifts`)."""
    labels, logits = np.asarray(labels, np.float64), np.asarray(logits, np.float64)
    chosen = Policy.parse(policy)
    positives = labels.sum(0)
    fitted = (positives >= MIN_EXAMPLES_PER_SIDE) & (len(labels) - positives >= MIN_EXAMPLES_PER_SIDE)
    pairs = np.array([fit_temperature_and_shift(labels[:, c], logits[:, c], shift=shift) if fitted[c] else (1.0, 0.0)
                      for c in range(labels.shape[1])])
    temperatures, shifts = pairs[:, 0], pairs[:, 1]
    points = choose_all(labels, sigmoid((logits + shifts) / temperatures), chosen)
    return {
        "temperatures": temperatures.tolist(),
        "logit_shifts": shifts.tolist(),
        "thresholds": [point.threshold for point in points],
        "threshold_policy": str(chosen),
        "operating_points": [point.to_json() for point in points],
        "n": int(len(labels)),
        "positives": dict(zip(LABELS, positives.astype(int).tolist())),
        "temperature_fitted": dict(zip(LABELS, fitted.tolist())),
        "min_examples_per_side": MIN_EXAMPLES_PER_SIDE,
        "report": calibration_report(labels, logits, temperatures, shifts),
    }
