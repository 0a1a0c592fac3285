"""Operating points: each policy meets its target, rare classes fall back to the prevalence-matched
point, and the choice travels from the fit to the manifest, the record and the SR's words."""

from __future__ import annotations

import numpy as np
import pytest

from cxr_edge.calibration import fit_calibration
from cxr_edge.findings import Finding, findings_for_row, sigmoid, summary_text
from cxr_edge.manifest import ModelPackage, ModelPackageError
from cxr_edge.operating_points import MIN_POSITIVES, OperatingPoint, Policy, choose, prevalence_threshold
from cxr_edge.sr_highdicom import threshold_text


def _scores(seed=0, n=2000, positives=0.2):
    rng = np.random.default_rng(seed)
    y = rng.random(n) < positives
    p = sigmoid(rng.normal(0, 1, n) + 1.5 * y)
    return y, p


@pytest.mark.parametrize("policy,check", [
    ("sensitivity:0.9", lambda sens, spec: sens >= 0.9),
    ("specificity:0.95", lambda sens, spec: spec >= 0.95),
    ("specificity:0.90", lambda sens, spec: 0.90 <= spec < 0.91),  # the lowest threshold that meets it
    ("youden", lambda sens, spec: sens + spec - 1 > 0.3),
    ("f1", lambda sens, spec: 0.3 < sens < 1.0),
])
def test_each_policy_meets_its_target_and_reports_what_it_gives(policy, check):
    y, p = _scores()
    point = choose(y, p, policy)
    sens, spec = (p[y] >= point.threshold).mean(), (p[~y] < point.threshold).mean()
    assert check(sens, spec), (point, sens, spec)
    assert point.policy == str(Policy.parse(policy)) and point.fallback is None
    assert point.expected_sensitivity == pytest.approx(sens) and point.expected_specificity == pytest.approx(spec)
    assert (point.positives, point.negatives) == (int(y.sum()), int((~y).sum()))


def test_highest_threshold_for_a_sensitivity_lowest_for_a_specificity():
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0] * 5, bool)  # 20 positives, 20 negatives: estimable
    p = np.array([0.9, 0.8, 0.6, 0.3, 0.7, 0.4, 0.2, 0.1] * 5)
    assert choose(y, p, "sensitivity:0.75").threshold == 0.6
    assert choose(y, p, "specificity:0.75").threshold == 0.6  # at 0.4 only half the negatives are below


def test_f1_policy_picks_the_best_f1_threshold():
    y = np.array([1] * 10 + [0] * 30, bool)
    p = np.r_[np.linspace(0.5, 0.95, 10), np.linspace(0.0, 0.6, 30)]
    point = choose(y, p, "f1")
    flagged = p >= point.threshold
    f1 = 2 * (flagged & y).sum() / (flagged.sum() + y.sum())
    best = max(2 * ((p >= t) & y).sum() / ((p >= t).sum() + y.sum()) for t in np.unique(p))
    assert f1 == pytest.approx(best)


def test_few_positives_fall_back_to_the_prevalence_matched_point():
    y, p = _scores(n=300, positives=0.0)
    y[np.argsort(-p)[:3]] = True  # 3 positives: sensitivity, F1 and Youden are not estimable
    for policy in ("sensitivity:0.9", "f1", "youden"):
        point = choose(y, p, policy)
        assert point.policy == "prevalence" and str(MIN_POSITIVES) in point.fallback
        assert (p >= point.threshold).sum() == 3  # flags as many as there are positives
    # a specificity target needs negatives only: it stays, even for a rare class
    assert choose(y, p, "specificity:0.9").policy == "specificity:0.90"


def test_few_negatives_cannot_estimate_a_specificity():
    y = np.array([1] * 40 + [0] * 5, bool)
    p = np.linspace(0, 1, 45)
    point = choose(y, p, "specificity:0.9")
    assert point.policy == "prevalence" and "negatives" in point.fallback


def test_saturated_probabilities_keep_thresholds_in_range():
    """A biased model's sigmoid can reach exactly 1.0: "just above the top score" must still be a
    threshold a manifest accepts (<= 1), not 1.0000000000000002."""
    y = np.zeros(50, bool)
    p = np.ones(50)
    assert prevalence_threshold(p, 0) == 1.0
    assert choose(y, p, "specificity:0.9").threshold == 1.0


