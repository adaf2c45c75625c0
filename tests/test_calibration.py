"""Operating points against direct computations and scikit-learn's curves, ties included."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import precision_recall_curve, roc_curve

from pdd.calibration import (
    Calibration,
    CalibrationError,
    OperatingPoint,
    apply_calibration,
    fit_operating_point,
)


def _case(seed: int, n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """Scores rounded to 2 decimals, so normal and anomalous scores tie often."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.3).astype(int)
    scores = np.round(rng.normal(0, 1, n) + 1.2 * labels, 2)
    return scores, labels


def _counts(scores: np.ndarray, labels: np.ndarray, threshold: float) -> tuple[int, int]:
    flagged = scores > threshold
    return int((flagged & (labels == 1)).sum()), int((flagged & (labels == 0)).sum())


def _check_midpoint(scores: np.ndarray, op: OperatingPoint) -> None:
    """The threshold lies halfway between the lowest flagged and the highest unflagged score."""
    above, below = scores[scores > op.threshold], scores[scores <= op.threshold]
    if len(above) and len(below):
        assert op.threshold == pytest.approx((above.min() + below.max()) / 2, abs=1e-12)


def test_hand_example_with_ties():
    scores = np.array([0.1, 0.2, 0.2, 0.3, 0.4, 0.4, 0.5])
    labels = np.array([0, 0, 1, 0, 1, 1, 1])
    # Flagging >= 0.5, 0.4, 0.3, 0.2, 0.1 gives F1 2/5, 6/7, 6/8, 8/10, 8/11: the best cut is between 0.3 and 0.4.
    op = fit_operating_point(scores, labels)
    assert (op.method, op.threshold, op.true_positives, op.false_positives) == ("f1_max", 0.35, 3, 0)
    assert (op.sensitivity, op.specificity, op.f1) == (0.75, 1.0, pytest.approx(6 / 7))
    # Sensitivity 1 needs the tied 0.2 anomaly, so the tied 0.2 normal is flagged too.
    op = fit_operating_point(scores, labels, method="sensitivity", target=1.0)
    assert (op.threshold, op.true_positives, op.false_positives) == (pytest.approx(0.15), 4, 2)
    # Without labels: 7 normals, FPR ≤ 0.3 allows 2 above the threshold; the tie at 0.4 allows only 1.
    op = fit_operating_point(scores, target=0.3)
    assert (op.method, op.threshold, op.false_positives, op.normal, op.anomalous) == ("fpr", 0.45, 1, 7, 0)
    assert op.sensitivity is None and op.specificity == pytest.approx(6 / 7)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("alpha", [0.0, 0.01, 0.05, 0.2])
def test_fpr_point_is_the_most_sensitive_meeting_the_target(seed, alpha):
    normals, _ = _case(seed)
    op = fit_operating_point(normals, target=alpha)
    allowed = math.floor(alpha * normals.size + 1e-9)
    _, fp = _counts(normals, np.zeros_like(normals, dtype=int), op.threshold)
    assert fp == op.false_positives <= allowed
    # Any lower threshold that flags one more distinct score exceeds the allowance.
    below = normals[normals <= op.threshold]
    if below.size:
        assert (normals >= below.max()).sum() > allowed
    _check_midpoint(normals, op)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_f1_point_matches_scikit_learn(seed):
    scores, labels = _case(seed)
    op = fit_operating_point(scores, labels)
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    best = int(np.argmax(f1[:-1]))  # the last point (recall 0) has no threshold
    assert op.f1 == pytest.approx(f1[best], abs=1e-12)
    # scikit-learn flags scores >= its threshold; ours flags the same images with scores > ours.
    ref_tp, ref_fp = _counts(scores, labels, np.nextafter(thresholds[best], -np.inf))
    assert (op.true_positives, op.false_positives) == _counts(scores, labels, op.threshold)
    assert op.f1 == pytest.approx(2 * ref_tp / (2 * ref_tp + ref_fp + (labels == 1).sum() - ref_tp), abs=1e-12)
    _check_midpoint(scores, op)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("target", [0.5, 0.9, 0.95, 1.0])
def test_sensitivity_and_specificity_points_match_the_roc_curve(seed, target):
    scores, labels = _case(seed)
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    n_pos, n_neg = int(labels.sum()), int((labels == 0).sum())

    op = fit_operating_point(scores, labels, method="specificity", target=target)
    tp, fp = _counts(scores, labels, op.threshold)
    assert (tp, fp) == (op.true_positives, op.false_positives)
    assert fp / n_neg <= 1 - target + 1e-12
    assert tp / n_pos == pytest.approx(tpr[fpr <= 1 - target + 1e-12].max(), abs=1e-12)

    op = fit_operating_point(scores, labels, method="sensitivity", target=target)
    tp, fp = _counts(scores, labels, op.threshold)
    assert (tp, fp) == (op.true_positives, op.false_positives)
    assert tp / n_pos >= target - 1e-12
    assert fp / n_neg == pytest.approx(fpr[tpr >= target - 1e-12].min(), abs=1e-12)


