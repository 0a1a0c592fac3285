"""Operating points: each finding's decision threshold, chosen by a named policy on held-out
predictions, with the sensitivity and specificity it is expected to give there.

Policies:
- `specificity:T` (the default, T = 0.90): the lowest threshold whose specificity is >= T. It is
  estimated on the negatives, which every class has plenty of, so it holds for rare findings.
- `sensitivity:T`: the highest threshold whose sensitivity is >= T.
- `f1`: the threshold of the best F1 score.
- `youden`: the best sensitivity + specificity - 1 (noisy with few positives: kept for studies).
- `prevalence`: flag as many images as the class's share of positives.

A policy that needs positives (sensitivity, f1, youden) with fewer than MIN_POSITIVES of them,
or one that needs negatives with fewer than MIN_NEGATIVES, is not trusted: that class gets the
prevalence-matched point instead, and its operating point says so.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import numpy as np

DEFAULT_POLICY = "specificity:0.90"
POLICY_HELP = "specificity:0.90 | sensitivity:0.80 | f1 | youden | prevalence"
MIN_POSITIVES = 10
MIN_NEGATIVES = 20
PREVALENCE = "prevalence"


@dataclass(frozen=True)
class Policy:
    name: str  # specificity | sensitivity | f1 | youden | prevalence
    target: float | None = None

    @classmethod
    def parse(cls, text: str) -> "Policy":
        text = str(text).strip().lower()
        match = re.fullmatch(r"(sensitivity|specificity):(0?\.\d+|1(?:\.0*)?)", text)
        if match:
            target = float(match.group(2))
            if not 0.0 < target < 1.0:
                raise ValueError(f"threshold policy {text!r}: the target must lie strictly between 0 and 1")
            return cls(match.group(1), target)
        if text in ("f1", "youden", PREVALENCE):
            return cls(text)
        raise ValueError(f"threshold policy {text!r}: expected {POLICY_HELP}")

    def __str__(self) -> str:
        if self.target is None:
            return self.name
        two_places = abs(self.target * 100 - round(self.target * 100)) < 1e-9
        return f"{self.name}:{self.target:.2f}" if two_places else f"{self.name}:{self.target:g}"  # 0.90, 0.925


@dataclass(frozen=True)
class OperatingPoint:
    """Where one finding is called: its threshold, the policy that chose it (the requested one,
    or `prevalence` when that could not be trusted, with the reason) and what it gave on the data
    it was chosen on."""

    threshold: float
    policy: str
    expected_sensitivity: float | None  # None: no positives to estimate it on
    expected_specificity: float | None
    positives: int
    negatives: int
    fallback: str | None = None

    def to_json(self) -> dict:
        # the threshold exactly as thresholds.values has it (the manifest checks they agree)
        return {k: (round(v, 4) if isinstance(v, float) and k != "threshold" else v) for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict) -> "OperatingPoint":
        return cls(float(data["threshold"]), str(data["policy"]), _maybe_float(data.get("expected_sensitivity")),
                   _maybe_float(data.get("expected_specificity")), int(data.get("positives", 0)),
                   int(data.get("negatives", 0)), data.get("fallback"))

    def brief(self) -> dict:
        """What a finding in a record carries: the policy and what to expect of it."""
        return {"policy": self.policy, "expected_sensitivity": _round(self.expected_sensitivity),
                "expected_specificity": _round(self.expected_specificity)}


def choose(labels: np.ndarray, probabilities: np.ndarray, policy: Policy | str) -> OperatingPoint:
    """The operating point of one class: labels [N] (0/1), probabilities [N]."""
    policy = Policy.parse(policy) if isinstance(policy, str) else policy
    y = np.asarray(labels).astype(bool)
    p = np.asarray(probabilities, np.float64)
    positives, negatives = int(y.sum()), int((~y).sum())
    fallback = _untrusted(policy, positives, negatives)
    if fallback or policy.name == PREVALENCE:
        threshold, used = prevalence_threshold(p, positives), PREVALENCE
    else:
        threshold, used = _threshold(y, p, policy), str(policy)
    sensitivity = float((p[y] >= threshold).mean()) if positives else None
    specificity = float((p[~y] < threshold).mean()) if negatives else None
    return OperatingPoint(float(threshold), used, sensitivity, specificity, positives, negatives, fallback)


def choose_all(labels: np.ndarray, probabilities: np.ndarray, policy: Policy | str) -> list[OperatingPoint]:
    return [choose(labels[:, c], probabilities[:, c], policy) for c in range(labels.shape[1])]


def prevalence_threshold(probabilities: np.ndarray, positives: int) -> float:
    """The threshold that flags `positives` of these images (the highest-scored ones)."""
    p = np.sort(np.asarray(probabilities, np.float64))[::-1]
    if positives <= 0 or len(p) == 0:
        return _above(p[0]) if len(p) else 1.0  # nothing flagged
    return float(p[min(positives, len(p)) - 1])


def _untrusted(policy: Policy, positives: int, negatives: int) -> str | None:
    if policy.name in ("sensitivity", "f1", "youden") and positives < MIN_POSITIVES:
        return f"{positives} positives (< {MIN_POSITIVES}): {policy} is not estimable"
    if policy.name in ("specificity", "youden") and negatives < MIN_NEGATIVES:
        return f"{negatives} negatives (< {MIN_NEGATIVES}): {policy} is not estimable"
    return None


def _threshold(y: np.ndarray, p: np.ndarray, policy: Policy) -> float:
    candidates = np.unique(p)  # ascending; "positive" is p >= threshold
    predicted = p[None, :] >= candidates[:, None]
    tp = (predicted & y).sum(1)
    sensitivity = tp / max(1, y.sum())
    specificity = (~predicted & ~y).sum(1) / max(1, (~y).sum())
    if policy.name == "specificity":
        ok = np.flatnonzero(specificity >= policy.target)  # specificity rises with the threshold
        return float(candidates[ok[0]]) if len(ok) else _above(candidates[-1])
    if policy.name == "sensitivity":
        ok = np.flatnonzero(sensitivity >= policy.target)  # sensitivity falls as it rises
        return float(candidates[ok[-1]]) if len(ok) else float(candidates[0])
    if policy.name == "f1":
        flagged = predicted.sum(1)
        f1 = 2 * tp / np.maximum(1, flagged + y.sum())
        return float(candidates[int(np.argmax(f1))])
    if policy.name == "youden":
        return float(candidates[int(np.argmax(sensitivity + specificity - 1.0))])
    raise ValueError(f"unknown threshold policy {policy}")


def _above(probability: float) -> float:
    """The next threshold above a probability, kept in [0, 1] as a manifest's must be (above 1.0
    there is none: a probability of exactly 1 is flagged at any threshold)."""
    return float(min(np.nextafter(probability, 2.0), 1.0))


def _maybe_float(value) -> float | None:
    return None if value is None else float(value)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
