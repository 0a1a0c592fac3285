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


def fit_temperature(labels: np.ndarray, logits: np.ndarray, low: float = 0.05, high: float = 20.0) -> float:
    """The T > 0 minimising NLL of sigmoid(logit / T) for one class (golden section on log T).

    NLL is convex in 1/T, so it is unimodal in log T and the search finds the optimum.
    """
    y, z = np.asarray(labels, np.float64), np.asarray(logits, np.float64)
    if y.min() == y.max():
        return 1.0  # one class only: nothing to calibrate against
    a, b = np.log(low), np.log(high)
    ratio = (np.sqrt(5.0) - 1.0) / 2.0
    loss = lambda log_t: binary_nll(y, z / np.exp(log_t))  # noqa: E731
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
    return float(np.exp((a + b) / 2.0))


def fit_temperatures(labels: np.ndarray, logits: np.ndarray) -> np.ndarray:
    return np.array([fit_temperature(labels[:, c], logits[:, c]) for c in range(labels.shape[1])])


def youden_threshold(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Threshold maximising sensitivity + specificity - 1; 0.5 when a class is absent."""
    y = np.asarray(labels).astype(bool)
    p = np.asarray(probabilities, dtype=np.float64)
    if y.all() or (~y).all():
        return 0.5
    candidates = np.unique(p)
    best_t, best_j = 0.5, -1.0
    for t in candidates:
        predicted = p >= t
        sens = (predicted & y).sum() / y.sum()
        spec = (~predicted & ~y).sum() / (~y).sum()
        if sens + spec - 1.0 > best_j:
            best_t, best_j = float(t), sens + spec - 1.0
    return best_t


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


def calibration_report(labels: np.ndarray, logits: np.ndarray, temperatures: np.ndarray) -> dict:
    """NLL and ECE before (T = 1) and after temperature scaling, per class and mean."""
    before = sigmoid(logits)
    after = sigmoid(logits / temperatures)
    n = labels.shape[1]
    return {
        "nll_before": [binary_nll(labels[:, c], logits[:, c]) for c in range(n)],
        "nll_after": [binary_nll(labels[:, c], logits[:, c] / temperatures[c]) for c in range(n)],
        "ece_before": [expected_calibration_error(labels[:, c], before[:, c]) for c in range(n)],
        "ece_after": [expected_calibration_error(labels[:, c], after[:, c]) for c in range(n)],
    }
