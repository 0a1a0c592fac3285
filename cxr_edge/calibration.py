"""Fit per-class temperatures and thresholds on labeled logits; write them into a manifest.

numpy only: `python -m train calibrate` (validation logits from torch) and `cxr-edge calibrate`
(a site's own labeled images through the deployed ONNX model) share this code.
"""

from __future__ import annotations

import re

import numpy as np

from .findings import sigmoid
from .labels import LABELS
from .metrics import calibration_report, fit_temperatures, threshold_for_policy

# With fewer positives (or negatives) than this, a fitted temperature is noise:
# the class keeps T = 1 and the report says so.
MIN_EXAMPLES_PER_SIDE = 5
POLICY_HELP = "youden | sensitivity:0.90 | specificity:0.90"


def parse_policy(text: str) -> tuple[str, float | None]:
    """'youden', 'sensitivity:0.9' or 'specificity:0.95' -> (name, target)."""
    match = re.fullmatch(r"(youden)|(sensitivity|specificity):(0?\.\d+|1(?:\.0*)?)", text.strip().lower())
    if not match:
        raise ValueError(f"threshold policy {text!r}: expected {POLICY_HELP}")
    if match.group(1):
        return "youden", None
    return match.group(2), float(match.group(3))


def fit_calibration(labels: np.ndarray, logits: np.ndarray, policy: str = "youden") -> dict:
    """Temperatures (NLL), thresholds (policy) and the before/after report, on one labeled set."""
    labels, logits = np.asarray(labels, np.float64), np.asarray(logits, np.float64)
    name, target = parse_policy(policy)
    positives = labels.sum(0)
    fitted = (positives >= MIN_EXAMPLES_PER_SIDE) & (len(labels) - positives >= MIN_EXAMPLES_PER_SIDE)
    temperatures = np.where(fitted, fit_temperatures(labels, logits), 1.0)
    probabilities = sigmoid(logits / temperatures)
    thresholds = [threshold_for_policy(labels[:, c], probabilities[:, c], name, target) for c in range(labels.shape[1])]
    return {
        "temperatures": temperatures.tolist(),
        "thresholds": thresholds,
        "threshold_policy": policy.strip().lower(),
        "n": int(len(labels)),
        "positives": dict(zip(LABELS, positives.astype(int).tolist())),
        "temperature_fitted": dict(zip(LABELS, fitted.tolist())),
        "min_examples_per_side": MIN_EXAMPLES_PER_SIDE,
        "report": calibration_report(labels, logits, temperatures),
    }
