"""Calibrated findings: sigmoid(logit / T_class) compared with a per-class threshold."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Finding:
    label: str
    probability: float
    threshold: float

    @property
    def positive(self) -> bool:
        return self.probability >= self.threshold

    def as_dict(self) -> dict:
        return {
            "label": self.label,
            "probability": round(self.probability, 6),
            "threshold": round(self.threshold, 6),
            "positive": self.positive,
        }


def sigmoid(x: np.ndarray) -> np.ndarray:
    # Split by sign so large |x| neither overflows nor loses precision.
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    ex = np.exp(x[~pos])
    out[~pos] = ex / (1.0 + ex)
    return out


def calibrated_probabilities(logits: np.ndarray, temperatures: np.ndarray) -> np.ndarray:
    """logits [B, C] -> calibrated probabilities [B, C]."""
    return sigmoid(np.asarray(logits, np.float64) / np.asarray(temperatures, np.float64))


def findings_for_row(labels, probabilities, thresholds) -> list[Finding]:
    return [
        Finding(label, float(p), float(t))
        for label, p, t in zip(labels, probabilities, thresholds, strict=True)
    ]
