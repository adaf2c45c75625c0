"""Anomaly-detection metrics: image/pixel AUROC, AP, F1-max, AUPRO and their mean (mAD).

All metrics are exact and tie-aware: curves are evaluated at every distinct score, never on a threshold grid.

* AUROC: area under the ROC curve with ties counted half (equals scikit-learn's ``roc_auc_score``).
* AP: ``Σ_t (R_t − R_{t−1}) · P_t`` over distinct thresholds (equals ``average_precision_score``).
* F1-max: ``max_t 2·P_t·R_t / (P_t + R_t)`` over distinct thresholds.
* AUPRO: area under the per-region-overlap curve up to FPR 0.3, divided by 0.3. Regions are the connected
  components of each ground-truth mask with 8-connectivity, as in the MVTec AD evaluation code (its
  ``compute_pro`` labels with ``structure = np.ones((3, 3))``). The curve's points are joined linearly
  (trapezoid rule) and the value at FPR 0.3 is interpolated on the segment that crosses it.
* mAD: mean of the seven (image AUROC/AP/F1-max, pixel AUROC/AP/F1-max, AUPRO).

Pixel metrics sort only the normal pixels (``np.sort``) and arg-sort only the anomalous ones: every curve
changes slope only at anomalous scores, so the normal scores are needed only as counts above a threshold.
Scores are handled as float32, so 200 maps of 256² take about a second.

Example::

    >>> res = compute_metrics(scores, labels, maps, masks)        # (N,), (N,), (N, H, W), (N, H, W)
    >>> res["mean"]["mAD"], res["per_class"]["all"]["aupro"]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = [
    "IMAGE_METRICS",
    "METRIC_NAMES",
    "PIXEL_METRICS",
    "aupro",
    "auroc",
    "average_precision",
    "compute_metrics",
    "f1_max",
    "pixel_metrics",
]

IMAGE_METRICS = ("image_auroc", "image_ap", "image_f1max")
PIXEL_METRICS = ("pixel_auroc", "pixel_ap", "pixel_f1max", "aupro")
METRIC_NAMES = IMAGE_METRICS + PIXEL_METRICS

# 8-connectivity in-plane, nothing across the stacked images.
_REGION_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_REGION_STRUCTURE[1] = True


def _to_numpy(x: Any, dtype: type | None = None) -> np.ndarray:
    """Accept numpy arrays, sequences and (CUDA, half-precision) torch tensors."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if x.is_floating_point() and x.element_size() < 4:
            # numpy has no bfloat16; float32 holds every half-precision value exactly.
            x = x.float()
        x = x.numpy()
    return np.asarray(x, dtype=dtype)


@dataclass(frozen=True)
class _Ranking:
    """Counts at each distinct anomalous score ``u_j`` (descending), the only places curves bend.

    ``n_pos``/``n_neg``: totals; ``tp[j]``: positives with score >= u_j; ``count[j]``: positives equal to
    u_j; ``fp_ge[j]``/``fp_gt[j]``: negatives with score >= u_j / > u_j; ``weight[j]``: summed positive
    weights with score >= u_j (the PRO for region weights, else unused).
    """

    n_pos: int
    n_neg: int
    tp: np.ndarray
    count: np.ndarray
    fp_ge: np.ndarray
    fp_gt: np.ndarray
    weight: np.ndarray


def _rank(scores: np.ndarray, positive: np.ndarray, what: str, weights: np.ndarray | None = None) -> _Ranking:
    """Rank flat ``scores`` (float) against flat bool ``positive``; ``weights`` are per positive element."""
    if scores.shape != positive.shape:
        raise ValueError(f"{what}: scores have shape {scores.shape} but labels have shape {positive.shape}")
    if np.isnan(scores).any():
        raise ValueError(f"{what}: scores contain NaN; check the model output")
    pos = scores[positive]
    neg = scores[~positive]
    neg.sort()  # in place: the pixel case holds millions of normal scores
    if pos.size == 0 or neg.size == 0:
        present = "anomalous" if pos.size else "normal"
        raise ValueError(
            f"{what}: only {present} samples are present ({scores.size} in all); "
            "AUROC/AP/F1 need both normal and anomalous ones"
        )
    order = np.argsort(-pos, kind="stable")
    pos = pos[order]
    # Last index of each run of equal scores: the point after every tie at that score is included.
    ends = np.flatnonzero(np.append(pos[1:] != pos[:-1], True))
    thresholds = pos[ends]
    tp = ends + 1
    count = np.diff(np.concatenate(([0], tp)))
    fp_ge = neg.size - np.searchsorted(neg, thresholds, side="left")
    fp_gt = neg.size - np.searchsorted(neg, thresholds, side="right")
    w = np.cumsum(weights[order], dtype=np.float64)[ends] if weights is not None else np.empty(0)
    return _Ranking(int(pos.size), int(neg.size), tp, count, fp_ge, fp_gt, w)


