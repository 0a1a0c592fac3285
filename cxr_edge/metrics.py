"""Metrics and calibration in numpy only, shared by `train` and the runtime's own calibrate."""

from __future__ import annotations

import numpy as np

from .findings import sigmoid


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with tie correction); NaN if one class is absent."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def per_class_auroc(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    return np.array([auroc(labels[:, c], scores[:, c]) for c in range(labels.shape[1])])


def binary_nll(labels: np.ndarray, logits: np.ndarray) -> float:
    """Mean binary cross-entropy of sigmoid(logits), computed stably from the logits."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def best_shift(labels: np.ndarray, scaled: np.ndarray) -> float:
    """The b minimising NLL of sigmoid(scaled + b) (convex in b: Newton's method)."""
    b = 0.0
    for _ in range(50):
        p = 1.0 / (1.0 + np.exp(-np.clip(scaled + b, -40, 40)))
        step = np.mean(p - labels) / max(np.mean(p * (1 - p)), 1e-12)
        b -= float(np.clip(step, -5, 5))
        if abs(step) < 1e-10:
            break
    return b


def fit_temperature_and_shift(labels: np.ndarray, logits: np.ndarray, low: float = 0.05, high: float = 20.0,
                              shift: bool = True) -> tuple[float, float]:
    """(T, s) minimising NLL of sigmoid((logit + s) / T) for one class: Platt scaling written as a
    logit shift (which can be folded into the model's bias) and a temperature. shift=False: s = 0.

    Golden section on log T of the NLL minimised over the bias (logistic regression is convex in
    (1/T, bias), so that profile is unimodal in log T)."""
    y, z = np.asarray(labels, np.float64), np.asarray(logits, np.float64)
    if y.min() == y.max():
        return 1.0, 0.0  # one class only: nothing to calibrate against
    a, b = np.log(low), np.log(high)
    ratio = (np.sqrt(5.0) - 1.0) / 2.0

    def loss(log_t: float) -> float:
        scaled = z / np.exp(log_t)
        return binary_nll(y, scaled + (best_shift(y, scaled) if shift else 0.0))

    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = loss(c), loss(d)
    for _ in range(80):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = loss(d)
    temperature = float(np.exp((a + b) / 2.0))
    bias = best_shift(y, z / temperature) if shift else 0.0
    return temperature, bias * temperature  # sigmoid(z / T + bias) = sigmoid((z + bias * T) / T)


def brier_score(labels: np.ndarray, probabilities: np.ndarray) -> float:
    return float(np.mean((np.asarray(probabilities, np.float64) - np.asarray(labels, np.float64)) ** 2))


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the precision-recall curve as the step sum (scikit-learn's definition)."""
    y = np.asarray(labels).astype(bool)
    if not y.any():
        return float("nan")
    order = np.argsort(-np.asarray(scores, np.float64), kind="mergesort")
    s, y = np.asarray(scores, np.float64)[order], y[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tp = np.cumsum(y)[last_of_tie]
    precision = tp / (last_of_tie + 1)
    recall = tp / y.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) at every distinct threshold, from (0, 0)."""
    y = np.asarray(labels).astype(bool)
    order = np.argsort(-np.asarray(scores, np.float64), kind="mergesort")
    s, y = np.asarray(scores, np.float64)[order], y[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tp, fp = np.cumsum(y)[last_of_tie], np.cumsum(~y)[last_of_tie]
    return np.r_[0.0, fp / max(1, (~y).sum())], np.r_[0.0, tp / max(1, y.sum())]


def bootstrap_auroc_ci(labels: np.ndarray, scores: np.ndarray, resamples: int = 1000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the AUROC, resampling images; NaN if too few positives."""
    y, s = np.asarray(labels).astype(bool), np.asarray(scores, np.float64)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        index = rng.integers(0, len(y), len(y))
        value = auroc(y[index], s[index])
        if not np.isnan(value):
            values.append(value)
    if len(values) < resamples // 2:
        return float("nan"), float("nan")
    tail = (1.0 - level) / 2.0 * 100.0
    return float(np.percentile(values, tail)), float(np.percentile(values, 100.0 - tail))


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray, bins: int = 15) -> float:
    """ECE with equal-width bins over [0, 1] (the usual 15-bin definition)."""
    y = np.asarray(labels, np.float64).ravel()
    p = np.asarray(probabilities, np.float64).ravel()
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        mask = index == b
        if mask.any():
            ece += mask.mean() * abs(p[mask].mean() - y[mask].mean())
    return float(ece)


def calibration_report(labels: np.ndarray, logits: np.ndarray, temperatures: np.ndarray,
                       shifts: np.ndarray | None = None) -> dict:
    """NLL, 15-bin ECE and Brier before (T = 1) and after calibration (sigmoid((logit + shift) / T)),
    per class and mean."""
    before = sigmoid(logits)
    calibrated = (logits + (0.0 if shifts is None else shifts)) / temperatures
    after = sigmoid(calibrated)
    n = labels.shape[1]
    report = {
        "nll_before": [binary_nll(labels[:, c], logits[:, c]) for c in range(n)],
        "nll_after": [binary_nll(labels[:, c], calibrated[:, c]) for c in range(n)],
        "ece_before": [expected_calibration_error(labels[:, c], before[:, c]) for c in range(n)],
        "ece_after": [expected_calibration_error(labels[:, c], after[:, c]) for c in range(n)],
        "brier_before": [brier_score(labels[:, c], before[:, c]) for c in range(n)],
        "brier_after": [brier_score(labels[:, c], after[:, c]) for c in range(n)],
    }
    report["mean"] = {key: float(np.mean(values)) for key, values in report.items()}
    return report


def bootstrap_mean_auroc_ci(labels: np.ndarray, scores: np.ndarray, resamples: int = 1000, seed: int = 0,
                            level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean over classes of the AUROC, resampling images (a class
    without positives or negatives in a resample is left out of that resample's mean)."""
    labels, scores = np.asarray(labels), np.asarray(scores, np.float64)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        index = rng.integers(0, len(labels), len(labels))
        with np.errstate(invalid="ignore"):
            values.append(np.nanmean(per_class_auroc(labels[index], scores[index])))
    tail = (1.0 - level) / 2.0 * 100.0
    return float(np.nanpercentile(values, tail)), float(np.nanpercentile(values, 100.0 - tail))


def decision_report(labels: np.ndarray, probabilities: np.ndarray, thresholds: np.ndarray, findings: np.ndarray) -> dict:
    """What the thresholds do on labeled images: per-class sensitivity and specificity, their mean
    over the `findings` columns (a bool mask: the 14 findings, not "No Finding"), and the findings
    flagged per image against the true count."""
    y = np.asarray(labels) > 0
    decisions = np.asarray(probabilities) >= np.asarray(thresholds)
    with np.errstate(invalid="ignore", divide="ignore"):
        sensitivity = (decisions & y).sum(0) / y.sum(0)
        specificity = (~decisions & ~y).sum(0) / (~y).sum(0)
    return {
        "sensitivity": sensitivity, "specificity": specificity,
        "mean_sensitivity": float(np.nanmean(sensitivity[findings])),
        "mean_specificity": float(np.nanmean(specificity[findings])),
        "flagged_per_image": float(decisions[:, findings].sum(1).mean()),
        "true_per_image": float(y[:, findings].sum(1).mean()),
    }
