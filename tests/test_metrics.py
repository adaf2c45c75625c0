"""Metrics against scikit-learn, an independent brute-force AUPRO and closed-form values."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from pdd.metrics import METRIC_NAMES, aupro, auroc, average_precision, compute_metrics, f1_max, pixel_metrics

TOL = 1e-4


def _sk_f1max(labels: np.ndarray, scores: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    return float(np.max(f1[np.isfinite(f1)]))


def _brute_aupro(maps: np.ndarray, masks: np.ndarray, max_fpr: float, structure: np.ndarray) -> float:
    """Evaluate every distinct threshold explicitly, then clip each curve segment to [0, max_fpr]."""
    regions = []
    for i, gt in enumerate(masks):
        labelled, n = ndimage.label(gt, structure=structure)
        regions += [(i, labelled == k) for k in range(1, n + 1)]
    normal = ~masks
    points = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        fpr = (pred & normal).sum() / normal.sum()
        pro = np.mean([pred[i][region].mean() for i, region in regions])
        points.append((float(fpr), float(pro)))
    points.append((1.0, 1.0))
    area = 0.0
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 >= max_fpr:
            break
        if x1 > max_fpr:
            y1 = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
            x1 = max_fpr
        area += (x1 - x0) * (y0 + y1) / 2
    return area / max_fpr


EIGHT = np.ones((3, 3), dtype=int)
FOUR = ndimage.generate_binary_structure(2, 1)


def _random_case(seed: int, n: int = 5, size: int = 14) -> tuple[np.ndarray, np.ndarray]:
    """Maps with many ties (scores on a 0.05 grid) and masks with several blobs, some touching diagonally."""
    rng = np.random.default_rng(seed)
    masks = ndimage.gaussian_filter(rng.random((n, size, size)), (0, 1.2, 1.2)) > 0.56
    masks[0] = False  # one fully normal image
    maps = np.round(masks * 0.25 + rng.random((n, size, size)) * 0.8, 1).astype(np.float32)
    return maps, masks


def test_image_metrics_small_reference() -> None:
    # scikit-learn's documented example: AUROC 0.75, AP 0.8333.
    scores, labels = np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])
    assert auroc(scores, labels) == pytest.approx(0.75, abs=1e-12)
    assert average_precision(scores, labels) == pytest.approx(5 / 6, abs=1e-12)
    # Best threshold 0.35: P = 2/3, R = 1 -> F1 = 0.8.
    assert f1_max(scores, labels) == pytest.approx(0.8, abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_image_metrics_match_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = (rng.random(300) < 0.3).astype(int)
    scores = np.round(rng.normal(labels * 0.8, 1.0), 1)  # rounding makes many ties across classes
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=TOL)
    assert average_precision(scores, labels) == pytest.approx(average_precision_score(labels, scores), abs=TOL)
    assert f1_max(scores, labels) == pytest.approx(_sk_f1max(labels, scores), abs=TOL)


@pytest.mark.parametrize("seed", range(4))
def test_pixel_metrics_match_sklearn(seed: int) -> None:
    maps, masks = _random_case(seed, n=6, size=24)
    got = pixel_metrics(maps, masks)
    y, s = masks.ravel().astype(int), maps.ravel()
    assert got["pixel_auroc"] == pytest.approx(roc_auc_score(y, s), abs=TOL)
    assert got["pixel_ap"] == pytest.approx(average_precision_score(y, s), abs=TOL)
    assert got["pixel_f1max"] == pytest.approx(_sk_f1max(y, s), abs=TOL)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("max_fpr", [0.3, 0.05, 1.0])
def test_aupro_matches_brute_force(seed: int, max_fpr: float) -> None:
    maps, masks = _random_case(seed)
    assert aupro(maps, masks, max_fpr) == pytest.approx(_brute_aupro(maps, masks, max_fpr, EIGHT), abs=TOL)


def test_aupro_uses_eight_connectivity() -> None:
    # Two diagonal pixels: one region with 8-connectivity (overlap 1/2), two with 4-connectivity (1 and 0).
    mask = np.zeros((1, 6, 6), dtype=bool)
    mask[0, 2, 2] = mask[0, 3, 3] = True
    mask[0, 0, 5] = True  # a separate single-pixel region, found only at the lowest threshold
    amap = np.zeros((1, 6, 6), dtype=np.float32)
    amap[0, 2, 2] = 1.0
    amap[0, 4:, :2] = 0.5  # normal pixels above the rest of the defect
    got = aupro(amap, mask)
    assert got == pytest.approx(_brute_aupro(amap, mask, 0.3, EIGHT), abs=1e-9)
    assert abs(got - _brute_aupro(amap, mask, 0.3, FOUR)) > 0.05


def test_aupro_closed_forms() -> None:
    masks = np.zeros((3, 8, 8), dtype=bool)
    masks[1, 2:5, 2:5] = True
    masks[2, 6:, 6:] = True
    perfect = masks.astype(np.float32)
    assert aupro(perfect, masks) == pytest.approx(1.0, abs=1e-12)
    assert aupro(1.0 - perfect, masks) == pytest.approx(0.0, abs=1e-12)
    # A constant map jumps straight from (0, 0) to (1, 1): PRO(0.3) = 0.3, area 0.045, normalised 0.15.
    assert aupro(np.full(masks.shape, 0.2, np.float32), masks) == pytest.approx(0.15, abs=1e-12)


def test_compute_metrics_per_class_and_mean() -> None:
    rng = np.random.default_rng(3)
    maps_a, masks_a = _random_case(10, n=6)
    maps_b, masks_b = _random_case(11, n=6)
    maps, masks = np.concatenate([maps_a, maps_b]), np.concatenate([masks_a, masks_b])
    labels = masks.reshape(12, -1).any(axis=1).astype(int)
    scores = maps.reshape(12, -1).max(axis=1) + rng.normal(0, 0.1, 12)
    names = ["a"] * 6 + ["b"] * 6
    res = compute_metrics(scores, labels, maps, masks[:, None], class_names=names)
    assert sorted(res["per_class"]) == ["a", "b"]
    for name, sl in (("a", slice(0, 6)), ("b", slice(6, 12))):
        r = res["per_class"][name]
        assert r["image_auroc"] == pytest.approx(roc_auc_score(labels[sl], scores[sl]), abs=TOL)
        assert r["aupro"] == pytest.approx(_brute_aupro(maps[sl], masks[sl], 0.3, EIGHT), abs=TOL)
        assert r["mAD"] == pytest.approx(np.mean([r[k] for k in METRIC_NAMES]), abs=1e-12)
    for key in (*METRIC_NAMES, "mAD"):
        assert res["mean"][key] == pytest.approx((res["per_class"]["a"][key] + res["per_class"]["b"][key]) / 2)
    # Pooled: all images and pixels of both classes ranked together, against scikit-learn.
    pooled = res["pooled"]
    assert pooled["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=TOL)
    assert pooled["image_ap"] == pytest.approx(average_precision_score(labels, scores), abs=TOL)
    assert pooled["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=TOL)
    assert pooled["pixel_f1max"] == pytest.approx(_sk_f1max(masks.ravel(), maps.ravel()), abs=TOL)
    assert pooled["aupro"] == pytest.approx(_brute_aupro(maps, masks, 0.3, EIGHT), abs=TOL)
    assert pooled["image_auroc"] != pytest.approx(res["mean"]["image_auroc"], abs=1e-6)
    assert "pooled" not in compute_metrics(scores[:6], labels[:6], class_names=names[:6])


def test_compute_metrics_image_only_from_tensors() -> None:
    scores = torch.tensor([0.1, 0.4, 0.35, 0.8], dtype=torch.bfloat16)
    res = compute_metrics(scores, torch.tensor([0, 0, 1, 1]))
    assert set(res["per_class"]["all"]) == {"image_auroc", "image_ap", "image_f1max"}
    assert res["mean"]["image_auroc"] == pytest.approx(0.75, abs=1e-12)


def test_degenerate_inputs_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="only normal samples"):
        auroc([0.1, 0.2, 0.3], [0, 0, 0])
    with pytest.raises(ValueError, match=r"class 'b'.*only anomalous"):
        compute_metrics([0.1, 0.9, 0.5, 0.6], [0, 1, 1, 1], class_names=["a", "a", "b", "b"])
    with pytest.raises(ValueError, match="NaN"):
        auroc([0.1, np.nan], [0, 1])
    with pytest.raises(ValueError, match=r"0 \(normal\) or 1"):
        auroc([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match=r"pixel-level.*only normal"):
        pixel_metrics(np.zeros((2, 4, 4)), np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match=r"both be \(N, H, W\)"):
        pixel_metrics(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))
    with pytest.raises(ValueError, match="pass both"):
        compute_metrics([0.1, 0.9], [0, 1], anomaly_maps=np.zeros((2, 4, 4)))


def test_pixel_metrics_scale_to_benchmark_size() -> None:
    # 200 maps of 256² (13M pixels) must stay within seconds; values are checked against sklearn on a subsample.
    rng = np.random.default_rng(0)
    masks = np.zeros((200, 256, 256), dtype=bool)
    for i in range(100, 200):
        cy, cx = rng.integers(40, 216, 2)
        masks[i, cy - 12 : cy + 12, cx - 20 : cx + 20] = True
    maps = rng.random(masks.shape, dtype=np.float32) + 0.5 * masks
    start = time.perf_counter()
    got = pixel_metrics(maps, masks)
    elapsed = time.perf_counter() - start
    assert elapsed < 20.0, f"pixel metrics took {elapsed:.1f} s for 13M pixels"
    sub = slice(95, 105)
    ref = pixel_metrics(maps[sub], masks[sub])
    y, s = masks[sub].ravel(), maps[sub].ravel()
    assert ref["pixel_auroc"] == pytest.approx(roc_auc_score(y, s), abs=TOL)
    # Uniform noise plus a 0.5 shift: AUROC = 1 − 0.5²/2 = 0.875 analytically.
    assert got["pixel_auroc"] == pytest.approx(0.875, abs=2e-3)