def _auroc(r: _Ranking) -> float:
    # Mann-Whitney: each positive beats the negatives below it and half of those tied with it.
    below = r.n_neg - r.fp_ge
    tied = r.fp_ge - r.fp_gt
    return float(np.sum(r.count * (below + 0.5 * tied)) / (r.n_pos * r.n_neg))


def _ap(r: _Ranking) -> float:
    precision = r.tp / (r.tp + r.fp_ge)
    return float(np.sum(r.count / r.n_pos * precision))


def _f1max(r: _Ranking) -> float:
    # 2PR/(P+R) = 2TP/(TP+FP+#positives); lowering the threshold past normal scores only adds FP.
    return float(np.max(2.0 * r.tp / (r.tp + r.fp_ge + r.n_pos)))


def _aupro(r: _Ranking, max_fpr: float) -> float:
    # Between anomalous scores only normal pixels enter: FPR grows at constant PRO. At u_j the curve jumps
    # from (fp_gt, PRO before) to (fp_ge, PRO after), diagonally when normal pixels tie with anomalous ones.
    pro_before = np.concatenate(([0.0], r.weight[:-1]))
    fpr = np.empty(2 * len(r.tp) + 2)
    pro = np.empty_like(fpr)
    fpr[0], pro[0] = 0.0, 0.0
    fpr[1:-1:2], pro[1:-1:2] = r.fp_gt / r.n_neg, pro_before
    fpr[2:-1:2], pro[2:-1:2] = r.fp_ge / r.n_neg, r.weight
    fpr[-1], pro[-1] = 1.0, r.weight[-1]
    np.minimum(pro, 1.0, out=pro)  # cumsum rounding must not lift PRO above 1
    inside = np.flatnonzero(fpr <= max_fpr)
    last = inside[-1]
    x, y = fpr[: last + 1], pro[: last + 1]
    area = float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))
    if x[-1] < max_fpr:
        # fpr[last + 1] > max_fpr exists because the curve ends at FPR 1.
        x1, y1 = fpr[last + 1], pro[last + 1]
        y_cut = y[-1] + (y1 - y[-1]) * (max_fpr - x[-1]) / (x1 - x[-1])
        area += (max_fpr - x[-1]) * (y[-1] + y_cut) / 2.0
    return float(area / max_fpr)


def _image_ranking(scores: Any, labels: Any) -> _Ranking:
    s = _to_numpy(scores, np.float64).ravel()
    y = _to_numpy(labels).ravel()
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"image labels must be 0 (normal) or 1 (anomalous), got values {np.unique(y)[:10]}")
    return _rank(s, y.astype(bool), "image-level metrics")


