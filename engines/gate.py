"""The accuracy gate: a new artifact is compared with FP32 on held-out real images.

Compared on what users see, the calibrated probabilities: max and mean |Δprob|, decisions flipped
at the manifest's thresholds, and per-class AUROC change when labels are given. An artifact beyond
tolerance is not registered.

`GateCompareFunc` is a Polygraphy compare function (two IterationResults -> {output: result});
its result, `GateResult`, is truthy when the artifact passes, like Polygraphy's own. It compares
whole hold-out sets (engines.holdout runs them), since flip rates and AUROC belong to the set.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass

import numpy as np

from cxr_edge.findings import calibrated_probabilities
from cxr_edge.labels import LABELS
from cxr_edge.metrics import per_class_auroc


@dataclass(frozen=True)
class Tolerance:
    max_abs_dprob: float  # worst single probability
    mean_abs_dprob: float  # average over images x labels
    flip_rate: float  # fraction of (image, label) decisions that change at the thresholds
    max_auroc_drop: float  # worst per-class AUROC loss (labels needed)


MIN_POSITIVES_FOR_AUROC = 10

# Defaults (README "Accuracy gate"): FP16 must be nearly exact; INT8 may move a little.
DEFAULT_TOLERANCES = {
    "fp16": Tolerance(max_abs_dprob=0.01, mean_abs_dprob=0.001, flip_rate=0.005, max_auroc_drop=0.005),
    "int8": Tolerance(max_abs_dprob=0.10, mean_abs_dprob=0.01, flip_rate=0.03, max_auroc_drop=0.03),
}


def compare(reference: np.ndarray, candidate: np.ndarray, temperatures: np.ndarray, thresholds: np.ndarray,
            labels: np.ndarray | None = None) -> dict:
    p_ref, p_new = calibrated_probabilities(reference, temperatures), calibrated_probabilities(candidate, temperatures)
    delta = np.abs(p_new - p_ref)
    flipped = (p_ref >= thresholds) != (p_new >= thresholds)
    report = {
        "images": int(len(reference)),
        "max_abs_dprob": float(delta.max()),
        "mean_abs_dprob": float(delta.mean()),
        "max_abs_dlogit": float(np.abs(candidate - reference).max()),
        "flipped_decisions": int(flipped.sum()),
        "flip_rate": float(flipped.mean()),
        "images_with_a_flip": int(flipped.any(1).sum()),
        "max_abs_dprob_per_class": dict(zip(LABELS, delta.max(0).round(6).tolist())),
        "flips_per_class": dict(zip(LABELS, flipped.sum(0).astype(int).tolist())),
    }
    if labels is not None:
        ref_auroc, new_auroc = per_class_auroc(labels, reference), per_class_auroc(labels, candidate)
        change = new_auroc - ref_auroc
        positives = labels.sum(0)
        # A class with a handful of positives moves its AUROC by one swapped pair: judge only the rest.
        judged = (positives >= MIN_POSITIVES_FOR_AUROC) & (len(labels) - positives >= MIN_POSITIVES_FOR_AUROC)
        report["auroc_fp32"] = _rounded(ref_auroc)
        report["auroc_candidate"] = _rounded(new_auroc)
        report["auroc_judged_classes"] = [label for label, ok in zip(LABELS, judged) if ok]
        drops = -change[judged & np.isfinite(change)]
        report["max_auroc_drop"] = float(max(0.0, drops.max())) if drops.size else None
    return report


def _rounded(values: np.ndarray) -> dict:
    return {k: (None if np.isnan(v) else round(float(v), 4)) for k, v in zip(LABELS, values)}


def judge(report: dict, tolerance: Tolerance) -> list[str]:
    """The reasons an artifact fails, empty when it passes."""
    reasons = []
    for key in ("max_abs_dprob", "mean_abs_dprob", "flip_rate", "max_auroc_drop"):
        value, limit = report.get(key), getattr(tolerance, key)
        if value is not None and not value <= limit:  # NaN (a candidate that outputs NaN) fails too
            reasons.append(f"{key} {value:.4g} > {limit:g}")
    return reasons


def tolerance_dict(tolerance: Tolerance) -> dict:
    return asdict(tolerance)


@dataclass(frozen=True)
class GateResult:
    """The gate's verdict on one candidate against FP32: truthy when it passes."""

    metrics: dict  # compare(): what the build report stores under "gate"
    tolerance: Tolerance
    reasons: tuple[str, ...]  # why it fails; empty when it passes

    @property
    def passed(self) -> bool:
        return not self.reasons

    def __bool__(self) -> bool:
        return self.passed

    def summary(self) -> dict:
        """What the manifest keeps beside a registered artifact."""
        keys = ("images", "max_abs_dprob", "mean_abs_dprob", "flip_rate", "max_auroc_drop")
        return {key: self.metrics.get(key) for key in keys}


class GateCompareFunc:
    """Polygraphy compare function: FP32's and a candidate's IterationResult -> {output: GateResult}."""

    def __init__(self, temperatures: np.ndarray, thresholds: np.ndarray, tolerance: Tolerance,
                 labels: np.ndarray | None = None):
        self.temperatures, self.thresholds, self.tolerance, self.labels = temperatures, thresholds, tolerance, labels

    def __call__(self, reference, candidate) -> OrderedDict:
        verdicts = OrderedDict()
        for name, logits in reference.items():
            metrics = compare(logits, candidate[name], self.temperatures, self.thresholds, self.labels)
            verdicts[name] = GateResult(metrics, self.tolerance, tuple(judge(metrics, self.tolerance)))
        return verdicts