def test_normalisation_is_monotone_and_centred_on_the_threshold():
    scores, labels = _case(5)
    op = fit_operating_point(scores, labels)
    normalised = op.normalise(scores)
    assert normalised.dtype == np.float32 and ((normalised > 0) & (normalised < 1)).all()
    order = np.argsort(scores, kind="stable")
    assert (np.diff(normalised[order]) >= 0).all()
    distinct = np.unique(scores)  # 0.01 apart: distinct scores stay distinct in float32
    assert (np.diff(op.normalise(distinct)) > 0).all()
    assert op.normalise([op.threshold])[0] == 0.5
    assert op.normalise([np.median(scores[labels == 0])])[0] == pytest.approx(0.1, abs=1e-6)
    # 0.5 stays the decision boundary: above it exactly where the score is above the threshold.
    np.testing.assert_array_equal(normalised > 0.5, op.decide(scores))
    assert op.normalise([-1e6, 1e6]).tolist() == [0.0, 1.0]


def test_thresholds_compare_in_float64():
    # Two adjacent float32 scores: their midpoint is not a float32, so a float32 comparison would fail one side.
    lo = np.float32(2.25)
    hi = np.nextafter(lo, np.float32(3))
    scores = np.array([lo, hi], dtype=np.float32)
    op = fit_operating_point(scores, [0, 1])
    assert float(lo) < op.threshold < float(hi)
    out = apply_calibration(Calibration(op), scores)
    assert out["pred_label"].tolist() == [False, True]


def test_apply_with_overrides_and_pixel_fallback():
    image = fit_operating_point([1.0, 2.0, 3.0, 4.0], target=0.25)
    pixel = fit_operating_point(np.linspace(0, 1, 101), target=0.1)
    maps = np.array([[[0.5, 0.95], [3.6, 0.0]]])
    out = apply_calibration(Calibration(image, pixel), [3.6], maps)
    assert image.threshold == 3.5 and out["pred_label"].tolist() == [True]
    assert out["pred_mask"].tolist() == [[[False, True], [True, False]]]
    out = apply_calibration(Calibration(image, pixel), [3.6], maps, image_threshold=3.7, pixel_threshold=0.96)
    assert out["pred_label"].tolist() == [False] and out["normalised_score"][0] < 0.5
    assert out["pred_mask"].tolist() == [[[False, False], [True, False]]]
    # Without a pixel point the mask uses the image threshold (or its override).
    out = apply_calibration(Calibration(image), [3.6], maps)
    assert out["pred_mask"].tolist() == [[[False, False], [True, False]]]
    assert apply_calibration(Calibration(image), [3.6], maps, image_threshold=0.9)["pred_mask"].sum() == 2


def test_record_round_trip_and_errors():
    scores, labels = _case(7)
    cal = Calibration(fit_operating_point(scores, labels), fit_operating_point(scores[labels == 0]))
    assert Calibration.from_dict(cal.to_dict()) == cal
    manual = Calibration.manual(2.5)
    assert Calibration.from_dict(manual.to_dict()) == manual
    assert np.isnan(apply_calibration(manual, [3.0])["normalised_score"]).all()
    with pytest.raises(CalibrationError, match="not a pdd-calibration/1 record"):
        Calibration.from_dict({"threshold": 1.0}, "model.json calibration")
    with pytest.raises(CalibrationError, match="lacks"):
        Calibration.from_dict({"format": "pdd-calibration/1", "image": {"threshold": 1.0}})
    with pytest.raises(CalibrationError, match="needs normal and anomalous"):
        fit_operating_point([1.0, 2.0], [1, 1])
    with pytest.raises(CalibrationError, match="needs a target"):
        fit_operating_point([1.0, 2.0], [0, 1], method="sensitivity")
    with pytest.raises(CalibrationError, match="NaN"):
        fit_operating_point([1.0, np.nan])
    assert "TP 0, FP 0, TN 4, FN 0" in fit_operating_point([1.0, 2.0, 3.0, 4.0], target=0.0).describe()


def test_measured_on_other_scores():
    op = fit_operating_point([0.1, 0.2, 0.3, 0.8, 0.9], [0, 0, 0, 1, 1])
    test = op.measured_on([0.2, 0.6, 0.4, 0.7, 0.5], [0, 0, 1, 1, 1], source="test set")
    assert test.threshold == op.threshold == pytest.approx(0.55)
    assert (test.true_positives, test.false_positives, test.true_negatives, test.false_negatives) == (1, 1, 1, 2)
    assert test.counts() == "TP 1, FP 1, TN 1, FN 2; sensitivity 0.333; specificity 0.500; f1 0.400"