def test_prevalence_threshold_edges():
    p = np.array([0.1, 0.5, 0.3])
    assert prevalence_threshold(p, 0) > 0.5  # nothing flagged
    assert prevalence_threshold(p, 1) == 0.5
    assert prevalence_threshold(p, 10) == 0.1  # everything


def test_policy_names_keep_their_target():
    assert [str(Policy.parse(t)) for t in ("specificity:0.9", "SENSITIVITY:.925", " f1 ")] == \
        ["specificity:0.90", "sensitivity:0.925", "f1"]


@pytest.mark.parametrize("text", ["youdens", "sensitivity", "sensitivity:1.5", "specificity:abc", "", "specificity:1",
                                  "sensitivity:0"])
def test_bad_policy_is_refused(text):
    with pytest.raises(ValueError, match="threshold policy"):
        Policy.parse(text)


def _labels_logits(seed=0, n=400, classes=15):
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, classes)) < 0.15).astype(float)
    labels[:, 7] = 0
    labels[:4, 7] = 1  # Hernia: 4 positives
    return labels, rng.normal(-2, 1, (n, classes)) + 2.0 * labels


def test_fit_records_an_operating_point_per_class_and_the_manifest_carries_it(tmp_path):
    labels, logits = _labels_logits()
    fit = fit_calibration(labels, logits, "sensitivity:0.8")
    points = [OperatingPoint.from_json(entry) for entry in fit["operating_points"]]
    assert [p.threshold for p in points] == fit["thresholds"]
    assert points[7].policy == "prevalence" and points[0].policy == "sensitivity:0.80"
    package = ModelPackage.load()
    manifest = package.recalibrated(fit, "test data", "9.9.9")
    new = ModelPackage(package.root, manifest)  # validates
    assert [p.threshold for p in new.operating_points] == fit["thresholds"]
    assert new.operating_points[0].expected_sensitivity >= 0.8


def test_manifest_refuses_operating_points_that_disagree_with_the_thresholds():
    labels, logits = _labels_logits()
    package = ModelPackage.load()
    manifest = package.recalibrated(fit_calibration(labels, logits), "test data", "9.9.9")
    manifest["thresholds"]["operating_points"][3]["threshold"] += 0.1
    with pytest.raises(ModelPackageError, match="operating_points item 3"):
        ModelPackage(package.root, manifest)
    manifest = package.recalibrated(fit_calibration(labels, logits), "test data", "9.9.9")
    manifest["thresholds"]["operating_points"] = manifest["thresholds"]["operating_points"][:-1]
    with pytest.raises(ModelPackageError, match="one per label"):
        ModelPackage(package.root, manifest)


def test_a_finding_carries_its_operating_point_into_the_record_and_the_sr_words():
    point = OperatingPoint(0.25, "specificity:0.90", 0.41234, 0.9, 30, 170)
    finding, = findings_for_row(["Effusion"], [0.3], [point])
    record = finding.as_dict()
    assert record["positive"] is True
    assert record["operating_point"] == {"policy": "specificity:0.90", "expected_sensitivity": 0.412,
                                         "expected_specificity": 0.9}
    assert threshold_text(finding) == "threshold=0.250 (specificity:0.90; expected sensitivity 0.41; expected specificity 0.90)"


def test_summary_lists_the_flagged_findings_most_probable_first():
    findings = [Finding("Effusion", 0.41, 0.3), Finding("Cardiomegaly", 0.72, 0.5), Finding("Mass", 0.1, 0.2),
                Finding("Pleural_Thickening", 0.35, 0.3), Finding("No Finding", 0.9, 0.5)]
    text = summary_text(findings)
    assert text.startswith("Flagged: Cardiomegaly 0.72, Effusion 0.41, Pleural Thickening 0.35 (3 of 4 findings")
    assert "No Finding" not in text and "not a diagnosis" in text
    assert summary_text([Finding("Mass", 0.1, 0.2)]).startswith("No finding flagged (0 of 1 findings")
