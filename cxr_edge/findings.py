"""Calibrated findings: sigmoid(logit / T_class) compared with a per-class threshold."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .labels import NO_FINDING
from .operating_points import OperatingPoint


@dataclass(frozen=True)
class Finding:
    label: str
    probability: float
    threshold: float
    operating_point: dict | None = None  # OperatingPoint.brief(): policy, expected sensitivity/specificity

    @property
    def positive(self) -> bool:
        return self.probability >= self.threshold

    def as_dict(self) -> dict:
        out = {
            "label": self.label,
            "probability": round(self.probability, 6),
            "threshold": round(self.threshold, 6),
            "positive": self.positive,
        }
        if self.operating_point is not None:
            out["operating_point"] = self.operating_point
        return out


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


def findings_for_row(labels, probabilities, points: list[OperatingPoint]) -> list[Finding]:
    return [
        Finding(label, float(p), point.threshold, point.brief())
        for label, p, point in zip(labels, probabilities, points, strict=True)
    ]


def summary_text(findings) -> str:
    """One line a reader takes in first: the flagged findings, most probable first."""
    assessed = [f for f in findings if f.label != NO_FINDING]
    flagged = sorted((f for f in assessed if f.positive), key=lambda f: -f.probability)
    scope = f"of {len(assessed)} findings at the model's operating points"
    if flagged:
        listed = ", ".join(f"{f.label.replace('_', ' ')} {f.probability:.2f}" for f in flagged)
        lead = f"Flagged: {listed} ({len(flagged)} {scope})."
    else:
        lead = f"No finding flagged (0 {scope})."
    return f"{lead} AI output for a reader, not a diagnosis."


def display_probability(probability: float) -> float:
    """The precision a report shows (a model's probability carries no more)."""
    return round(float(probability), 3)