def auroc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve; scores float (N,), labels 0/1 (N,) -> float in [0, 1]."""
    return _auroc(_image_ranking(scores, labels))


def average_precision(scores: Any, labels: Any) -> float:
    """Average precision (step-wise, as scikit-learn); scores float (N,), labels 0/1 (N,) -> float."""
    return _ap(_image_ranking(scores, labels))


def f1_max(scores: Any, labels: Any) -> float:
    """Best F1 over all thresholds; scores float (N,), labels 0/1 (N,) -> float."""
    return _f1max(_image_ranking(scores, labels))


def _pixel_inputs(anomaly_maps: Any, masks: Any) -> tuple[np.ndarray, np.ndarray]:
    maps = _to_numpy(anomaly_maps, np.float32)
    gt = _to_numpy(masks)
    if maps.ndim == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if gt.ndim == 4 and gt.shape[1] == 1:
        gt = gt[:, 0]
    if maps.ndim != 3 or maps.shape != gt.shape:
        raise ValueError(
            f"anomaly maps and masks must both be (N, H, W) (or (N, 1, H, W)); got {maps.shape} and {gt.shape}"
        )
    return maps, gt > 0.5 if gt.dtype != bool else gt


def _pixel_ranking(maps: np.ndarray, gt: np.ndarray) -> _Ranking:
    regions, n_regions = ndimage.label(gt, structure=_REGION_STRUCTURE)
    if n_regions:
        area = np.bincount(regions.ravel())
        # Each region contributes its overlap fraction, averaged over all regions: weight 1/(area·K).
        per_region = 1.0 / (area * float(n_regions))
        weights = per_region[regions[gt]]
    else:
        weights = np.empty(0)
    return _rank(maps.ravel(), gt.ravel(), "pixel-level metrics", weights)


def aupro(anomaly_maps: Any, masks: Any, max_fpr: float = 0.3) -> float:
    """Normalised area under the PRO curve up to ``max_fpr``; maps float (N, H, W), masks bool (N, H, W)."""
    return pixel_metrics(anomaly_maps, masks, max_fpr)["aupro"]


def pixel_metrics(anomaly_maps: Any, masks: Any, max_fpr: float = 0.3) -> dict[str, float]:
    """Pixel AUROC, AP, F1-max and AUPRO from one ranking; maps float (N, H, W), masks bool (N, H, W)."""
    if not 0.0 < max_fpr <= 1.0:
        raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr}")
    maps, gt = _pixel_inputs(anomaly_maps, masks)
    # The region weights are indexed in gt order, which is the order _rank sees the positives in.
    r = _pixel_ranking(maps, gt)
    return {"pixel_auroc": _auroc(r), "pixel_ap": _ap(r), "pixel_f1max": _f1max(r), "aupro": _aupro(r, max_fpr)}


def compute_metrics(
    image_scores: Any,
    image_labels: Any,
    anomaly_maps: Any = None,
    masks: Any = None,
    class_names: Sequence[str] | None = None,
    max_fpr: float = 0.3,
) -> dict[str, dict[str, Any]]:
    """Per-class metrics, their mean over classes and, with several classes, the pooled metrics.

    image_scores float (N,), image_labels 0/1 (N,), anomaly_maps float (N, H, W) and masks bool/0-1
    (N, H, W) or both None (image metrics only), class_names str (N,) or None (one class, "all").
    Images of anomalous classes without ground truth should be left out by the caller: their zero mask
    would count as normal pixels. Returns ``{"per_class": {name: {metric: value}}, "mean": {metric: value}}``
    with the names of :data:`METRIC_NAMES` plus ``"mAD"`` (mean of the seven) when masks are given. With
    more than one class it adds ``"pooled"``: the same metrics over all classes' images and pixels ranked
    together, as the ADer / Uni-Medical tables report beside the per-class mean.
    """
    scores = _to_numpy(image_scores, np.float64).ravel()
    labels = _to_numpy(image_labels).ravel()
    n = scores.size
    if labels.size != n:
        raise ValueError(f"{n} image scores but {labels.size} image labels")
    if (anomaly_maps is None) != (masks is None):
        raise ValueError("pass both anomaly_maps and masks for pixel metrics, or neither")
    maps = gt = None
    if anomaly_maps is not None:
        maps, gt = _pixel_inputs(anomaly_maps, masks)
        if maps.shape[0] != n:
            raise ValueError(f"{n} image scores but {maps.shape[0]} anomaly maps")
    names = np.array(["all"] * n if class_names is None else [str(c) for c in class_names])
    if names.size != n:
        raise ValueError(f"{n} image scores but {names.size} class names")

    def group(idx: np.ndarray, what: str) -> dict[str, float]:
        try:
            r = _image_ranking(scores[idx], labels[idx])
            result = {"image_auroc": _auroc(r), "image_ap": _ap(r), "image_f1max": _f1max(r)}
            if maps is not None and gt is not None:
                result.update(pixel_metrics(maps[idx], gt[idx], max_fpr))
                result["mAD"] = float(np.mean([result[k] for k in METRIC_NAMES]))
        except ValueError as exc:
            raise ValueError(f"{what}: {exc}") from None
        return result

    per_class = {name: group(np.flatnonzero(names == name), f"class {name!r}") for name in sorted(set(names.tolist()))}
    keys = list(next(iter(per_class.values())))
    mean = {k: float(np.mean([per_class[c][k] for c in per_class])) for k in keys}
    out: dict[str, dict[str, Any]] = {"per_class": per_class, "mean": mean}
    if len(per_class) > 1:
        out["pooled"] = group(np.arange(n), "all classes pooled")
    return out
